"""FP8 quantizers (kernels/fp8.py) vs their PyTorch references: bytes and scales equal bit for bit."""

import pytest
import torch

from r1fast.kernels import fp8, ref_fp8


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of differing fp8 bytes (0 when identical)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float8_e4m3fn
    return int((a.view(torch.uint8) != b.view(torch.uint8)).sum())


def _wide_range(shape, dtype):
    """Normal values spread over 9 decades per row, so tiles hit normals, subnormals and the clamp."""
    return (torch.randn(shape) * torch.logspace(-6, 3, shape[-1])).to(dtype)


@pytest.mark.parametrize(
    "shape,dtype,power_of_two",
    [((37, 300), torch.bfloat16, False), ((130, 256), torch.float32, True), ((5, 7), torch.float32, False)],
)
def test_quantize_1x128_matches_reference(shape, dtype, power_of_two):
    x = _wide_range(shape, dtype)
    q, s = fp8.quantize_fp8_1x128(x, power_of_two=power_of_two)
    rq, rs = ref_fp8.quantize_fp8_1x128(x, power_of_two=power_of_two)
    assert s.shape == (shape[0], -(-shape[1] // 128))
    assert _same_bytes(q, rq) == 0
    assert torch.equal(s, rs)


@pytest.mark.parametrize("power_of_two", [False, True])
def test_dual_tiling_equals_1x128_of_transpose(power_of_two):
    x = _wide_range((150, 200), torch.bfloat16)
    q, s, qt, st = fp8.quantize_fp8_1x128_dual(x, power_of_two=power_of_two)
    rq, rs = ref_fp8.quantize_fp8_1x128(x, power_of_two=power_of_two)
    rqt, rst = ref_fp8.quantize_fp8_1x128(x.t(), power_of_two=power_of_two)
    assert _same_bytes(q, rq) == 0 and torch.equal(s, rs)
    assert qt.shape == (200, 150) and st.shape == (200, 2)
    assert _same_bytes(qt, rqt) == 0 and torch.equal(st, rst)
    qt_only, st_only = fp8.quantize_fp8_128x1(x, power_of_two=power_of_two)
    assert _same_bytes(qt_only, rqt) == 0 and torch.equal(st_only, rst)


@pytest.mark.parametrize("power_of_two", [False, True])
def test_grouped_128x1_tiles_never_mix_groups(power_of_two):
    """With group_sizes the 128x1 tiles restart at every group: the result is each group's own 128x1 tiling,
    placed at 128 * (tiles of the groups before it), zeros elsewhere (built here group by group)."""
    sizes = [0, 1, 129, 130, 0, 5]
    x = _wide_range((sum(sizes), 200), torch.bfloat16)
    x[0] *= 1e4  # the one-row group's outlier would set its neighbours' scales in a shared tile
    groups = torch.tensor(sizes, dtype=torch.int32)
    q, s, qt, st = fp8.quantize_fp8_1x128_dual(x, power_of_two=power_of_two, group_sizes=groups)
    rq, rs = ref_fp8.quantize_fp8_1x128(x, power_of_two=power_of_two)
    assert _same_bytes(q, rq) == 0 and torch.equal(s, rs)  # the 1x128 tiling does not depend on groups
    tiles = 3 + len(sizes)  # ceil(265 / 128) + E: the layout's upper bound, no host sync to size it
    assert qt.shape == (200, 128 * tiles) and st.shape == (200, tiles)
    want_q = torch.zeros(200, 128 * tiles, dtype=torch.float8_e4m3fn)
    want_s = torch.full((200, tiles), 1e-4 / 448)  # empty tiles: zeros with the floor's scale
    row, tile = 0, 0
    for size in sizes:
        for start in range(0, size, 128):
            part = x[row + start:row + min(size, start + 128)]
            gq, gs = ref_fp8.quantize_fp8_1x128(part.t(), power_of_two=power_of_two)
            want_q[:, 128 * tile:128 * tile + part.shape[0]] = gq
            want_s[:, tile] = gs[:, 0]
            tile += 1
        row += size
    if power_of_two:
        want_s[:, tile:] = ref_fp8._scale_from_amax(torch.zeros(1), True)
    assert _same_bytes(qt, want_q) == 0 and torch.equal(st, want_s)
    qt_only, st_only = fp8.quantize_fp8_128x1(x, power_of_two=power_of_two, group_sizes=groups)
    assert _same_bytes(qt_only, want_q) == 0 and torch.equal(st_only, want_s)
    for bad, match in ((torch.tensor([1, 2]), "sum to 265"), (torch.tensor([266, -1]), "non-negative"),
                       (torch.tensor([], dtype=torch.int32), "sum to 265"),  # E = 0 dropped every row before
                       (torch.tensor([265.0]), "int32/int64"), (torch.tensor([[265]]), "1-D")):
        with pytest.raises(ValueError, match=match):
            fp8.quantize_fp8_128x1(x, group_sizes=bad)


@pytest.mark.parametrize("shape", [(200, 260), (3, 130, 257)])
def test_quantize_128x128_matches_reference(shape):
    w = _wide_range(shape, torch.float32)
    q, s = fp8.quantize_fp8_128x128(w)
    rq, rs = ref_fp8.quantize_fp8_128x128(w)
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    assert _same_bytes(q, rq) == 0
    assert torch.equal(s, rs)


def test_rounding_is_nearest_even_on_the_whole_grid():
    """Every E4M3 value, every midpoint (ties) and values a hair off the midpoints, scale exactly 1.

    Triton's interpreter's own fp32 -> fp8 cast fails this (ties round up, 127.99 -> 64); the kernel's
    explicit rounding must not.
    """
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes) & (codes >= 0)].unique().sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, -grid, mids, -mids, mids * (1 + 1e-6), mids * (1 - 1e-6)])
    x = torch.cat([vals, torch.zeros((-vals.numel()) % 127)]).view(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), 448.0), x], dim=1)  # amax 448 -> scale exactly 1
    q, s = fp8.quantize_fp8_1x128(x)
    rq, _ = ref_fp8.quantize_fp8_1x128(x)
    assert torch.all(s == 1.0)
    assert _same_bytes(q, rq) == 0


def test_dequantization_error_bound_and_scales():
    x = _wide_range((64, 384), torch.float32)
    x[3] = 0.0  # an all-zero row: scale is the floor, data zeros
    q, s = fp8.quantize_fp8_1x128(x)
    amax = x.view(64, 3, 128).abs().amax(-1)
    assert torch.equal(s, amax.clamp(min=1e-4) / 448.0)
    dq = ref_fp8.dequantize_fp8(q, s, (1, 128))
    scale_el = s.repeat_interleave(128, dim=1)
    # E4M3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal spacing 2^-9 * scale
    bound = torch.maximum(x.abs() * 2.0**-4, scale_el * 2.0**-10)
    assert torch.all((dq - x).abs() <= bound)
    assert torch.all(dq[3] == 0)

    qp, sp = fp8.quantize_fp8_1x128(x, power_of_two=True)
    assert torch.all(torch.frexp(sp).mantissa == 0.5)  # exact powers of two
    assert torch.all(sp >= s) and torch.all(sp < 2 * s)
    bound_p = torch.maximum(x.abs() * 2.0**-4, sp.repeat_interleave(128, dim=1) * 2.0**-10)
    assert torch.all((ref_fp8.dequantize_fp8(qp, sp, (1, 128)) - x).abs() <= bound_p)


def test_bad_inputs_raise_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="x must"):
        fp8.quantize_fp8_1x128(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must"):
        fp8.quantize_fp8_1x128(torch.ones(8))
    with pytest.raises(ValueError, match="w must"):
        fp8.quantize_fp8_128x128(torch.ones(2, 2, 2, 2))
    for floor in (0.0, 1e-40, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="amax_floor must be a finite number"):
            fp8.quantize_fp8_1x128_dual(torch.ones(4, 8), amax_floor=floor)
    # sizes on another device than x: the kernel read them through a raw pointer (meta: garbage scales, no error)
    meta_sizes = torch.tensor([1, 3], dtype=torch.int32, device="meta")
    for quantize in (fp8.quantize_fp8_128x1, fp8.quantize_fp8_1x128_dual):
        with pytest.raises(ValueError, match="^group_sizes is on meta but x is on cpu"):
            quantize(torch.ones(4, 8), group_sizes=meta_sizes)


def test_amax_floor_matches_the_reference_and_keeps_tiny_tiles():
    x = torch.randn(130, 200) * 1e-9
    for floor in (fp8.AMAX_FLOOR, fp8.GRAD_AMAX_FLOOR):
        q, s, qt, st = fp8.quantize_fp8_1x128_dual(x, amax_floor=floor)
        rq, rs = ref_fp8.quantize_fp8_1x128(x, amax_floor=floor)
        rqt, rst = ref_fp8.quantize_fp8_1x128(x.t().contiguous(), amax_floor=floor)
        assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
        assert torch.equal(st, rst) and torch.equal(qt.view(torch.uint8), rqt.view(torch.uint8))
    err = (fp8.dequantize_fp8(q, s, (1, 128)) - x).norm() / x.norm()
    assert err < 0.05  # the gradient floor: 1e-9 tiles quantize as well as unit ones (1e-4 floor: ~75% off)


def test_amax_floor_takes_numpy_scalars():
    """np.float32(1e-4) was refused as "amax_floor must be a finite number" (np.float64 passed: a float subclass)."""
    import numpy as np

    x = torch.randn(4, 130) * 1e-6
    expected = fp8.quantize_fp8_1x128(x, amax_floor=float(np.float32(1e-4)))
    for floor in (np.float32(1e-4), np.float64(np.float32(1e-4))):
        q, s = fp8.quantize_fp8_1x128(x, amax_floor=floor)
        assert torch.equal(s, expected[1]) and torch.equal(q.view(torch.uint8), expected[0].view(torch.uint8))


def test_dequantize_refuses_a_scale_of_another_tiling():
    """A scale wider than q's tiling was silently cut to fit, a narrower one raised a broadcasting RuntimeError."""
    q, s = fp8.quantize_fp8_1x128(torch.randn(3, 200))
    assert fp8.dequantize_fp8(q, s, (1, 128)).shape == (3, 200)
    for bad in (torch.ones(3, 3), torch.ones(3, 1), torch.ones(2, 2)):
        with pytest.raises(ValueError, match=r"^scale must have shape \(3, 2\) for q of shape \(3, 200\)"):
            fp8.dequantize_fp8(q, bad, (1, 128))
    with pytest.raises(ValueError, match="q must have at least 2 dims"):
        fp8.dequantize_fp8(q[0], s[0], (1, 128))


def test_empty_inputs_quantize_on_every_backend(monkeypatch):
    for forced in (False, True):
        if forced:
            monkeypatch.setenv("R1FAST_KERNELS", "torch")
        q, s = fp8.quantize_fp8_1x128(torch.zeros(0, 256))
        assert q.shape == (0, 256) and s.shape == (0, 2)
        qt, st = fp8.quantize_fp8_128x1(torch.zeros(0, 256))
        assert qt.shape == (256, 0) and st.shape == (256, 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
def test_nan_and_inf_poison_their_tile_like_the_reference(monkeypatch):
    """A NaN must not quantize to finite values (training's non-finite guard would then miss it)."""
    x = torch.randn(3, 256)
    x[0, 5], x[2, 200] = float("nan"), float("inf")
    w = torch.randn(130, 256)
    w[1, 3] = float("nan")
    got = [*fp8.quantize_fp8_1x128(x), *fp8.quantize_fp8_128x1(x), *fp8.quantize_fp8_128x128(w)]
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    want = [*fp8.quantize_fp8_1x128(x), *fp8.quantize_fp8_128x1(x), *fp8.quantize_fp8_128x128(w)]
    for g, r in zip(got, want, strict=True):
        g, r = g.float(), r.float()
        assert torch.equal(g.isnan(), r.isnan()) and torch.equal(g.isinf(), r.isinf())
        finite = g.isfinite()
        assert torch.equal(g[finite], r[finite])
    assert got[0][0, :128].float().isnan().all() and got[1][0, 0].isnan()  # the NaN's 1x128 tile, and its scale
    assert got[0][0, 128:].float().isfinite().all()  # the next tile of the row is untouched
    assert got[4][:128, :128].float().isnan().all() and got[4][:128, 128:].float().isfinite().all()  # w[1, 3]'s block


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_128x128_blocks_below_the_floor_get_the_floor_scale(monkeypatch, kernels):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    w = torch.randn(256, 256)
    w[:128, :128] = 0.0  # an all-zero block
    w[:128, 128:] = 1e-6 * torch.sign(torch.randn(128, 128))  # a block far below the floor
    q, s = fp8.quantize_fp8_128x128(w)
    floor = torch.tensor(1e-4, dtype=torch.float32) / 448.0
    assert s.shape == (2, 2)
    assert s[0, 0] == floor and s[0, 1] == floor
    assert torch.equal(s[1], (w[128:].abs().view(1, 128, 2, 128).amax(dim=(1, 3))[0] / 448.0))
    # a value of 1e-6 at scale 1e-4/448 is 4.48 -> E4M3 4.5 (spacing 0.5 in [4, 8))
    assert torch.all(q[:128, 128:].float().abs() == 4.5)
    assert torch.all(q[:128, :128].float() == 0.0)


@pytest.mark.parametrize("sizes", [[100, 100], [200, 200], [-5, 305], [7, -3, 50, 400], [0, 0], []])
def test_unvalidated_group_sizes_read_alike_on_the_reference(monkeypatch, sizes):
    """validate=False: the docstring's reading of sizes that do not sum to M (negative ones count as 0, rows past
    the sum are not quantized) holds on the CPU fallback too, byte for byte with the kernel. The reference raised
    RuntimeError ("allocated size does not match required size", "repeats can not be negative") on every one."""
    x = _wide_range((300, 200), torch.float32)
    groups = torch.tensor(sizes, dtype=torch.int32)
    got = fp8.quantize_fp8_128x1(x, group_sizes=groups, validate=False)
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    want = fp8.quantize_fp8_128x1(x, group_sizes=groups, validate=False)
    assert _same_bytes(got[0], want[0]) == 0 and torch.equal(got[1], want[1])
