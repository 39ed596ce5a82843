"""Tests for the benchmark harness (bench/run.py and its helpers).

The arithmetic (floors, ratios, L2 rotation, names, markdown) is checked on CPU with fake timings;
the CLI is checked in-process and as a real ``python bench/run.py`` subprocess; the CUDA timing
path end to end is checked by the ``gpu`` tests.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import registry  # noqa: E402
from bench.ceilings import measure_ceilings  # noqa: E402
from bench.registry import Case, Impl  # noqa: E402
from bench.results_io import (  # noqa: E402
    git_commit,
    gpu_slug,
    render_markdown,
    results_stem,
    unique_stem,
    write_report,
)
from bench.rows import (  # noqa: E402
    GIB,
    ImplResult,
    floor_ms,
    fmt_floor_ratio,
    fmt_ms,
    fmt_peer_ratio,
    fmt_ratio,
    fmt_shape,
    fmt_throughput,
    impl_rows,
    matches_only,
    validate_case,
)
from bench.run import case_record, collect_cases, main  # noqa: E402
from bench.timing import (  # noqa: E402
    CaseRun,
    _unique_bytes,
    as_input_set,
    classify_failure,
    rotation_count,
    tensors_in,
    time_case,
)

FAMILY = "zz_bench_selftest"
MiB = 2**20


def _never_make_inputs():
    raise AssertionError("make_inputs must not be called while listing or collecting cases")


def _case(name=f"{FAMILY}.copy", **kw):
    defaults = dict(
        shape={"N": 4096, "dtype": torch.bfloat16},
        make_inputs=_never_make_inputs,
        impls=[Impl("r1fast", lambda x: x, ours=True), Impl("torch-eager", lambda x: x)],
        bytes=4096 * 2 * 2,
        ceiling="copy",
    )
    defaults.update(kw)
    return Case(name=name, **defaults)


# ---- pure arithmetic ------------------------------------------------------------------------------


def test_matches_only_prefix_and_substring():
    assert matches_only("grpo_loss.fwd_bwd.A", [])
    assert matches_only("grpo_loss.fwd_bwd.A", None)
    assert matches_only("grpo_loss.fwd_bwd.A", ["grpo"])
    assert matches_only("grpo_loss.fwd_bwd.A", ["fwd_bwd"])
    assert matches_only("grpo_loss.fwd_bwd.A", ["fp8", "loss.fwd"])
    assert not matches_only("grpo_loss.fwd_bwd.A", ["fp8"])
    assert not matches_only("grpo_loss.fwd_bwd.A", ["GRPO"])  # case-sensitive, like the names


def test_rotation_count():
    l2, free = 50 * MiB, 80 * GIB
    assert rotation_count(60 * MiB, l2, free) == 1  # larger than L2: no rotation needed
    n = rotation_count(30 * MiB, l2, free)
    assert n == 4 and n * 30 * MiB > 2 * l2 and (n - 1) * 30 * MiB <= 2 * l2
    assert rotation_count(50 * MiB, l2, free) == 3  # exactly L2 still fits, so it rotates
    assert rotation_count(1 * MiB, l2, free) == 8  # capped at max_sets
    assert rotation_count(1 * MiB, l2, free, max_sets=3) == 3
    assert rotation_count(10 * MiB, l2, free_bytes=40 * MiB) == 3  # 1 + half of 40 MiB / 10 MiB
    assert rotation_count(10 * MiB, l2, free_bytes=0) == 1
    for bad in (dict(set_bytes=0), dict(l2_bytes=0), dict(max_sets=0)):
        args = dict(set_bytes=MiB, l2_bytes=l2, free_bytes=free) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            rotation_count(**args)


def test_floor_ms_is_a_roofline_over_measured_ceilings():
    ceilings = {"copy": 3000.0, "bf16_matmul": 700.0, "fp8_matmul": None}
    assert floor_ms(700e9, None, "bf16_matmul", ceilings) == pytest.approx(1.0)  # 700 GFLOP at 700 TFLOP/s
    assert floor_ms(None, 3e9, "copy", ceilings) == pytest.approx(1.0)  # 3 GB at 3000 GB/s
    assert floor_ms(700e9, 6e9, "bf16_matmul", ceilings) == pytest.approx(2.0)  # bandwidth bound wins
    assert floor_ms(1400e9, 3e9, "bf16_matmul", ceilings) == pytest.approx(2.0)  # compute bound wins
    assert floor_ms(700e9, None, "fp8_matmul", ceilings) is None  # unmeasured ceiling: no floor
    assert floor_ms(None, 3e9, "copy", {"copy": None}) is None
    assert floor_ms(None, None, "bf16_matmul", ceilings) is None
    assert floor_ms(700e9, 3e9, "copy", ceilings) == pytest.approx(1.0)  # flops never floored by copy


def test_impl_rows_from_fake_timings():
    results = [
        ImplResult("r1fast", True, "ok", ms=2.0, extra_bytes=GIB // 2),
        ImplResult("torch-eager", False, "ok", ms=4.0, extra_bytes=3 * GIB),
        ImplResult("liger", False, "ok", ms=3.0, extra_bytes=GIB),
        ImplResult("flash", False, "skipped", reason="flash-attn not installed"),
        ImplResult("broken", False, "error", reason="RuntimeError: boom"),
    ]
    rows = impl_rows(results, flops=2e12, bytes_=None, floor=1.6)
    by = {r["impl"]: r for r in rows}
    assert [r["impl"] for r in rows] == ["r1fast", "torch-eager", "liger", "flash", "broken"]
    ours = by["r1fast"]
    assert ours["tflops"] == pytest.approx(1000.0)  # 2e12 FLOP in 2 ms
    assert ours["gbps"] is None
    assert ours["x_floor"] == pytest.approx(2.0 / 1.6)
    assert ours["x_fastest_peer"] == pytest.approx(2.0 / 3.0)  # vs liger, the fastest *peer*
    assert ours["extra_gib"] == pytest.approx(0.5)
    assert by["liger"]["x_fastest_peer"] == pytest.approx(1.0)
    assert by["torch-eager"]["x_fastest_peer"] == pytest.approx(4.0 / 3.0)
    assert by["torch-eager"]["extra_gib"] == pytest.approx(3.0)
    for name in ("flash", "broken"):
        row = by[name]
        assert row["ms"] is row["tflops"] is row["x_floor"] is row["x_fastest_peer"] is row["extra_gib"] is None
    assert by["flash"]["status"] == "skipped" and by["flash"]["reason"] == "flash-attn not installed"
    assert by["broken"]["status"] == "error"


def test_impl_rows_bytes_and_no_peer_or_floor():
    rows = impl_rows([ImplResult("r1fast", True, "ok", ms=0.5, extra_bytes=0)], flops=None, bytes_=1e9, floor=None)
    assert rows[0]["gbps"] == pytest.approx(2000.0)
    assert rows[0]["tflops"] is None and rows[0]["x_floor"] is None and rows[0]["x_fastest_peer"] is None
    rows = impl_rows(
        [ImplResult("r1fast", True, "skipped", reason="x"), ImplResult("eager", False, "ok", ms=1.0)],
        flops=None,
        bytes_=None,
        floor=None,
    )
    assert rows[1]["x_fastest_peer"] == pytest.approx(1.0) and rows[0]["x_fastest_peer"] is None


def test_impl_result_rejects_bad_fields():
    with pytest.raises(ValueError, match="status"):
        ImplResult("a", True, "fine", ms=1.0)
    with pytest.raises(ValueError, match="ms"):
        ImplResult("a", True, "ok", ms=None)
    with pytest.raises(ValueError, match="ms"):
        ImplResult("a", True, "ok", ms=0.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ceiling="tf32_matmul"), "ceiling"),
        (dict(bytes=None), "bytes"),
        (dict(impls=[]), "impls"),
        (dict(impls=[Impl("a", print, ours=True), Impl("b", print, ours=True)]), "ours"),
        (dict(impls=[Impl("a", print, ours=True), Impl("a", print)]), "repeat"),
        (dict(flops=-1.0, ceiling="bf16_matmul"), "flops"),
        (dict(name=""), "name"),
    ],
)
def test_validate_case_names_the_bad_field(change, message):
    validate_case(_case())
    with pytest.raises(ValueError, match=message):
        validate_case(_case(**change))


def test_classify_failure():
    assert classify_failure(ImportError("No module named 'liger_kernel'"))[0] == "skipped"
    assert classify_failure(NotImplementedError("fp8 path"))[0] == "skipped"
    assert classify_failure(torch.OutOfMemoryError("CUDA out of memory"))[0] == "skipped"
    status, reason = classify_failure(RuntimeError("illegal memory access\nmore lines"))
    assert status == "error" and reason == "RuntimeError: illegal memory access"


def test_tensors_in_counts_shared_storage_once():
    base = torch.zeros(256, dtype=torch.float32)
    module = torch.nn.Linear(8, 4, bias=False)
    found = tensors_in((base, [base[:128], {"w": module}], 3, "text"))
    assert len(found) == 3
    assert _unique_bytes(found) == 256 * 4 + 8 * 4 * 4


def test_as_input_set():
    x = torch.zeros(3, 2)
    assert as_input_set([x, 1]) == (x, 1)
    with pytest.raises(ValueError, match="make_inputs"):
        as_input_set(x)  # a lone tensor would be unpacked row by row


def test_formatting():
    assert fmt_ms(None) == "—"
    assert fmt_ms(0.01234) == "0.0123"
    assert fmt_ms(1.23456) == "1.235"
    assert fmt_ms(76.94) == "76.9"
    assert fmt_ms(1094.4) == "1,094"
    assert fmt_ratio(1.0834) == "1.08×"
    assert fmt_throughput({"tflops": 697.2, "gbps": None}) == "697 TFLOP/s"
    assert fmt_throughput({"tflops": 12.34, "gbps": 3018.2}) == "12.3 TFLOP/s, 3,018 GB/s"
    assert fmt_throughput({}) == "—"
    assert fmt_shape({"N": 16384, "dtype": torch.bfloat16}) == "N=16384 dtype=bfloat16"


# ---- names, metadata, files ----------------------------------------------------------------------


def test_results_stem_and_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("???") == "unknown-gpu"
    assert results_stem("2026-11-23", "NVIDIA H100 80GB HBM3", "74ecd48") == "2026-11-23_h100-80gb-hbm3_74ecd48"
    assert results_stem("2026-11-23", "NVIDIA H200", "74ecd48+dirty", "quick") == "2026-11-23_h200_74ecd48-dirty_quick"
    assert results_stem("2026-11-23", "NVIDIA H200", "nocommit", "ceilings").endswith("_nocommit_ceilings")
    with pytest.raises(ValueError, match="date"):
        results_stem("23.11.2026", "H100", "abc")
    with pytest.raises(ValueError, match="kind"):
        results_stem("2026-11-23", "H100", "abc", "full")


def test_unique_stem_never_overwrites(tmp_path):
    assert unique_stem(tmp_path, "run") == "run"
    (tmp_path / "run.md").write_text("x")
    assert unique_stem(tmp_path, "run") == "run-2"
    (tmp_path / "run-2.json").write_text("x")
    assert unique_stem(tmp_path, "run") == "run-3"


def test_git_commit(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the repository has no git history here")
    commit = git_commit(REPO)
    assert commit in (head.stdout.strip(), head.stdout.strip() + "+dirty")
    assert git_commit(tmp_path) == "nocommit"  # not a git work tree


def _fake_report():
    ceilings = {
        "copy": {"value": 3018.0, "unit": "GB/s", "ms": 0.71, "what": "copy 1 GiB", "reason": ""},
        "bf16_matmul": {"value": 697.0, "unit": "TFLOP/s", "ms": 1.58, "what": "bf16 mm", "reason": ""},
        "fp8_matmul": {"value": None, "unit": "TFLOP/s", "ms": None, "what": "fp8", "reason": "needs sm89"},
    }
    case = _case(name=f"{FAMILY}.mm|odd", flops=2e12, bytes=None, ceiling="bf16_matmul", notes="counts the grad")
    run = CaseRun(
        [
            ImplResult("r1fast", True, "ok", ms=3.2, extra_bytes=GIB),
            ImplResult("torch-eager", False, "ok", ms=4.0, extra_bytes=2 * GIB),
            ImplResult("liger", False, "skipped", reason="liger-kernel not installed"),
        ],
        input_sets=3,
        set_bytes=20 * MiB,
    )
    record = case_record(FAMILY, case, run, ceilings)
    meta = {"date": "2026-11-23", "time_utc": "2026-11-23T20:00:00Z", "commit": "74ecd48+dirty"}
    meta |= {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.13", "triton": "3.9", "cuda": "13.0", "argv": ["--quick"]}
    return {"kind": "quick", "meta": meta, "ceilings": ceilings, "cases": [record], "errors": []}


def test_case_record_uses_the_runs_ceilings():
    record = _fake_report()["cases"][0]
    assert record["floor_ms"] == pytest.approx(2e12 / 697e12 * 1e3)
    ours = record["rows"][0]
    assert ours["x_floor"] == pytest.approx(3.2 / record["floor_ms"])
    assert ours["x_fastest_peer"] == pytest.approx(0.8)
    assert record["input_sets"] == 3 and record["set_bytes"] == 20 * MiB


def test_render_markdown():
    md = render_markdown(_fake_report())
    assert md.startswith("# Benchmark results: NVIDIA H100 80GB HBM3, 2026-11-23, commit 74ecd48+dirty")
    for expected in ("3,018 GB/s", "697 TFLOP/s", "needs sm89", f"## {FAMILY}", "**r1fast**", "0.80×", "1.00×",
                     "625 TFLOP/s", "liger-kernel not installed", "counts the grad", "3 input set(s) of 20.0 MiB",
                     "`python bench/run.py --quick`", "mm\\|odd"):  # fmt: skip
        assert expected in md, expected
    ours_line = next(line for line in md.splitlines() if "**r1fast**" in line)
    assert ours_line.count("|") - ours_line.count("\\|") == 10  # 9 columns, the pipe in the name escaped


def test_write_report_round_trips(tmp_path):
    report = _fake_report()
    json_path, md_path = write_report(report, tmp_path / "results")
    assert json_path.name == "2026-11-23_h100-80gb-hbm3_74ecd48-dirty_quick.json"
    assert md_path.with_suffix(".json") == json_path
    loaded = json.loads(json_path.read_text())
    assert loaded["meta"]["commit"] == "74ecd48+dirty"
    assert loaded["cases"][0]["shape"]["dtype"] == "torch.bfloat16"
    assert loaded["cases"][0]["rows"][0]["x_fastest_peer"] == pytest.approx(0.8)
    assert md_path.read_text() == render_markdown(report)
    second, _ = write_report(report, tmp_path / "results")
    assert second.name.endswith("_quick-2.json")


def test_measure_ceilings_arithmetic_with_a_fake_timer():
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 2.0  # ms

    ceilings = measure_ceilings("cpu", timer=timer, matmul_n=32, copy_bytes=MiB)
    assert set(ceilings) == set(registry.CEILINGS) and len(calls) == 3
    assert ceilings["copy"]["value"] == pytest.approx(2 * MiB / 2e-3 / 1e9)
    assert ceilings["bf16_matmul"]["value"] == pytest.approx(2 * 32**3 / 2e-3 / 1e12)
    fp8 = ceilings["fp8_matmul"]
    assert fp8["value"] == pytest.approx(2 * 32**3 / 2e-3 / 1e12) or fp8["reason"]
    assert all(c["unit"] in ("GB/s", "TFLOP/s") and c["ms"] in (2.0, None) for c in ceilings.values())


def test_measure_ceilings_records_a_failure_as_reason():
    def failing_timer(fn):
        raise RuntimeError("no timer here")

    ceilings = measure_ceilings("cpu", timer=failing_timer, matmul_n=16, copy_bytes=4096)
    assert all(c["value"] is None and "no timer here" in c["reason"] for c in ceilings.values())


# ---- case collection and the CLI -----------------------------------------------------------------


def _selftest_family(quick):
    yield _case(name=f"{FAMILY}.small", shape={"N": 1024, "dtype": "bf16"})
    yield _case(name=f"{FAMILY}.large", shape={"N": 1 << 28, "dtype": "bf16"}, quick=False)


def _broken_family(quick):
    raise RuntimeError("generator exploded")
    yield  # pragma: no cover  (makes this a generator function)


def test_collect_cases_filters_and_records_errors():
    def invalid(quick):
        yield _case(name=f"{FAMILY}.invalid", ceiling="nope")

    generators = {FAMILY: _selftest_family, "zz_broken": _broken_family, "zz_invalid": invalid}
    selected, errors = collect_cases(generators, quick=False, only=[])
    assert [c.name for _, c in selected] == [f"{FAMILY}.small", f"{FAMILY}.large"]
    assert {e["where"] for e in errors} == {"family zz_broken", "family zz_invalid"}
    assert any("generator exploded" in e["error"] for e in errors)
    selected, _ = collect_cases(generators, quick=True, only=[])
    assert [c.name for _, c in selected] == [f"{FAMILY}.small"]
    selected, _ = collect_cases(generators, quick=False, only=["large"])
    assert [c.name for _, c in selected] == [f"{FAMILY}.large"]


def test_main_list_in_process(monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY, FAMILY, _selftest_family)
    assert main(["--list", "--only", FAMILY]) == 0
    out = capsys.readouterr().out
    assert f"{FAMILY}.small" in out and f"{FAMILY}.large" in out and "N=1024 dtype=bf16" in out
    assert "r1fast*" in out and "B @ copy" in out
    assert main(["--list", "--quick", "--only", FAMILY]) == 0
    out = capsys.readouterr().out
    assert f"{FAMILY}.small" in out and f"{FAMILY}.large" not in out
    monkeypatch.setitem(registry._REGISTRY, "zz_broken", _broken_family)
    assert main(["--list", "--only", FAMILY]) == 1  # a broken generator is reported, not hidden
    assert "generator exploded" in capsys.readouterr().out


def _run_script(args, code=None, timeout=120):
    env = dict(os.environ, COLUMNS="200")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "bench/run.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU `python bench/run.py` runs every benchmark")
def test_script_without_gpu_says_so_and_exits_0():
    proc = _run_script([])
    assert proc.returncode == 0, proc.stderr
    assert "benchmarks need a CUDA GPU" in proc.stdout


def test_script_list_shows_a_registered_case():
    # The family is registered in the child before bench/run.py runs as __main__; every real
    # family in bench/cases is listed too, so this also checks their generators need no CUDA.
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.path.insert(0, {str(REPO)!r})
        from bench.registry import Case, Impl, register

        def never():
            raise AssertionError("--list must not build inputs")

        @register({FAMILY!r})
        def cases(quick):
            yield Case(name="{FAMILY}.listed", shape={{"N": 4096, "dtype": "bf16"}}, make_inputs=never,
                       impls=[Impl("r1fast", abs, ours=True), Impl("torch-eager", abs)], flops=1e9)

        sys.argv = ["bench/run.py", "--list"]
        runpy.run_path("bench/run.py", run_name="__main__")
        """
    )
    proc = _run_script([], code=code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{FAMILY}.listed" in proc.stdout and "N=4096 dtype=bf16" in proc.stdout
    assert "1e+09 FLOP @ bf16_matmul" in proc.stdout


# ---- the timing orchestration with the CUDA calls faked (the real path is the gpu tests below) -----


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU stand-ins for the torch.cuda calls the harness makes, and a do_bench that runs fn 16 times."""
    import triton.testing

    props = dict(L2_cache_size=50 * MiB, name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    props |= dict(multi_processor_count=132, total_memory=80 * GIB)
    fakes = dict(
        is_available=lambda: True,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        memory_allocated=lambda *a: 0,
        max_memory_allocated=lambda *a: 3 * MiB,
        reset_peak_memory_stats=lambda *a: None,
        current_device=lambda: 0,
        mem_get_info=lambda *a: (80 * GIB, 80 * GIB),
        get_device_properties=lambda *a: type("Props", (), props)(),
    )
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    benched = []

    def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        assert return_mode == "median" and rep > warmup > 0
        for _ in range(16):
            for t in grad_to_none or []:
                t.grad = None
            fn()
        benched.append(grad_to_none)
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return benched


def test_time_case_rotates_sets_and_classifies_failures(fake_cuda):
    used = []

    def ours(x):
        used.append(id(x))
        (x * 2).sum().backward()

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    impls = [Impl("r1fast", ours, ours=True), Impl("oom", oom), Impl("missing", ours, available=lambda: "not here")]
    impls += [Impl("buggy", lambda x: 1 / 0), Impl("bad-available", ours, available=lambda: __import__("no_such_pkg"))]
    case = _case(make_inputs=lambda: (torch.randn(1000, requires_grad=True),), impls=impls)
    run = time_case(case, quick=True)
    assert run.set_bytes == 4000 and run.input_sets == 8  # tiny sets: rotate through the cap
    assert len(set(used)) == 8  # every set was used by the timed calls
    assert len(fake_cuda) == 1 and len(fake_cuda[0]) == 8  # each set's leaf gets its grad reset
    by = {r.name: r for r in run.results}
    assert by["r1fast"].status == "ok" and by["r1fast"].ms == 1.5 and by["r1fast"].extra_bytes == 3 * MiB
    assert by["oom"].status == "skipped" and "OutOfMemoryError" in by["oom"].reason
    assert by["missing"].status == "skipped" and by["missing"].reason == "not here"
    assert by["buggy"].status == "error" and "ZeroDivisionError" in by["buggy"].reason
    assert by["bad-available"].status == "skipped" and "no_such_pkg" in by["bad-available"].reason

    broken = time_case(_case(make_inputs=lambda: torch.zeros(3)), quick=True)
    assert all(r.status == "error" and r.reason.startswith("make_inputs: ValueError") for r in broken.results)


def test_main_runs_and_saves_with_faked_cuda(fake_cuda, monkeypatch, tmp_path, capsys):
    import bench.ceilings

    real = bench.ceilings.measure_ceilings
    tiny = lambda quick=False: real("cpu", quick=quick, timer=lambda fn: 2.0, matmul_n=64, copy_bytes=MiB)
    monkeypatch.setattr(bench.ceilings, "measure_ceilings", tiny)

    def family(quick):
        yield _case(make_inputs=lambda: (torch.randn(64),))
        mm = [Impl("r1fast", torch.mm, ours=True), Impl("eager", torch.matmul), Impl("bug", lambda a, b: 1 / 0)]
        yield _case(
            name=f"{FAMILY}.mm",
            make_inputs=lambda: (torch.randn(64, 64),) * 2,
            impls=mm,
            flops=2 * 64**3,
            bytes=None,
            ceiling="bf16_matmul",
        )

    monkeypatch.setitem(registry._REGISTRY, FAMILY, family)
    assert main(["--only", FAMILY, "--out", str(tmp_path)]) == 0  # a failing peer does not fail the run
    (json_path,) = tmp_path.glob("*.json")
    assert "_h100-80gb-hbm3_" in json_path.name and not json_path.name.endswith("_quick.json")
    report = json.loads(json_path.read_text())
    assert report["kind"] == "cases" and [c["name"] for c in report["cases"]] == [f"{FAMILY}.copy", f"{FAMILY}.mm"]
    mm = report["cases"][1]
    assert mm["floor_ms"] == pytest.approx(2.0)  # 2*64^3 FLOP at the ceiling timed at 2 ms for 2*64^3
    assert [r["status"] for r in mm["rows"]] == ["ok", "ok", "error"]
    assert mm["rows"][0]["x_floor"] == pytest.approx(0.75) and mm["rows"][0]["x_fastest_peer"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert f"{FAMILY}.mm" in out and "ZeroDivisionError" in out and "wrote" in out

    assert main(["--ceilings", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*_ceilings.json"))) == 1 and len(list(tmp_path.glob("*_ceilings.md"))) == 1
    assert main(["--only", "no-such-case-anywhere", "--no-save"]) == 2

    def failing(a, b):
        raise RuntimeError("our kernel is broken")

    monkeypatch.setitem(registry._REGISTRY, FAMILY, lambda quick: [_case(impls=[Impl("r1fast", failing, ours=True)])])
    assert main(["--only", FAMILY, "--no-save"]) == 1  # r1fast's own failure is an error exit


# ---- on a GPU: the real timing path --------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_ceilings_quick_no_save():
    proc = _run_script(["--ceilings", "--no-save", "--quick"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for expected in ("copy", "bf16_matmul", "fp8_matmul", "GB/s", "TFLOP/s"):
        assert expected in proc.stdout


def _gpu_family(quick):
    n = 2048

    def mm_inputs():
        return tuple(torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def unavailable():
        return "peer not installed (test)"

    def not_implemented(a, b):
        raise NotImplementedError("no such path")

    def crashes(a, b):
        raise RuntimeError("peer bug")

    yield Case(
        name=f"{FAMILY}.mm",
        shape={"M": n, "N": n, "K": n, "dtype": "bf16"},
        make_inputs=mm_inputs,
        impls=[
            Impl("r1fast", torch.mm, ours=True),
            Impl("fp32-upcast", lambda a, b: (a.float() @ b.float()).bfloat16()),
            Impl("missing", torch.mm, available=unavailable),
            Impl("unimplemented", not_implemented),
            Impl("crashing", crashes),
        ],
        flops=2 * n**3,
    )

    def scale_inputs():
        return (torch.randn(1 << 22, device="cuda", requires_grad=True),)

    def fwd_bwd(x):
        (x * 2.0).sum().backward()

    yield Case(
        name=f"{FAMILY}.scale_fwd_bwd",
        shape={"N": 1 << 22, "dtype": "fp32"},
        make_inputs=scale_inputs,
        impls=[Impl("r1fast", fwd_bwd, ours=True)],
        bytes=3 * 4 * (1 << 22),
        ceiling="copy",
    )


@pytest.mark.gpu
def test_gpu_fake_quick_case_end_to_end(monkeypatch, tmp_path):
    monkeypatch.setitem(registry._REGISTRY, FAMILY, _gpu_family)
    assert main(["--only", FAMILY, "--quick", "--out", str(tmp_path)]) == 0  # a crashing *peer* is not fatal
    (json_path,) = tmp_path.glob("*_quick.json")
    assert json_path.with_suffix(".md").exists()
    report = json.loads(json_path.read_text())
    assert report["meta"]["gpu"] == torch.cuda.get_device_name()
    assert all(report["ceilings"][k]["value"] for k in ("copy", "bf16_matmul"))
    mm, scale = report["cases"]
    rows = {r["impl"]: r for r in mm["rows"]}
    assert rows["r1fast"]["status"] == rows["fp32-upcast"]["status"] == "ok"
    assert rows["missing"]["status"] == "skipped" and "not installed" in rows["missing"]["reason"]
    assert rows["unimplemented"]["status"] == "skipped" and "NotImplementedError" in rows["unimplemented"]["reason"]
    assert rows["crashing"]["status"] == "error" and "peer bug" in rows["crashing"]["reason"]
    ours = rows["r1fast"]
    assert ours["ms"] > 0 and ours["x_floor"] > 0.5  # a 2048^3 matmul cannot beat the 8192^3 ceiling by 2x
    assert ours["x_fastest_peer"] == pytest.approx(ours["ms"] / rows["fp32-upcast"]["ms"])
    assert 0 < ours["extra_gib"] < 0.1  # the 8 MiB output (plus cuBLAS workspace at most)
    assert mm["input_sets"] > 1  # two 8 MiB operands fit in L2, so inputs rotate
    fb = scale["rows"][0]
    assert fb["status"] == "ok" and fb["gbps"] > 0 and fb["x_floor"] > 0.5
    assert fb["extra_gib"] * GIB >= 4 * (1 << 22)  # the gradient the call creates counts as extra


def _registered_cases():
    from bench import registry

    return {c.name: c for generate in registry.families().values() for c in generate(False)}


def test_registered_floors_equal_counts_derived_here():
    """Every reported ratio divides by these: each case's FLOPs / minimum bytes against a count written
    independently from the issues' shapes (a floor 2.67x too high went unnoticed before this test)."""
    cases = _registered_cases()

    def close(name, field, want, rel=1e-9):
        got = getattr(cases[name], field)
        assert got == pytest.approx(want, rel=rel), f"{name}.{field}: case says {got:.4g}, count is {want:.4g}"

    for tag, (n, h, v) in {"A": (16384, 3584, 152064), "B": (32768, 1536, 151936)}.items():
        close(f"grpo_loss.fwd_bwd.{tag}", "flops", 6 * n * h * v)  # logits, dlogits @ W, dlogits^T @ h
        close(f"grpo_loss.logprobs.{tag}", "flops", 2 * n * h * v)
    kv_token = 2 * 4 * 128 * 2  # K and V, 4 KV heads, D = 128, bf16
    for b, seq in ((64, 8192), (256, 4096), (16, 32768)):
        close(f"paged_attention.decode.B{b}_L{seq}", "bytes", b * seq * kv_token)
    group = "paged_attention.group_decode.P2048_G16_gen1024"
    close(group, "bytes", (16 * 2048 + 16 * 16 * 1024) * kv_token)  # each group's prompt read once
    assert cases[group].rates["effective GB"] == pytest.approx(16 * 16 * (2048 + 1024) * kv_token / 1e9)
    for kind in ("fwd", "dgrad", "wgrad"):
        for ragged in ("", ".ragged"):
            close(f"moe_gemm.{kind}.fc1{ragged}", "flops", 2 * 32768 * 4096 * 7168)
            close(f"moe_gemm.{kind}.fc2{ragged}", "flops", 2 * 32768 * 7168 * 2048)
    t, h, inter, k = 8192, 7168, 2048, 8  # fwd + dgrad + wgrad of fc1 [2I, H] and fc2 [H, I]
    close("moe_gemm.layer.fwd_bwd", "flops", 3 * (2 * t * k * h * 2 * inter + 2 * t * k * inter * h))
    hid, inter, layers, hq, hkv, d, vocab = 1536, 8960, 28, 12, 2, 128, 151936  # Qwen2.5-1.5B
    matmul_params = layers * (hid * (hq + 2 * hkv) * d + hq * d * hid + 3 * hid * inter) + vocab * hid
    for b, seq in ((2, 4096), (4, 4096)):
        causal_attention = 3 * layers * b * 2 * (2 * seq * seq * hq * d) / 2  # QK^T and PV, half masked, fwd+bwd
        close(f"model.train_fwd_bwd.qwen2.5-1.5b.{b}x{seq}", "flops", 6 * b * seq * matmul_params + causal_attention)
        assert cases[f"model.train_fwd_bwd.qwen2.5-1.5b.{b}x{seq}"].rates == {"tokens": b * seq}
    weight_bytes = 2 * (layers * (hid * (hq + 2 * hkv) * d + (hq + 2 * hkv) * d + hq * d * hid + 3 * hid * inter
                                  + 2 * hid) + vocab * hid + hid)
    kv_token = layers * 2 * hkv * d * 2
    for p, g, new in ((16, 16, 512), (64, 16, 1024), (4, 16, 128)):
        # the weights once per forward (prefill, which yields the first token, then new - 1 decode steps);
        # each decode step reads every group's prompt KV once (cascade) and each sample's own tokens so far
        steps = new - 1
        reads = new * weight_bytes + steps * p * 256 * kv_token + p * g * kv_token * sum(range(1, new))
        close(f"rollout.qwen2.5-1.5b.{p}x{g}x{new}", "bytes", reads, rel=5e-3)
        assert cases[f"rollout.qwen2.5-1.5b.{p}x{g}x{new}"].rates == {"tokens": p * g * new}


def test_rates_and_ratios_are_printed_as_the_issues_state_targets():
    rows = impl_rows([ImplResult("r1fast", True, "ok", ms=4000.0), ImplResult("hf", False, "ok", ms=50000.0)],
                     flops=None, bytes_=2e12, floor=1000.0, rates={"tokens": 131072})
    assert rows[0]["rates"] == {"tokens/s": pytest.approx(32768.0)}
    assert fmt_throughput(rows[0]) == "500 GB/s, 32,768 tokens/s"
    assert fmt_floor_ratio(rows[0]["x_floor"]) == "4.00× (25%)"  # a quarter of the roofline
    assert fmt_peer_ratio(rows[0]["x_fastest_peer"]) == "0.08× (12.5× faster)"
    assert fmt_peer_ratio(1.5) == "1.50×" and fmt_floor_ratio(None) == fmt_peer_ratio(None) == "—"


def test_only_that_matches_nothing_exits_2_even_without_a_gpu(capsys):
    assert main(["--list", "--only", "grpo_los_typo"]) == 2
    assert main(["--only", "grpo_los_typo"]) == 2  # on this CPU machine: before "needs a CUDA GPU"
    assert "no case matches --only grpo_los_typo" in capsys.readouterr().out


def test_an_unusable_out_fails_before_anything_is_timed(fake_cuda, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["--only", "grpo_loss.logprobs.A", "--out", str(blocker / "results")]) == 2
    assert "cannot create the results folder" in capsys.readouterr().out
    assert fake_cuda == []  # do_bench never ran
