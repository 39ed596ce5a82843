"""Grouped FP8 GEMMs and the routing kernels vs fp64 references (the layer: test_moe_layer.py).

Bounds. Grouped GEMMs are checked against the fp64 product of the *dequantized* operands (what the
kernel computes up to fp32 accumulation and the bf16 output rounding): calc_diff < 1e-5 and
elementwise within 3x the bf16 rounding of the reference (``assert_close_to_ref``); and against the
unquantized product: calc_diff < 2e-3 (E4M3's 3-bit mantissa on both operands gives ~7e-4 on
Gaussian data).
"""

import pytest
import torch
from conftest import assert_close_to_ref, calc_diff

from r1fast.kernels import fp8, moe_gemm, moe_permute, ref_fp8
from r1fast.kernels.moe_layer import Fp8Weight, moe_ffn_fp8

GROUPS = {1: [300], 3: [0, 1, 299], 8: [37, 0, 1, 128, 129, 5, 0, 60]}


def _offsets(sizes):
    return [0, *torch.tensor(sizes).cumsum(0).tolist()]


@pytest.mark.parametrize("num_experts", [1, 3, 8])
def test_grouped_gemm_matches_dequantized_fp64(num_experts):
    sizes = GROUPS[num_experts]
    M, N, K = sum(sizes), 192, 256
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    x, w = torch.randn(M, K), torch.randn(num_experts, N, K) / K**0.5
    xq, xs = fp8.quantize_fp8_1x128(x)
    wq, ws = fp8.quantize_fp8_128x128(w)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    res = moe_gemm.fp8_grouped_gemm(xq, xs, wq, ws, group_sizes, out=out)
    assert res is out

    xd, wd = ref_fp8.dequantize_fp8(xq, xs, (1, 128)).double(), ref_fp8.dequantize_fp8(wq, ws, (128, 128)).double()
    off = _offsets(sizes)
    ref = torch.cat([xd[off[e]:off[e + 1]] @ wd[e].T for e in range(num_experts)])
    exact = torch.cat([x[off[e]:off[e + 1]].double() @ w[e].double().T for e in range(num_experts)])
    assert calc_diff(out, ref) < 1e-5
    assert_close_to_ref(out, ref, ref.to(torch.bfloat16), name="grouped gemm")
    assert calc_diff(out, exact) < 2e-3
    again = moe_gemm.fp8_grouped_gemm(xq, xs, wq, ws, group_sizes)
    assert torch.equal(again.view(torch.int16), out.view(torch.int16))  # bitwise reproducible


def test_dgrad_through_transposed_blocks_matches_reference():
    sizes = [0, 130, 1, 69]
    M, N, K = sum(sizes), 256, 192  # forward: [M, K] x [E, N, K]^T; dgrad reduces over N
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    weight = Fp8Weight.quantize(torch.randn(len(sizes), N, K) / N**0.5)
    dyq, dys = fp8.quantize_fp8_1x128(torch.randn(M, N))
    dx = moe_gemm.fp8_grouped_gemm(dyq, dys, weight.q_t, weight.scale_t, group_sizes)
    ref = ref_fp8.fp8_grouped_gemm_dgrad(dyq, dys, weight.q, weight.scale, group_sizes)
    assert dx.shape == (M, K)
    assert calc_diff(dx, ref) < 1e-5
    assert_close_to_ref(dx, ref.double(), ref, name="dgrad")


def test_wgrad_matches_reference_and_accumulates():
    sizes = [70, 0, 1, 150]  # the second expert's tokens start inside a 128-token tile
    M, N, K = sum(sizes), 200, 128
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    dyt, dyts = fp8.quantize_fp8_128x1(torch.randn(M, N))
    xt, xts = fp8.quantize_fp8_128x1(torch.randn(M, K))
    out = torch.full((len(sizes), N, K), float("nan"))
    moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, out=out)
    a = ref_fp8.dequantize_fp8(dyt, dyts, (1, 128)).double()
    b = ref_fp8.dequantize_fp8(xt, xts, (1, 128)).double()
    off = _offsets(sizes)
    ref = torch.stack([a[:, off[e]:off[e + 1]] @ b[:, off[e]:off[e + 1]].T for e in range(len(sizes))])
    assert torch.all(out[1] == 0)  # an expert without tokens gets a zero gradient
    assert calc_diff(out, ref) < 1e-10
    assert_close_to_ref(out, ref, ref.float(), name="wgrad")
    grad = torch.randn(len(sizes), N, K)
    before = grad.clone()
    moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, out=grad, accumulate=True)
    assert_close_to_ref(grad, before.double() + ref, (before + ref.float()), name="accumulated wgrad")
    # the 128x1 tiling sits in storage padded to whole 128-token tiles with zeros (what lets the kernel read
    # unmasked tiles); a caller's unpadded copy is padded by the launcher and gives the same bits
    assert dyt.stride() == (256, 1) and xt.stride() == (256, 1)  # M = 221 tokens -> 2 tiles
    padding = dyt.as_strided((N, 256), (256, 1))[:, M:]
    assert torch.equal(padding.view(torch.uint8), torch.zeros_like(padding.view(torch.uint8)))
    unpadded = moe_gemm.fp8_grouped_gemm_wgrad(dyt.contiguous(), dyts, xt.contiguous(), xts, group_sizes)
    assert torch.equal(unpadded, out)


@pytest.mark.parametrize("aligned", [False, True])
def test_wgrad_boundary_and_inner_tiles(aligned):
    """The kernel runs an expert's boundary tiles (token-masked: the head it shares with the previous expert,
    the partial tail) apart from its pipelined loop over whole inner tiles: experts with several inner tiles,
    one inside a single tile, empty ones, in both layouts; N past the last whole 128 (masked rows)."""
    sizes = [37, 400, 0, 129, 256, 1]  # packed: expert 1 = head, 2 inner tiles, tail; expert 3 ends on a tile
    M, N, K = sum(sizes), 136, 128
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    layout = dict(group_sizes=group_sizes) if aligned else {}
    dyt, dyts = fp8.quantize_fp8_128x1(torch.randn(M, N), **layout)
    xt, xts = fp8.quantize_fp8_128x1(torch.randn(M, K), **layout)
    out = moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, group_aligned=aligned)
    a = ref_fp8.dequantize_fp8(dyt, dyts, (1, 128)).double()
    b = ref_fp8.dequantize_fp8(xt, xts, (1, 128)).double()
    start = _offsets([-(-n // 128) * 128 for n in sizes] if aligned else sizes)
    ref = torch.stack([a[:, s:s + n] @ b[:, s:s + n].T for s, n in zip(start, sizes)])
    fp32 = torch.stack([a[:, s:s + n].float() @ b[:, s:s + n].float().T for s, n in zip(start, sizes)])
    assert torch.all(out[2] == 0)
    assert calc_diff(out, ref) < 1e-10
    assert_close_to_ref(out, ref, fp32, name="wgrad")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_wgrad_of_an_empty_expert_inside_a_non_finite_tile_is_zero(bad):
    """Unaligned layout: expert 1 has no tokens and starts inside tile 0, whose column scales expert 0's NaN / inf
    token made non-finite. It has no tile, so its gradient is zeros (kept under accumulate), as the reference's;
    the kernel ran the tile's all-masked product times those scales: 0 x NaN, 128 x 128 NaNs."""
    sizes = [10, 0, 50]
    M, N, K = sum(sizes), 128, 128
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    dy = torch.randn(M, N)
    dy[0, 3] = bad
    dyt, dyts = fp8.quantize_fp8_128x1(dy)
    xt, xts = fp8.quantize_fp8_128x1(torch.randn(M, K))
    out = moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes)
    ref = ref_fp8.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes)
    assert torch.equal(ref[1], torch.zeros(N, K)) and torch.equal(out[1], ref[1])
    # the experts that share the tile are poisoned, as in the reference (inf, not NaN, where the interpreter reads
    # the NaN byte 0x7F as 480)
    assert not out[0].isfinite().all() and not out[2].isfinite().all()
    grad = torch.randn(len(sizes), N, K)
    kept = grad[1].clone()
    moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, out=grad, accumulate=True)
    assert torch.equal(grad[1], kept)


def _nan_tail(t: torch.Tensor, extra: int = 128) -> torch.Tensor:
    """``t`` [R, M] fp8 as a view of storage whose every byte past column M is 0x7F (e4m3 NaN): the padding a
    caller's torch.empty buffer may hold, and a whole tile beyond it."""
    rows, m = t.shape
    big = torch.full((rows, -(-m // 128) * 128 + extra), 0x7F, dtype=torch.uint8, device=t.device).view(t.dtype)
    big[:, :m] = t
    return big[:, :m]


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [False, True])
def test_wgrad_ignores_what_the_padding_holds_gpu(aligned):
    """Tokens past an expert's last one (its tail tile's padding, storage beyond M) are in no product: NaN bytes
    there (uninitialized memory: 2 of 256 byte values are e4m3 NaN, and 0 x NaN is NaN) leave the gradient as with
    zero padding. GPU only: Triton's interpreter reads e4m3 0x7F as 480, so on CPU the NaN never shows."""
    sizes = [37, 300, 0, 91]
    M, N, K = sum(sizes), 136, 128
    group_sizes = torch.tensor(sizes, dtype=torch.int32, device="cuda")
    layout = dict(group_sizes=group_sizes) if aligned else {}
    dyt, dyts = fp8.quantize_fp8_128x1(torch.randn(M, N, device="cuda"), **layout)
    xt, xts = fp8.quantize_fp8_128x1(torch.randn(M, K, device="cuda"), **layout)
    clean = moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, group_aligned=aligned)
    poisoned = moe_gemm.fp8_grouped_gemm_wgrad(_nan_tail(dyt.clone()), dyts, _nan_tail(xt.clone()), xts, group_sizes,
                                               group_aligned=aligned)
    assert torch.isfinite(clean).all() and torch.equal(poisoned, clean)


def test_group_aligned_wgrad_reduces_each_expert_over_its_own_tiles():
    """``group_aligned=True`` reads the layout of ``quantize_fp8_128x1(..., group_sizes=)``: each expert's
    gradient equals the single-expert wgrad of that expert's rows quantized alone."""
    sizes = [70, 0, 1, 150]
    M, N, K = sum(sizes), 200, 128
    group_sizes = torch.tensor(sizes, dtype=torch.int32)
    dy, x = torch.randn(M, N), torch.randn(M, K)
    dy[0] = float("nan")  # expert 0's bad token: in a tile shared with expert 2 it poisoned expert 2's scales
    dyt, dyts = fp8.quantize_fp8_128x1(dy, group_sizes=group_sizes)
    xt, xts = fp8.quantize_fp8_128x1(x, group_sizes=group_sizes)
    out = torch.full((len(sizes), N, K), float("nan"))
    moe_gemm.fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, out=out, group_aligned=True)
    assert out[0].isnan().any() and torch.all(out[1] == 0)
    off = _offsets(sizes)
    for e in (2, 3):
        one = torch.tensor([sizes[e]], dtype=torch.int32)
        a, a_s = fp8.quantize_fp8_128x1(dy[off[e]:off[e + 1]])
        b, b_s = fp8.quantize_fp8_128x1(x[off[e]:off[e + 1]])
        alone = moe_gemm.fp8_grouped_gemm_wgrad(a, a_s, b, b_s, one)[0]
        torch.testing.assert_close(out[e], alone, rtol=1e-6, atol=1e-6)  # fp32 sums, other tile split
    with pytest.raises(ValueError, match="group-aligned layout has 768 tokens, but the token operand has 221"):
        moe_gemm.fp8_grouped_gemm_wgrad(*fp8.quantize_fp8_128x1(dy), *fp8.quantize_fp8_128x1(x), group_sizes,
                                        group_aligned=True)


def test_bad_inputs_raise_value_error_naming_the_argument():
    xq, xs = fp8.quantize_fp8_1x128(torch.randn(8, 128))
    wq, ws = fp8.quantize_fp8_128x128(torch.randn(2, 64, 128))
    gs = torch.tensor([3, 5], dtype=torch.int32)
    call = moe_gemm.fp8_grouped_gemm
    with pytest.raises(ValueError, match="^a must"):
        call(xq.float(), xs, wq, ws, gs)
    with pytest.raises(ValueError, match="^b must"):
        call(xq, xs, wq.to(torch.bfloat16), ws, gs)
    with pytest.raises(ValueError, match="^b must have K"):
        call(xq, xs, wq[:, :, :64].contiguous(), ws, gs)
    with pytest.raises(ValueError, match="^a_scale"):
        call(xq, xs[:, :0], wq, ws, gs)
    with pytest.raises(ValueError, match="^b_scale"):
        call(xq, xs, wq, ws[:1], gs)
    with pytest.raises(ValueError, match="^group_sizes must have shape"):
        call(xq, xs, wq, ws, torch.tensor([8], dtype=torch.int32))
    with pytest.raises(ValueError, match="^group_sizes must be non-negative and sum to 8"):
        call(xq, xs, wq, ws, torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="^group_sizes must be an int"):
        call(xq, xs, wq, ws, gs.float())
    with pytest.raises(ValueError, match="^out must"):
        call(xq, xs, wq, ws, gs, out=torch.empty(8, 64))
    at, ats = fp8.quantize_fp8_128x1(torch.randn(8, 128))
    for bad in (gs[None], gs[0]):  # the wgrad reads E from group_sizes: it said "must have shape (-1,)"
        with pytest.raises(ValueError, match=r"^group_sizes must be 1-D \[E\]"):
            moe_gemm.fp8_grouped_gemm_wgrad(at, ats, at, ats, bad)
    x200q, x200s = fp8.quantize_fp8_1x128(torch.randn(8, 200))
    w200q, w200s = fp8.quantize_fp8_128x128(torch.randn(2, 64, 200))
    with pytest.raises(ValueError, match="^a: K = 200 is not a multiple of 128"):
        call(x200q, x200s, w200q, w200s, gs)
    with pytest.raises(ValueError, match="^w_gate_up: the FP8 recipe needs H and I to be multiples of 128"):
        moe_ffn_fp8(torch.randn(4, 128), torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long),
                    torch.randn(2, 192, 128), torch.randn(2, 128, 96))
    with pytest.raises(ValueError, match=r"^topk_ids must lie in \[0, 2\).*from -1 to 2"):
        moe_ffn_fp8(torch.randn(3, 128), torch.rand(3, 2), torch.tensor([[0, 2], [1, 0], [-1, 1]]),
                    torch.randn(2, 256, 128), torch.randn(2, 128, 128))
    with pytest.raises(ValueError, match="^w_down must"):
        moe_ffn_fp8(torch.randn(4, 128), torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.long),
                    torch.randn(2, 64, 128), torch.randn(3, 128, 32))
    with pytest.raises(ValueError, match=r"^topk_ids must be an integer \[T=4, k >= 1\]"):
        moe_ffn_fp8(torch.randn(4, 128), torch.rand(4, 0), torch.zeros(4, 0, dtype=torch.long),
                    torch.randn(2, 256, 128), torch.randn(2, 128, 128))
    good = dict(x=torch.randn(4, 128), topk_weights=torch.rand(4, 1), topk_ids=torch.zeros(4, 1, dtype=torch.long),
                w_gate_up=torch.randn(2, 256, 128), w_down=torch.randn(2, 128, 128))
    for name, bad in (("x", good["x"].to(torch.float8_e4m3fn)), ("x", good["x"].long()),
                      ("topk_weights", torch.ones(4, 1, dtype=torch.long)), ("topk_ids", good["topk_ids"].bool()),
                      ("w_gate_up", good["w_gate_up"].to(torch.float8_e4m3fn)), ("w_down", good["w_down"].int())):
        with pytest.raises(ValueError, match=f"^{name} must be"):  # accepted before, or blamed on `w`
            moe_ffn_fp8(**{**good, name: bad})
    for name in ("topk_weights", "topk_ids", "w_gate_up", "w_down"):  # topk_weights on meta: garbage out, no error
        with pytest.raises(ValueError, match=f"^{name} is on meta but x is on cpu"):
            moe_ffn_fp8(**{**good, name: good[name].to("meta")})


def test_routing_references_match_the_kernels():
    from r1fast.kernels import ref_moe_permute

    T, k, E, H = 19, 2, 6, 130
    topk_ids = torch.randint(0, E, (T, k))
    counts = moe_permute.expert_histogram(topk_ids, E)
    assert counts.dtype == torch.int32 and torch.equal(counts, ref_moe_permute.expert_histogram(topk_ids, E))
    _, token_of_row, row_of_slot = moe_permute.route_tokens(topk_ids, E)
    xq = fp8.quantize_fp8_1x128(torch.randn(T, H))[0]
    assert torch.equal(moe_permute.gather_rows(xq, token_of_row).view(torch.uint8),
                       ref_moe_permute.gather_rows(xq, token_of_row).view(torch.uint8))
    y, weights = torch.randn(T * k, H, dtype=torch.bfloat16), torch.rand(T, k)
    for w in (weights, None):
        assert torch.equal(moe_permute.combine(y, row_of_slot, w, k, torch.bfloat16),
                           ref_moe_permute.combine(y, row_of_slot, w, k, torch.bfloat16))
    dout = torch.randn(T, H, dtype=torch.bfloat16)
    dy, dw = moe_permute.combine_backward(dout, y, row_of_slot, weights)
    dy_ref, dw_ref = ref_moe_permute.combine_backward(dout, y, row_of_slot, weights)
    assert torch.equal(dy, dy_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-6)  # fp32 sums of 130 products, other order


def test_routing_and_combine_match_torch():
    T, k, E, H = 23, 3, 5, 96
    topk_ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    topk_ids[:, 0] = 4  # expert 4 is popular, others may be empty
    weights = torch.rand(T, k)
    group_sizes, token_of_row, row_of_slot = moe_permute.route_tokens(topk_ids, E)
    assert torch.equal(group_sizes.long(), torch.bincount(topk_ids.flatten(), minlength=E))
    flat = topk_ids.flatten()
    assert torch.equal(flat[row_of_slot.argsort()], flat.sort(stable=True).values)  # rows grouped by expert
    assert torch.equal(token_of_row[row_of_slot], torch.arange(T * k) // k)

    x = torch.randn(T, H, dtype=torch.bfloat16)
    rows = moe_permute.gather_rows(x, token_of_row)
    assert torch.equal(rows, x[token_of_row])
    y = torch.randn(T * k, H, dtype=torch.bfloat16)
    out = moe_permute.combine(y, row_of_slot, weights, k, torch.float32)
    ref = (y.double()[row_of_slot].view(T, k, H) * weights.double()[:, :, None]).sum(1)
    assert_close_to_ref(out, ref, ref.float(), name="combine")
    dout = torch.randn(T, H, dtype=torch.bfloat16)
    dy, dw = moe_permute.combine_backward(dout, y, row_of_slot, weights)
    dy_ref = torch.empty(T * k, H, dtype=torch.float64)
    dy_ref[row_of_slot] = (dout.double()[:, None, :] * weights.double()[:, :, None]).reshape(T * k, H)
    assert_close_to_ref(dy, dy_ref, dy_ref.to(torch.bfloat16), name="combine dy")
    dw_ref = (dout.double()[:, None, :] * y.double()[row_of_slot].view(T, k, H)).sum(-1)
    assert_close_to_ref(dw, dw_ref, dw_ref.float(), mult=4.0, name="combine dweights")


@pytest.mark.gpu
def test_grouped_gemm_v3_fc1_shape_gpu():
    E, N, K = 8, 4096, 7168
    sizes = torch.randint(300, 700, (E,))
    sizes[2] = 0
    M = int(sizes.sum())
    group_sizes = sizes.to(torch.int32).cuda()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda") / K**0.5
    xq, xs = fp8.quantize_fp8_1x128(x)
    wq, ws = fp8.quantize_fp8_128x128(w)
    out = moe_gemm.fp8_grouped_gemm(xq, xs, wq, ws, group_sizes, validate=False)
    xd, wdq = ref_fp8.dequantize_fp8(xq, xs, (1, 128)), ref_fp8.dequantize_fp8(wq, ws, (128, 128))
    off = _offsets(sizes.tolist())
    ref = torch.cat([xd[off[e]:off[e + 1]].double() @ wdq[e].double().T for e in range(E)])
    assert calc_diff(out, ref) < 1e-5
    assert_close_to_ref(out, ref, ref.to(torch.bfloat16), name="grouped gemm (H100)")
    rq, rs = ref_fp8.quantize_fp8_1x128(x)
    assert torch.equal(rq.view(torch.uint8), xq.view(torch.uint8)) and torch.equal(rs, xs)


def test_strided_group_sizes_are_read_as_their_values():
    """The kernels read group_sizes[e] at ptr + e: a strided view (t[::2]) passed validation and gave garbage
    (relative error 1.19) in both GEMMs."""
    sizes = [70, 0, 1, 150]
    M, N, K = sum(sizes), 192, 128
    strided = torch.tensor([s for size in sizes for s in (size, -7)], dtype=torch.int32)[::2]
    dense = strided.contiguous()
    xq, xs = fp8.quantize_fp8_1x128(torch.randn(M, K))
    wq, ws = fp8.quantize_fp8_128x128(torch.randn(len(sizes), N, K))
    assert torch.equal(moe_gemm.fp8_grouped_gemm(xq, xs, wq, ws, strided),
                       moe_gemm.fp8_grouped_gemm(xq, xs, wq, ws, dense))
    dy, x = torch.randn(M, N), torch.randn(M, K)
    for aligned in (False, True):
        operands = [*fp8.quantize_fp8_128x1(dy, group_sizes=dense if aligned else None),
                    *fp8.quantize_fp8_128x1(x, group_sizes=dense if aligned else None)]
        assert torch.equal(moe_gemm.fp8_grouped_gemm_wgrad(*operands, strided, group_aligned=aligned),
                           moe_gemm.fp8_grouped_gemm_wgrad(*operands, dense, group_aligned=aligned))


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_wgrad_accumulate_adds_into_out(monkeypatch, kernels):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    g = torch.Generator().manual_seed(3)
    sizes = torch.tensor([130, 0, 70], dtype=torch.int32)
    M, N, K = int(sizes.sum()), 128, 256
    dy = torch.randn(M, N, generator=g)
    x = torch.randn(M, K, generator=g)
    at, at_s = fp8.quantize_fp8_128x1(dy)
    bt, bt_s = fp8.quantize_fp8_128x1(x)
    # independent fp64 result from the dequantized operands
    a64 = ref_fp8.dequantize_fp8(at, at_s, (1, 128)).double()
    b64 = ref_fp8.dequantize_fp8(bt, bt_s, (1, 128)).double()
    starts = [0, 130, 130, 200]
    want = torch.stack([a64[:, starts[e]:starts[e + 1]] @ b64[:, starts[e]:starts[e + 1]].T for e in range(3)])
    before = torch.randn(3, N, K, generator=g)
    out = before.clone()
    moe_gemm.fp8_grouped_gemm_wgrad(at, at_s, bt, bt_s, sizes, out=out, accumulate=True)
    out2 = before.clone()
    moe_gemm.fp8_grouped_gemm_wgrad(at, at_s, bt, bt_s, sizes, out=out2, accumulate=False)
    assert torch.allclose(out2.double(), want, rtol=1e-5, atol=1e-4)
    # accumulate adds the fp32 result into out in fp32, on both paths: micro-batch sums are a + b bit for bit
    assert torch.equal(out, before + out2)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_histogram_ignores_ids_outside_the_expert_range(monkeypatch, kernels):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    E = 4
    ids = torch.tensor([[0, 3], [4, 1], [-1, 3], [7, 2], [4, 4]])
    counts = moe_permute.expert_histogram(ids, E)
    assert counts.dtype == torch.int32
    assert counts.tolist() == [1, 1, 1, 2]
