"""Naming, describing and writing benchmark results: ``<date>_<gpu>_<commit>[_kind].json`` and ``.md``.

A report is a plain dict (see ``bench/results/README.md`` for the fields):
``{"kind", "meta", "ceilings", "cases", "errors"}``. The JSON is the record; the markdown is the
same content for reading in a pull request.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from bench.rows import (
    DASH,
    fmt_floor_ratio,
    fmt_gib,
    fmt_ms,
    fmt_num,
    fmt_peer_ratio,
    fmt_shape,
    fmt_throughput,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT_KINDS = ("cases", "quick", "ceilings")
PEER_DISTRIBUTIONS = ("liger-kernel", "transformers")
"""The peers' packages whose versions every report records: a ratio to "liger-fused-linear" means little
without knowing which Liger (ANCHORS.md measured 0.8.5; a carried wheel may be another)."""


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse --short HEAD``, "+dirty" when tracked files differ, "nocommit" without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        # Untracked files are ignored: the results this very run writes must not make it "dirty".
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nocommit"
    if not head:
        return "nocommit"
    return head + ("+dirty" if status else "")


COMMIT_ENV = "R1FAST_COMMIT"
UNKNOWN_COMMIT = "unknown-commit"


def run_commit(repo: Path = REPO_ROOT) -> tuple[str, str]:
    """(commit, where it came from) for a run's metadata and file names.

    The lent GPU machines receive the working tree without ``.git`` (the device README: tracked and
    untracked-not-ignored files travel), so ``git`` says nothing there: the session passes the commit
    in ``R1FAST_COMMIT`` (``R1FAST_COMMIT=$(git rev-parse --short HEAD)`` resolved on its own side).
    Without either the commit is ``unknown-commit`` and the source says why, never a silent default.
    """
    commit = git_commit(repo)
    if commit != "nocommit":
        return commit, "git"
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given, f"{COMMIT_ENV} (no git checkout here; uncommitted changes unknown)"
    return UNKNOWN_COMMIT, f"unknown: no git checkout here and {COMMIT_ENV} unset"


def slug(text: str) -> str:
    """Lower-case letters, digits and single dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_slug(gpu_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"`` (the vendor word adds nothing)."""
    name = re.sub(r"^\s*(nvidia|amd)\s+", "", gpu_name, flags=re.IGNORECASE)
    return slug(name) or "unknown-gpu"


def results_stem(date: str, gpu_name: str, commit: str, kind: str = "cases") -> str:
    """``2026-11-23_h100-80gb-hbm3_74ecd48`` (+ ``_quick`` / ``_ceilings`` for those runs).

    The commit's "+dirty" becomes "-dirty": file names keep to letters, digits, '.', '_' and '-'
    so they survive every copy tool (the JSON keeps the commit verbatim).
    """
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    if kind not in REPORT_KINDS:
        raise ValueError(f"kind must be one of {REPORT_KINDS}, got {kind!r}")
    stem = f"{date}_{gpu_slug(gpu_name)}_{slug(commit) or 'nocommit'}"
    return stem if kind == "cases" else f"{stem}_{kind}"


def unique_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... so a second run the same day never overwrites the first."""
    candidate, n = stem, 1
    while (out_dir / f"{candidate}.json").exists() or (out_dir / f"{candidate}.md").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_metadata(now: _dt.datetime | None = None) -> dict:
    """GPU, software versions, date and commit of this run (CUDA fields only when CUDA is present)."""
    import torch

    now = now or _dt.datetime.now(_dt.timezone.utc)
    commit, commit_source = run_commit()
    meta = {
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "commit_source": commit_source,
        "gpu": "none",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        **{dist: _version(dist) for dist in PEER_DISTRIBUTIONS},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_bytes=int(getattr(props, "L2_cache_size", 0) or 0),
        )
    return meta


# ---- markdown -------------------------------------------------------------------------------------


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def ceilings_markdown(ceilings: Mapping[str, Mapping]) -> list[str]:
    rows = []
    for name, c in ceilings.items():
        value = (
            f"{fmt_num(c['value'])} {c['unit']}" if c.get("value") is not None else f"{DASH} ({c.get('reason', '')})"
        )
        rows.append([name, value, fmt_ms(c.get("ms")), c.get("what", "")])
    return _md_table(["ceiling", "measured", "ms", "what"], rows)


def case_rows_markdown(cases: list[Mapping]) -> list[str]:
    """One table row per implementation; the case's name and shape on its first row only."""
    rows = []
    for case in cases:
        for i, row in enumerate(case["rows"]):
            note = row["reason"] if row["status"] != "ok" else ""
            rows.append(
                [
                    case["name"] if i == 0 else "",
                    fmt_shape(case["shape"]) if i == 0 else "",
                    f"**{row['impl']}**" if row["ours"] else row["impl"],
                    fmt_ms(row["ms"]) if row["status"] == "ok" else row["status"],
                    fmt_throughput(row),
                    fmt_floor_ratio(row["x_floor"]),
                    fmt_peer_ratio(row["x_fastest_peer"]),
                    fmt_gib(row["extra_gib"]),
                    note,
                ]
            )
    header = ["case", "shape", "impl", "ms", "throughput", "× floor", "× fastest peer", "extra GiB", "note"]
    return _md_table(header, rows)


def render_markdown(report: Mapping) -> str:
    """The whole report as markdown: environment, ceilings, one table per family, notes, errors."""
    meta = report["meta"]
    title = "Device ceilings" if report["kind"] == "ceilings" else "Benchmark results"
    lines = [f"# {title}: {meta.get('gpu', 'none')}, {meta['date']}, commit {meta['commit']}", ""]
    lines += _md_table(["field", "value"], [[k, v] for k, v in meta.items() if k not in ("argv",)])
    if report.get("incomplete"):
        done = report["incomplete"]
        lines += ["", f"**Incomplete**: the run stopped after {done['done']} of {done['of']} cases (killed or timed "
                  "out); the tables hold the cases it finished."]
    if meta.get("argv") is not None:
        lines += ["", f"Command: `python bench/run.py {' '.join(meta['argv'])}`"]
    if report.get("ceilings"):
        lines += ["", "## Ceilings", ""] + ceilings_markdown(report["ceilings"])
    families: dict[str, list] = {}
    for case in report.get("cases", []):
        families.setdefault(case["family"], []).append(case)
    for family, cases in families.items():
        lines += ["", f"## {family}", ""] + case_rows_markdown(cases) + [""]
        for case in cases:
            details = [f"floor {fmt_ms(case.get('floor_ms'))} ms ({case['ceiling']})"]
            details.append(
                f"{case.get('input_sets', 0)} input set(s) of {fmt_num(case.get('set_bytes', 0) / 2**20)} MiB"
            )
            details += [n for n in [case.get("notes", "")] + case.get("run_notes", []) if n]
            if case.get("extra"):
                details.append(", ".join(f"{k}={v}" for k, v in case["extra"].items()))
            lines.append(f"- `{case['name']}`: " + "; ".join(details))
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- `{e['where']}`: {e['error']}" for e in report["errors"]]
    if report["kind"] != "ceilings":
        lines += [
            "",
            "× floor: time / (FLOPs ÷ matmul ceiling, or bytes ÷ copy ceiling) measured in this run. "
            "× fastest peer: time / time of the fastest non-r1fast implementation. "
            "extra GiB: peak memory of one call beyond what existed before it.",
        ]
    return "\n".join(lines) + "\n"


def report_stem(report: Mapping, out_dir: Path) -> str:
    """The unused ``<date>_<gpu>_<commit>[_kind][_part][-n]`` name this report gets under ``out_dir``.

    A ``--part`` run other than the quick one adds its part (``_bench-full``), so the parts of one GPU
    session, each written on a fresh machine, keep distinct names once copied into one folder.
    """
    meta = report["meta"]
    stem = results_stem(meta["date"], meta.get("gpu", "none"), meta["commit"], report["kind"])
    part = meta.get("part")
    if part and report["kind"] == "cases":
        stem += f"_{slug(part)}"
    return unique_stem(Path(out_dir), stem)


def write_report(report: Mapping, out_dir: Path, stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; returns both paths.

    ``stem`` None picks an unused name (``report_stem``); a given stem is overwritten, which is how a
    run rewrites its own files after every case.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or report_stem(report, out_dir)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    # default=str: shapes may carry torch.dtype objects; they are recorded by name.
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
