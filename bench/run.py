#!/usr/bin/env python
"""Run r1fast's kernel benchmarks: every registered case times r1fast and each available peer.

    python bench/run.py                      # all cases, full timing budget (CUDA only)
    python bench/run.py --quick              # cases marked quick, short timing budget
    python bench/run.py --not-quick          # only the cases --quick leaves out
    python bench/run.py --part bench-full    # one of bench/plan.py's PARTS (what gpu_checks.sh runs)
    python bench/run.py --only grpo_loss     # cases whose name starts with / contains NAME (repeatable)
    python bench/run.py --list               # list families, cases, shapes, floors (works on CPU)
    python bench/run.py --ceilings           # only measure the device ceilings (and save them)
    python bench/run.py --out DIR --no-save  # where results go / print only

Results are ratios: to the floor (FLOPs / measured matmul ceiling, bytes / measured copy ceiling,
both measured in this run) and to the fastest peer. They are written to
``bench/results/<date>_<gpu>_<commit>.json`` and ``.md`` (see bench/results/README.md).
Before timing, the run prints its estimated length (bench/plan.py; ``--list`` shows it per case).
Exit status: 0 on success (and on a machine without CUDA, where nothing is timed), 1 when a case file
or generator failed, a case crashed or r1fast's own implementation raised (on CPU too: the import and
generator errors are printed), 2 when ``--only`` selects nothing or is given with ``--ceilings``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script (``python bench/run.py``), Python puts bench/ on sys.path, not the repo root.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import argparse  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from bench import registry  # noqa: E402
from bench.plan import PARTS, case_seconds, run_seconds  # noqa: E402
from bench.rows import ceiling_values, floor_ms, impl_rows, matches_only, validate_case  # noqa: E402
from bench.tables import ceilings_table, family_table, list_table  # noqa: E402

DEFAULT_OUT = _REPO_ROOT / "bench" / "results"
NEEDS_GPU = "benchmarks need a CUDA GPU"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list families and cases with shapes (no GPU needed)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run cases whose name starts with or contains NAME"
    )
    parser.add_argument("--quick", action="store_true", help="only cases marked quick, short timing budget")
    parser.add_argument("--not-quick", action="store_true", help="only cases not marked quick (full budget)")
    parser.add_argument("--part", choices=sorted(PARTS), help="a preset of bench/plan.py's PARTS (gpu_checks.sh)")
    parser.add_argument("--ceilings", action="store_true", help="only measure and report the device ceilings")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-save", action="store_true", help="print the results without writing files")
    args = parser.parse_args(argv)
    if args.part:  # the preset's options are added to the ones given (--out, --no-save, ...)
        args = parser.parse_args([*(sys.argv[1:] if argv is None else argv), *PARTS[args.part]])
    if args.quick and args.not_quick:
        parser.error("--quick and --not-quick select disjoint cases; give one")
    if args.ceilings and args.only:  # --ceilings times no case: a silently ignored --only hid typos (exit 0)
        parser.error("--ceilings measures only the device ceilings; it takes no --only")
    return args


def load_families() -> tuple[dict, list[dict]]:
    """Import every ``bench/cases`` module; one broken case file must not hide the other families."""
    errors: list[dict] = []
    return registry.families(errors), errors


def collect_cases(
    generators: dict, *, quick: bool, only: list[str], not_quick: bool = False, left_out: list[str] | None = None
) -> tuple[list[tuple[str, object]], list[dict]]:
    """Call each generator (never ``make_inputs``) and keep the valid cases ``--quick``/``--only`` select.

    ``left_out``, when given, receives the names ``--only`` matched but ``--quick``/``--not-quick`` dropped.
    """
    selected, errors = [], []
    for family in sorted(generators):
        try:
            cases = list(generators[family](quick))
        except Exception as exc:
            errors.append({"where": f"family {family}", "error": f"case generator raised {type(exc).__name__}: {exc}"})
            continue
        for case in cases:
            if not matches_only(case.name, only):
                continue
            if (quick and not case.quick) or (not_quick and case.quick):
                if left_out is not None:
                    left_out.append(case.name)
                continue
            try:
                validate_case(case)
            except ValueError as exc:
                errors.append({"where": f"family {family}", "error": str(exc)})
                continue
            selected.append((family, case))
    return selected, errors


def case_record(family: str, case, run, ceilings: dict | None) -> dict:
    """The JSON record of one timed case: what it is, how its inputs were laid out, one row per impl."""
    floor = floor_ms(case.flops, case.bytes, case.ceiling, ceiling_values(ceilings))
    return {
        "family": family,
        "name": case.name,
        "shape": dict(case.shape),
        "flops": case.flops,
        "bytes": case.bytes,
        "ceiling": case.ceiling,
        "floor_ms": floor,
        "input_sets": run.input_sets,
        "set_bytes": run.set_bytes,
        "notes": case.notes,
        "run_notes": run.notes,
        "extra": dict(case.extra),
        "rows": impl_rows(run.results, flops=case.flops, bytes_=case.bytes, floor=floor, rates=case.rates),
    }


def _save(report: dict, args, console: Console, stem: str | None = None, quiet: bool = False) -> None:
    if args.no_save:
        return
    from bench.results_io import write_report

    json_path, md_path = write_report(report, args.out, stem)
    if not quiet:
        console.print(f"wrote {json_path}\nwrote {md_path}")


def _print_errors(errors: list[dict], console: Console) -> None:
    for e in errors:  # exception text is not markup: "[/group]" in it raised MarkupError before the save
        console.print(f"[red]error[/] in {escape(e['where'])}: {escape(e['error'])}", markup=True, highlight=False)


def _print_plan(selected, quick: bool, console: Console, case_s: list[float] | None = None) -> None:
    """One line: how many cases and the estimated minutes, so a run that cannot fit a device call shows it."""
    total = run_seconds([case for _, case in selected], quick, case_s)
    console.print(f"plan: {len(selected)} case(s), estimated {total / 60:.1f} min on an H100 "
                  "(bench/plan.py: ANCHORS.md times where known, else 3x the floor; a device call ends at 10 min)",
                  highlight=False)


def run_ceilings_only(args, meta: dict, console: Console) -> int:
    from bench.ceilings import measure_ceilings

    ceilings = measure_ceilings(quick=args.quick)
    console.print(ceilings_table(ceilings, title=f"Device ceilings: {meta['gpu']}, {meta['date']}, {meta['commit']}"))
    _save({"kind": "ceilings", "meta": meta, "ceilings": ceilings, "cases": [], "errors": []}, args, console)
    return 0


def _crash_run(case, exc: BaseException, reason: str | None = None):
    """A CaseRun whose every row is an error: ``time_case`` itself raised (or never ran)."""
    from bench.timing import CaseRun, _skip_all, failure_text

    return CaseRun(_skip_all(case, "error", reason or failure_text(exc, "case aborted: ")))


def cuda_unusable() -> str | None:
    """Why the CUDA context can no longer run anything (a sticky error such as an illegal address), or None."""
    import torch

    from bench.timing import failure_text

    try:  # a sticky error (cudaErrorIllegalAddress, ...) makes every later synchronize raise it again
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        return failure_text(exc)
    return None


def _release(family: str) -> None:
    """Drop the family's cached models so the next family gets the memory (see registry.register)."""
    import gc

    import torch

    try:
        registry.release(family)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def run_cases(selected, errors: list[dict], args, meta: dict, console: Console) -> int:
    import torch

    from bench.ceilings import measure_ceilings
    from bench.results_io import report_stem
    from bench.timing import time_case

    torch.manual_seed(0)  # fresh random inputs, but the same ones on a rerun
    _print_plan(selected, args.quick, console)
    ceilings = None
    if any(case.flops is not None or case.bytes is not None for _, case in selected):
        console.print("measuring device ceilings (the floors every ratio is taken against)")
        ceilings = measure_ceilings(quick=args.quick)
        console.print(ceilings_table(ceilings))
    records: list[dict] = []
    report = {"kind": "quick" if args.quick else "cases", "meta": meta, "ceilings": ceilings, "cases": records}
    # The files are rewritten after every case: a run killed at a device call's time limit (10 minutes on
    # the lent machines; each gpu_checks.sh part is planned under 8) keeps every case it finished.
    stem = None if args.no_save else report_stem(report, Path(args.out))
    families = list(dict.fromkeys(family for family, _ in selected))
    dead = None  # why CUDA became unusable: every later case is recorded as not run
    aborted = set()  # cases whose rows _crash_run built: already in errors once (crash or "CUDA unusable")
    for family in families:
        start = len(records)
        for fam, case in selected:
            if fam != family:
                continue
            if dead is None:
                console.print(f"[dim]timing {escape(case.name)}[/]", highlight=False)
                try:
                    run = time_case(case, quick=args.quick)
                except Exception as exc:  # one case's crash must not lose the cases after it
                    run = _crash_run(case, exc)
                    aborted.add(case.name)
                    errors.append({"where": case.name, "error": run.results[0].reason})
                    dead = cuda_unusable()
                    if dead:
                        errors.append({"where": case.name, "error": f"CUDA unusable after this case ({dead}); "
                                       "the later cases were not run: rerun them with --only"})
            else:
                run = _crash_run(case, None, reason=f"not run: CUDA unusable after an earlier case ({dead})")
                aborted.add(case.name)
            records.append(case_record(family, case, run, ceilings))
            report.update(incomplete={"done": len(records), "of": len(selected)}, errors=list(errors))
            _save(report, args, console, stem, quiet=True)
        console.print(family_table(family, records[start:]))
        if dead is None:
            try:
                _release(family)
            except Exception as exc:
                errors.append({"where": f"family {family}", "error": f"release raised {type(exc).__name__}: {exc}"})
    report.pop("incomplete", None)
    for record in records:
        for row in record["rows"]:
            if row["ours"] and row["status"] == "error" and record["name"] not in aborted:
                errors.append({"where": record["name"], "error": f"{row['impl']} raised {row['reason']}"})
    _print_errors(errors, console)
    report["errors"] = errors
    _save(report, args, console, stem)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Wide when not a terminal, so piped output and logs keep whole case names on one line.
    console = Console(width=None if sys.stdout.isatty() else 200)

    generators, errors = load_families()
    left_out: list[str] = []
    selected, gen_errors = collect_cases(generators, quick=args.quick, only=args.only, not_quick=args.not_quick,
                                         left_out=left_out)
    errors += gen_errors
    if args.list:
        case_s = [case_seconds(case, args.quick) for _, case in selected]
        console.print(list_table(selected, case_s))
        _print_plan(selected, args.quick, console, case_s)
    if not selected and not args.ceilings:  # an --only typo is an error with or without a GPU
        _print_errors(errors, console)
        if left_out:
            what, flag = ("not quick cases", "--quick") if args.quick else ("quick cases", "--not-quick")
            console.print(f"--only {' '.join(args.only)} matches only {what}: {', '.join(left_out)} (drop {flag})",
                          highlight=False)
            return 2
        if args.only:
            console.print(f"no case matches --only {' '.join(args.only)} (see --list)")
            return 2
        console.print("no benchmark cases are registered (bench/cases/*.py)")
        return 1
    if args.list:
        _print_errors(errors, console)
        return 1 if errors else 0

    import torch

    if not torch.cuda.is_available():
        _print_errors(errors, console)  # a broken case file must not pass silently on CPU CI
        console.print(
            f"bench/run.py: {NEEDS_GPU}, and this machine has none (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}). Nothing was timed; `--list` shows the cases.",
            highlight=False,
        )
        return 1 if errors else 0

    if not args.no_save:  # an unusable --out fails now, not after minutes of timing
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            console.print(f"bench/run.py: --out {args.out}: cannot create the results folder ({exc.strerror})",
                          highlight=False)
            return 2
    from bench.results_io import environment_metadata

    meta = environment_metadata()
    meta.update(quick=args.quick, only=args.only, part=args.part, argv=list(sys.argv[1:] if argv is None else argv))
    if args.ceilings:
        return run_ceilings_only(args, meta, console)

    return run_cases(selected, errors, args, meta, console)


if __name__ == "__main__":
    sys.exit(main())
