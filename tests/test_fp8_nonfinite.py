"""FP8 quantizers on non-finite input: what a NaN or an inf does to its tile, identically on the Triton
kernels and the PyTorch reference (bytes bit for bit, scales equal with NaN == NaN).

The contract (kernels/fp8.py's module docstring): a NaN makes its tile's scale NaN and every byte of the tile
E4M3's NaN 0x7F; an inf makes the scale inf, the inf's byte 0x7F and the tile's finite values +-0, so the whole
tile dequantizes to NaN (0 * inf). Both also with ``power_of_two``, whose round-up bit trick once turned a NaN
scale into -0.0 (the tile's 127 finite values then dequantized to -0, invisible to an isfinite(scale) check).
"""

import pytest
import torch

from r1fast.kernels import fp8, ref_fp8

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",  # inf / inf, NaN / NaN
                                        "ignore:divide by zero encountered:RuntimeWarning")  # the interpreter's numpy

NAN_BYTE = 0x7F
"""The one NaN byte both paths write: PyTorch's cast of a positive NaN. x86's inf / inf is a *negative* NaN,
which PyTorch's cast alone makes 0xFF (the reference did, the kernel wrote 0x7F)."""


def _poisoned(shape, dtype=torch.float32) -> torch.Tensor:
    """Random values with a NaN, a negative NaN, +inf and -inf, each alone in its own 1x128 tile and in its own
    128-row column tile; the negative NaN's column tile is the ragged last one (rows 128..139 of 256)."""
    x = torch.randn(shape)
    x[1, 3], x[135, 140] = float("nan"), -float("nan")
    x[130, 200], x[5, 259] = float("inf"), -float("inf")
    return x.to(dtype)


def _assert_same(got: tuple, want: tuple) -> None:
    """fp8 outputs equal byte for byte, every NaN byte the canonical one; scales equal, NaN == NaN."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype == torch.float8_e4m3fn:
            gb, wb = g.view(torch.uint8), w.view(torch.uint8)
            assert int((gb != wb).sum()) == 0
            assert torch.all(gb[g.float().isnan()] == NAN_BYTE)
        else:
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def _padded_storage(qt: torch.Tensor) -> torch.Tensor:
    """qt [K, M] with the whole 128-token tiles of the storage it is a view of (the wgrad GEMM reads them)."""
    return qt.as_strided((qt.shape[0], qt.stride(0)), (qt.stride(0), 1))


@pytest.mark.parametrize("power_of_two", [False, True])
def test_nonfinite_tiles_match_the_reference_bit_for_bit(monkeypatch, power_of_two):
    x = _poisoned((140, 260))
    w = _poisoned((140, 260), torch.bfloat16)
    groups = torch.tensor([3, 128, 9], dtype=torch.int32)  # NaN in group 0, -inf and inf in 1, -NaN in 2
    outs = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("R1FAST_KERNELS", backend)
        dual = fp8.quantize_fp8_1x128_dual(x, power_of_two=power_of_two)
        outs[backend] = (fp8.quantize_fp8_1x128(x, power_of_two=power_of_two), dual,
                         (_padded_storage(dual[2]),),
                         fp8.quantize_fp8_128x1(x, power_of_two=power_of_two, group_sizes=groups),
                         fp8.quantize_fp8_1x128_dual(x, power_of_two=power_of_two, group_sizes=groups),
                         fp8.quantize_fp8_128x128(w, power_of_two=power_of_two),
                         fp8.quantize_fp8_128x128(w.view(2, 70, 260), power_of_two=power_of_two))
    for got, want in zip(outs["auto"], outs["torch"], strict=True):
        _assert_same(got, want)
    # the kernel path's reference is the public reference: the same bytes as quantize_fp8_1x128 of x and x.T
    _assert_same(outs["auto"][0], ref_fp8.quantize_fp8_1x128(x, power_of_two=power_of_two))
    _assert_same(outs["auto"][1][2:], ref_fp8.quantize_fp8_1x128(x.t(), power_of_two=power_of_two))
    _assert_same(outs["auto"][5], ref_fp8.quantize_fp8_128x128(w, power_of_two=power_of_two))


@pytest.mark.parametrize("power_of_two", [False, True])
def test_a_nan_or_inf_poisons_exactly_its_tile(power_of_two):
    """Kernel path: every tile holding a NaN or an inf dequantizes to NaN in full, its scale NaN (a NaN) or
    inf (an inf); every other tile is finite."""
    x = _poisoned((140, 260))
    q, s, qt, st = fp8.quantize_fp8_1x128_dual(x, power_of_two=power_of_two)
    tiles = torch.tensor([[1, 0], [135, 1], [130, 1], [5, 2]])  # (row, column tile) of the four values
    assert s[tiles[:2, 0], tiles[:2, 1]].isnan().all() and s[tiles[2:, 0], tiles[2:, 1]].isinf().all()
    bad_rows = torch.zeros_like(s, dtype=torch.bool)
    bad_rows[tiles[:, 0], tiles[:, 1]] = True
    assert s[~bad_rows].isfinite().all()
    dq = fp8.dequantize_fp8(q, s, (1, 128))
    assert torch.equal(dq.isnan(), bad_rows.repeat_interleave(128, dim=1)[:, :260])
    # the inf tiles: the inf itself is the NaN byte, the tile's finite values +-0 (sign kept)
    row = q[130, 128:256].view(torch.uint8)
    assert row[200 - 128] == NAN_BYTE and torch.all((row[torch.arange(128) != 72] & 0x7F) == 0)
    # the 128x1 tiling: (column, token tile) of the NaN, -NaN, inf, -inf
    cols = torch.tensor([[3, 0], [140, 1], [200, 1], [259, 0]])
    assert st[cols[:2, 0], cols[:2, 1]].isnan().all() and st[cols[2:, 0], cols[2:, 1]].isinf().all()
    bad_cols = torch.zeros_like(st, dtype=torch.bool)
    bad_cols[cols[:, 0], cols[:, 1]] = True
    assert st[~bad_cols].isfinite().all()
    assert torch.equal(fp8.dequantize_fp8(qt, st, (1, 128)).isnan(), bad_cols.repeat_interleave(128, dim=1)[:, :140])


@pytest.mark.parametrize("quantize", [ref_fp8.quantize_fp8_1x128, fp8.quantize_fp8_1x128,
                                      ref_fp8.quantize_fp8_128x128, fp8.quantize_fp8_128x128],
                         ids=["reference-1x128", "kernel-1x128", "reference-128x128", "kernel-128x128"])
def test_power_of_two_scale_of_a_nan_tile_stays_nan(quantize):
    """The probe's case: one NaN among 127 finite values, power_of_two=True -> scale NaN (was -0.0)."""
    x = torch.randn(128, 128)
    x[3, 7] = float("nan")
    q, s = quantize(x, power_of_two=True)
    assert s[3 if s.shape[0] == 128 else 0].isnan().all()
    assert q[3].float().isnan().all()
    # a finite scale still rounds up to a power of two, and an inf scale stays inf (its mantissa is zero)
    x[3, 7] = float("inf")
    _, s = quantize(x, power_of_two=True)
    assert s.isinf().sum() == 1 and torch.all(torch.frexp(s[s.isfinite()]).mantissa == 0.5)
