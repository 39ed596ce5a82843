"""The cost-aware timing rule, the run's time plan and the GPU session's split into device calls, and
the commit a result is named after when the device machine has no .git."""

import re
import time

import pytest
import torch
from bench_testing import FAMILY, REPO, install_fake_cuda, make_case

import bench.timing as timing
from bench import plan, registry
from bench.plan import CALL_LIMIT_S, PART_LIMIT_S, PARTS, RUN_OVERHEAD_S, case_seconds, run_seconds
from bench.registry import Impl
from bench.results_io import UNKNOWN_COMMIT, report_stem, run_commit
from bench.run import collect_cases, load_families, main, parse_args
from bench.timing import FULL_BUDGET, MIN_SAMPLES, QUICK_BUDGET, timing_plan


def test_timing_plan_bounds_long_calls_and_samples_short_ones():
    generate = timing_plan(55.5e3, FULL_BUDGET)  # ANCHORS: transformers generate, 16 x 16 x 512
    assert generate["method"] == "direct" and generate["samples"] == 2 and generate["calls"] == 3
    assert generate["calls"] * 55.5 < CALL_LIMIT_S - 200  # was >= 10 calls = 555 s: never fit a device call
    assert timing_plan(55.5e3, QUICK_BUDGET)["samples"] == 1
    assert timing_plan(400e3, FULL_BUDGET)["samples"] == 1  # never zero
    assert timing_plan(300, QUICK_BUDGET) == {"method": "direct", "rep": None, "samples": MIN_SAMPLES,
                                              "calls": 1 + MIN_SAMPLES}
    for call_ms in (0.01, 2.0, 85.0 * 0.99):
        for budget in (QUICK_BUDGET, FULL_BUDGET):
            plan = timing_plan(call_ms, budget)
            assert plan["method"] == "do_bench" and plan["rep"] >= 1.5 * MIN_SAMPLES * call_ms  # >= 5 samples
            assert plan["rep"] >= budget["rep"]
    with pytest.raises(ValueError, match="call_ms"):
        timing_plan(0.0, FULL_BUDGET)


def test_do_bench_gets_a_rep_long_enough_for_five_samples(monkeypatch):
    seen = []
    install_fake_cuda(monkeypatch)

    def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="median"):
        seen.append(rep)
        return 12.0

    result = timing._time_impl(Impl("t", lambda x: time.sleep(0.012)), [(torch.zeros(1),)], [], QUICK_BUDGET,
                               do_bench)
    assert result.status == "ok" and result.ms == 12.0 and "do_bench" in result.timing
    assert seen and seen[0] >= MIN_SAMPLES * 12  # was the budget's 40 ms: 3 samples of a 12 ms call


def test_long_calls_are_timed_directly_with_a_median(monkeypatch):
    install_fake_cuda(monkeypatch)
    monkeypatch.setattr(timing, "LONG_CALL_MS", 5.0)
    monkeypatch.setattr(timing, "SLOW_CALL_MS", 10.0)
    durations = iter([0.02, 0.02, 0.05, 0.021, 0.2])  # warmup, memory call (sample 1), two more samples
    calls = []

    def slow(x):
        calls.append(x)
        time.sleep(next(durations))

    def no_do_bench(*a, **k):
        raise AssertionError("a call over LONG_CALL_MS must not go through do_bench")

    budget = dict(QUICK_BUDGET, long_s=0.1)  # 100 ms of samples at ~20 ms a call: 3 (the cap) samples
    result = timing._time_impl(Impl("t", slow), [(torch.zeros(1),), (torch.ones(1),)], [], budget, no_do_bench)
    assert result.status == "ok" and len(calls) == 4 and result.timing == "median of 3 direct calls"
    assert 19 <= result.ms < 35  # the median of ~20, ~50, ~21 ms (their mean is 30, the 4th sample 200)
    assert {float(x[0]) for x in calls[2:]} == {0.0, 1.0}  # the extra samples rotate through the input sets


def _part_cases(part):
    args = parse_args(["--part", part])
    selected, errors = collect_cases(load_families()[0], quick=args.quick, only=args.only,
                                     not_quick=args.not_quick)
    assert not errors
    return args, [case for _, case in selected]


def test_every_case_is_timed_in_exactly_one_part_that_fits_a_device_call():
    every = [case.name for gen in load_families()[0].values() for case in gen(False)]
    seen = []
    for part in PARTS:
        args, cases = _part_cases(part)
        estimate = run_seconds(cases, args.quick)
        assert estimate <= PART_LIMIT_S, f"part {part}: {estimate:.0f} s estimated"
        seen += [case.name for case in cases]
    assert sorted(seen) == sorted(every)  # issue targets (grpo B, dgrad, model 4x4096, rollout) included
    rollout = next(c for c in _part_cases("bench-rollout")[1] if c.name.endswith("16x16x512"))
    assert case_seconds(rollout, False) + RUN_OVERHEAD_S < CALL_LIMIT_S
    assert "transformers-generate" in [impl.name for impl in rollout.impls]


def test_gpu_checks_script_runs_every_part():
    script = (REPO / "bench" / "gpu_checks.sh").read_text()
    usage = re.search(r'PARTS="([^"]+)"', script).group(1).split("|")
    assert set(PARTS) <= set(usage) and {"tests", "train"} <= set(usage)
    assert "--part" in script and "--ceilings" not in script  # the quick run measures the ceilings once


def test_plan_is_printed_and_estimates_must_name_real_impls(monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY, FAMILY, lambda quick: [
        make_case(name=f"{FAMILY}.a", est_call_s={"r1fast": 20.0}),
        make_case(name=f"{FAMILY}.typo", est_call_s={"r1fastt": 1.0})])
    assert main(["--list", "--only", FAMILY]) == 1
    out = capsys.readouterr().out
    assert "plan: 1 case(s), estimated" in out and "est_call_s names no implementation" in out


def test_commit_comes_from_git_then_the_environment_then_says_unknown(tmp_path, monkeypatch):
    commit, source = run_commit()
    assert source == "git" and commit  # this checkout
    monkeypatch.setenv("R1FAST_COMMIT", "abc1234")
    assert run_commit(tmp_path) == ("abc1234", "R1FAST_COMMIT (no git checkout here; uncommitted changes unknown)")
    monkeypatch.delenv("R1FAST_COMMIT")
    commit, source = run_commit(tmp_path)
    assert commit == UNKNOWN_COMMIT and source.startswith("unknown: no git checkout")


def test_each_part_writes_files_of_its_own_name(tmp_path):
    meta = {"date": "2026-11-24", "gpu": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}
    names = {report_stem({"kind": "quick" if part == "bench" else "cases", "meta": dict(meta, part=part)}, tmp_path)
             for part in PARTS}
    assert names == {"2026-11-24_h100-80gb-hbm3_abc1234_quick", "2026-11-24_h100-80gb-hbm3_abc1234_bench-full",
                     "2026-11-24_h100-80gb-hbm3_abc1234_bench-rollout"}


def test_time_plan_uses_floor_factor_without_an_estimate():
    """An implementation without est_call_s is planned at FLOOR_FACTOR x its floor at ANCHORS' ceilings."""
    case = registry.Case(name="x.y", shape={}, make_inputs=lambda: (), impls=[Impl("r1fast", lambda: None, ours=True),
                Impl("peer", lambda: None)], flops=6.97e12, ceiling="bf16_matmul", est_call_s={"peer": 0.25})
    floor_s = 6.97e12 / (plan.ANCHOR_CEILINGS["bf16_matmul"] * 1e12)
    assert plan.FLOOR_FACTOR == 3.0
    assert plan.call_seconds(case, case.impls[0]) == pytest.approx(plan.FLOOR_FACTOR * floor_s)
    assert plan.call_seconds(case, case.impls[1]) == 0.25
