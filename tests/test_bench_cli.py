"""Benchmark-harness case collection and CLI: in process, as a real ``python bench/run.py``
subprocess, with the CUDA calls faked, and (``gpu`` tests) on a real GPU."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from bench_testing import FAMILY, REPO, MiB, install_fake_cuda, make_case, tiny_ceilings

from bench import registry
from bench.registry import Case, Impl
from bench.rows import (
    GIB,
)
from bench.run import collect_cases, main
from bench.timing import (
    time_case,
)

# ---- case collection and the CLI -----------------------------------------------------------------


def _selftest_family(quick):
    yield make_case(name=f"{FAMILY}.small", shape={"N": 1024, "dtype": "bf16"})
    yield make_case(name=f"{FAMILY}.large", shape={"N": 1 << 28, "dtype": "bf16"}, quick=False)


def _broken_family(quick):
    raise RuntimeError("generator exploded")
    yield  # pragma: no cover  (makes this a generator function)


def test_collect_cases_filters_and_records_errors():
    def invalid(quick):
        yield make_case(name=f"{FAMILY}.invalid", ceiling="nope")

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
    return install_fake_cuda(monkeypatch)


def test_time_case_rotates_sets_and_classifies_failures(fake_cuda):
    used = []

    def ours(x):
        used.append(id(x))
        (x * 2).sum().backward()

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    impls = [Impl("r1fast", ours, ours=True), Impl("oom", oom), Impl("missing", ours, available=lambda: "not here")]
    impls += [Impl("buggy", lambda x: 1 / 0), Impl("bad-available", ours, available=lambda: __import__("no_such_pkg"))]
    case = make_case(make_inputs=lambda: (torch.randn(1000, requires_grad=True),), impls=impls)
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

    broken = time_case(make_case(make_inputs=lambda: torch.zeros(3)), quick=True)
    assert all(r.status == "error" and r.reason.startswith("make_inputs: ValueError") for r in broken.results)


def test_main_runs_and_saves_with_faked_cuda(fake_cuda, monkeypatch, tmp_path, capsys):
    tiny_ceilings(monkeypatch)

    def family(quick):
        yield make_case(make_inputs=lambda: (torch.randn(64),))
        mm = [Impl("r1fast", torch.mm, ours=True), Impl("eager", torch.matmul), Impl("bug", lambda a, b: 1 / 0)]
        yield make_case(
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

    monkeypatch.setitem(registry._REGISTRY, FAMILY, lambda quick: [make_case(impls=[Impl("r1fast", failing, ours=True)])])
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


def test_a_run_killed_mid_way_keeps_the_cases_it_finished(fake_cuda, monkeypatch, tmp_path):
    """The lent GPU machines kill a call at 10 minutes: the files are rewritten after every case, and
    the finished run's files (same name, no ``-2``) drop the ``incomplete`` mark."""
    tiny_ceilings(monkeypatch)

    def killed(x):
        raise KeyboardInterrupt  # what the time limit's signal looks like to the harness: not an impl error

    def family(quick):
        yield make_case(name=f"{FAMILY}.first", make_inputs=lambda: (torch.randn(64),))
        yield make_case(name=f"{FAMILY}.second", make_inputs=lambda: (torch.randn(64),),
                        impls=[Impl("r1fast", killed, ours=True)])

    monkeypatch.setitem(registry._REGISTRY, FAMILY, family)
    with pytest.raises(KeyboardInterrupt):
        main(["--only", FAMILY, "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert [c["name"] for c in report["cases"]] == [f"{FAMILY}.first"]
    assert report["incomplete"] == {"done": 1, "of": 2}
    assert "**Incomplete**: the run stopped after 1 of 2 cases" in json_path.with_suffix(".md").read_text()

    monkeypatch.setitem(registry._REGISTRY, FAMILY,
                        lambda quick: [make_case(name=f"{FAMILY}.first", make_inputs=lambda: (torch.randn(64),))])
    assert main(["--only", FAMILY, "--out", str(tmp_path)]) == 0
    (finished,) = tmp_path.glob("*-2.json")  # the killed run's files stay as they were
    assert "incomplete" not in json.loads(finished.read_text())
    assert len(list(tmp_path.glob("*.json"))) == 2  # one pair per run, however many cases were saved
