"""Benchmark-harness names, metadata and result files: stems, git commit, markdown, JSON round trip, ceilings."""

import json
import subprocess

import pytest
from bench_testing import FAMILY, REPO, MiB, make_case

from bench import registry
from bench.ceilings import measure_ceilings
from bench.results_io import (
    environment_metadata,
    git_commit,
    gpu_slug,
    render_markdown,
    results_stem,
    unique_stem,
    write_report,
)
from bench.rows import (
    GIB,
    ImplResult,
)
from bench.run import case_record
from bench.timing import (
    CaseRun,
)

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
    case = make_case(name=f"{FAMILY}.mm|odd", flops=2e12, bytes=None, ceiling="bf16_matmul", notes="counts the grad")
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
    # fp8: both accumulations timed where this torch runs _scaled_mm
    assert set(ceilings) == set(registry.CEILINGS) and len(calls) == (4 if ceilings["fp8_matmul"]["value"] else 2)
    assert ceilings["copy"]["value"] == pytest.approx(2 * MiB / 2e-3 / 1e9)
    assert ceilings["bf16_matmul"]["value"] == pytest.approx(2 * 32**3 / 2e-3 / 1e12)
    fp8 = ceilings["fp8_matmul"]
    assert fp8["value"] == pytest.approx(2 * 32**3 / 2e-3 / 1e12) or fp8["reason"]
    assert all(c["unit"] in ("GB/s", "TFLOP/s") and c["ms"] in (2.0, None) for c in ceilings.values())


def test_fp8_ceiling_is_the_faster_accumulation(monkeypatch):
    """The hardware's peak (fast accumulation on an H100) is the ceiling, not cuBLAS' fp32-promoted default."""
    import torch

    from bench.ceilings import measure_fp8_matmul

    modes = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, use_fast_accum=False, **k: modes.append(use_fast_accum))
    for fast_ms, promoted_ms, winner in ((1.0, 2.0, "fast"), (3.0, 2.0, "fp32-promoted")):
        def timer(fn, fast_ms=fast_ms, promoted_ms=promoted_ms):
            fn()
            return fast_ms if modes[-1] else promoted_ms

        entry = measure_fp8_matmul("cpu", timer, n=16)
        assert entry["ms"] == min(fast_ms, promoted_ms) and entry["what"].endswith(f", {winner} accumulation")
        assert entry["value"] == pytest.approx(2 * 16**3 / (entry["ms"] * 1e-3) / 1e12)
    assert set(modes) == {False, True}


def test_measure_ceilings_records_a_failure_as_reason():
    def failing_timer(fn):
        raise RuntimeError("no timer here")

    ceilings = measure_ceilings("cpu", timer=failing_timer, matmul_n=16, copy_bytes=4096)
    assert all(c["value"] is None and "no timer here" in c["reason"] for c in ceilings.values())


def test_metadata_records_the_peers_versions(monkeypatch):
    """A peer's ratio is only comparable with the peer's version (ANCHORS.md names Liger-Kernel 0.8.5)."""
    from bench import results_io

    versions = {"liger-kernel": "0.8.5", "transformers": "5.17.0"}

    def fake_version(dist):
        if dist in versions:
            return versions[dist]
        if dist == "triton":
            return "3.6.0"
        raise results_io.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(results_io.metadata, "version", fake_version)
    meta = environment_metadata()
    assert meta["liger-kernel"] == "0.8.5" and meta["transformers"] == "5.17.0"
    del versions["liger-kernel"]
    assert environment_metadata()["liger-kernel"] == "not installed"
