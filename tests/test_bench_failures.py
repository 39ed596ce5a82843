"""How ``bench/run.py`` reports failures: a crashing case, a poisoned CUDA context, r1fast's own
exceptions, error text with markup characters, errors on a machine without CUDA, selections that
--quick empties, and the release of cached models after each family."""

import json

import pytest
import torch
from bench_testing import FAMILY, install_fake_cuda, make_case, tiny_ceilings

from bench import registry
from bench.registry import Impl
from bench.run import main
from bench.timing import classify_failure


@pytest.fixture
def fake_run(monkeypatch):
    """Faked CUDA and ceilings; returns the dict whose "on" poisons the context."""
    poisoned = {"on": False}
    install_fake_cuda(monkeypatch, poisoned)
    tiny_ceilings(monkeypatch)
    return poisoned


def _three_cases(middle_inputs, middle_impls):
    def family(quick):
        yield make_case(name=f"{FAMILY}.first", make_inputs=lambda: (torch.randn(64),))
        yield make_case(name=f"{FAMILY}.crashing", make_inputs=middle_inputs, impls=middle_impls)
        yield make_case(name=f"{FAMILY}.third", make_inputs=lambda: (torch.randn(64),))

    return family


def _report(tmp_path) -> dict:
    (json_path,) = tmp_path.glob("*.json")
    return json.loads(json_path.read_text())


def test_a_later_make_inputs_failure_is_that_cases_error_and_the_run_goes_on(fake_run, monkeypatch, tmp_path):
    calls = {"n": 0}

    def flaky():  # the first set builds, the second (a rotation set) raises: time_case lets it escape
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("misaligned address [/x] in set 2")
        return (torch.randn(64),)

    monkeypatch.setitem(registry._REGISTRY, FAMILY, _three_cases(flaky, [Impl("r1fast", lambda x: x, ours=True)]))
    assert main(["--only", FAMILY, "--out", str(tmp_path)]) == 1
    report = _report(tmp_path)
    assert [c["name"] for c in report["cases"]] == [f"{FAMILY}.first", f"{FAMILY}.crashing", f"{FAMILY}.third"]
    assert "incomplete" not in report
    crashed = report["cases"][1]["rows"][0]
    assert crashed["status"] == "error" and "misaligned address [/x]" in crashed["reason"]
    assert [e["where"] for e in report["errors"]] == [f"{FAMILY}.crashing"]  # once, not also as "r1fast raised"
    assert report["cases"][2]["rows"][0]["status"] == "ok"  # CUDA was still usable: the next case ran


def test_a_poisoned_cuda_context_stops_the_run_cleanly(fake_run, monkeypatch, tmp_path, capsys):
    def poison(x):
        fake_run["on"] = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    impls = [Impl("r1fast", poison, ours=True), Impl("peer", lambda x: x)]
    monkeypatch.setitem(registry._REGISTRY, FAMILY, _three_cases(lambda: (torch.randn(64),), impls))
    assert main(["--only", FAMILY, "--out", str(tmp_path)]) == 1
    report = _report(tmp_path)
    assert "incomplete" not in report and len(report["cases"]) == 3
    assert all(r["status"] == "error" for r in report["cases"][1]["rows"])
    third = report["cases"][2]["rows"][0]
    assert third["status"] == "error" and third["reason"].startswith("not run: CUDA unusable")
    assert any("CUDA unusable after this case" in e["error"] for e in report["errors"])
    assert "illegal memory access" in capsys.readouterr().out


@pytest.mark.parametrize(
    "exc",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37 GiB"),
     ImportError("No module named 'r1fast.kernels.moe_layer_renamed'"),
     NotImplementedError("no Triton path for this shape")],
)
def test_r1fast_own_failure_is_an_error_never_a_skip(fake_run, monkeypatch, tmp_path, exc):
    def ours(x):
        raise exc

    case = make_case(make_inputs=lambda: (torch.randn(64),), impls=[Impl("r1fast", ours, ours=True),
                                                                     Impl("peer", ours)])
    monkeypatch.setitem(registry._REGISTRY, FAMILY, lambda quick: [case])
    assert main(["--only", FAMILY, "--out", str(tmp_path)]) == 1
    ours_row, peer_row = _report(tmp_path)["cases"][0]["rows"]
    assert ours_row["status"] == "error" and type(exc).__name__ in ours_row["reason"]
    assert peer_row["status"] == "skipped"  # the same exception from a peer is a property of the peer
    assert classify_failure(exc, ours=True)[0] == "error" and classify_failure(exc)[0] == "skipped"


def test_error_text_is_printed_verbatim_not_as_markup(fake_run, monkeypatch, tmp_path, capsys):
    def ours(x):
        raise RuntimeError("prefix rows [/group] do not match [cudaErrorIllegalAddress]")

    monkeypatch.setitem(registry._REGISTRY, FAMILY,
                        lambda quick: [make_case(make_inputs=lambda: (torch.randn(64),),
                                                 impls=[Impl("r1fast", ours, ours=True)])])
    assert main(["--only", FAMILY, "--out", str(tmp_path)]) == 1  # MarkupError used to escape before the save
    assert "incomplete" not in _report(tmp_path)
    assert "[/group] do not match [cudaErrorIllegalAddress]" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")
def test_without_cuda_case_errors_are_printed_and_fail_the_run(monkeypatch, capsys):
    def broken(quick):
        raise RuntimeError("generator exploded")
        yield  # pragma: no cover

    monkeypatch.setitem(registry._REGISTRY, "zz_broken", broken)
    assert main([]) == 1
    out = capsys.readouterr().out
    assert "generator exploded" in out and "benchmarks need a CUDA GPU" in out


def test_quick_only_naming_a_non_quick_case_says_so(monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY, FAMILY,
                        lambda quick: [make_case(name=f"{FAMILY}.big", quick=False)])
    assert main(["--quick", "--only", f"{FAMILY}.big"]) == 2
    out = capsys.readouterr().out
    assert f"{FAMILY}.big" in out and "not quick" in out and "no case matches" not in out
    assert main(["--not-quick", "--only", f"{FAMILY}.big", "--list"]) == 0  # --not-quick selects it


def test_each_family_releases_its_cached_models_before_the_next(fake_run, monkeypatch, tmp_path):
    order = []
    monkeypatch.setitem(registry._REGISTRY, f"{FAMILY}_a",
                        lambda quick: [make_case(name=f"{FAMILY}_a.one", make_inputs=lambda: order.append("a") or
                                                 (torch.randn(8),))])
    monkeypatch.setitem(registry._REGISTRY, f"{FAMILY}_b",
                        lambda quick: [make_case(name=f"{FAMILY}_b.one", make_inputs=lambda: order.append("b") or
                                                 (torch.randn(8),))])
    monkeypatch.setitem(registry._RELEASE, f"{FAMILY}_a", lambda: order.append("release a"))
    assert main(["--only", FAMILY, "--no-save"]) == 0
    assert order.index("release a") < order.index("b")
    import bench.cases.model as model_cases
    import bench.cases.rollout as rollout_cases

    assert registry._RELEASE["model"] is model_cases.release and registry._RELEASE["rollout"] is rollout_cases.release
    model_cases._MODELS["r1fast"] = object()
    registry.release("model")
    assert model_cases._MODELS == {}
