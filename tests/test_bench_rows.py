"""Benchmark-harness arithmetic with fake timings: floors, ratios, L2 rotation, row and rate formatting."""

import pytest
import torch
from bench_testing import MiB, make_case

from bench.registry import Impl
from bench.rows import (
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
from bench.timing import (
    _unique_bytes,
    as_input_set,
    classify_failure,
    rotation_count,
    tensors_in,
)

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
    validate_case(make_case())
    with pytest.raises(ValueError, match=message):
        validate_case(make_case(**change))


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




def test_rates_and_ratios_are_printed_as_the_issues_state_targets():
    rows = impl_rows([ImplResult("r1fast", True, "ok", ms=4000.0), ImplResult("hf", False, "ok", ms=50000.0)],
                     flops=None, bytes_=2e12, floor=1000.0, rates={"tokens": 131072})
    assert rows[0]["rates"] == {"tokens/s": pytest.approx(32768.0)}
    assert fmt_throughput(rows[0]) == "500 GB/s, 32,768 tokens/s"
    assert fmt_floor_ratio(rows[0]["x_floor"]) == "4.00× (25%)"  # a quarter of the roofline
    assert fmt_peer_ratio(rows[0]["x_fastest_peer"]) == "0.08× (12.5× faster)"
    assert fmt_peer_ratio(1.5) == "1.50×" and fmt_floor_ratio(None) == fmt_peer_ratio(None) == "—"


CEILINGS = {"copy": 2000.0, "bf16_matmul": 500.0, "fp8_matmul": 1000.0}


def test_copy_ceiling_floor_ignores_flops():
    """A bandwidth-bound case (ceiling='copy') is floored by its bytes alone: its FLOPs are never divided by
    a GB/s number as if it were TFLOP/s."""
    assert floor_ms(4e12, 1e9, "copy", CEILINGS) == pytest.approx(1e9 / 2000e9 * 1e3)
    assert floor_ms(4e12, None, "copy", CEILINGS) is None
    # a matmul ceiling with both: the larger bound wins
    assert floor_ms(1e12, 1e9, "bf16_matmul", CEILINGS) == pytest.approx(max(1e12 / 500e12, 1e9 / 2000e9) * 1e3)
