"""FP8 MoE expert GEMMs at DeepSeek-V3 shapes: TFLOP/s vs PyTorch's grouped/scaled GEMMs.

Shapes from ANCHORS.md "MoE expert GEMMs": 8 local experts x 4,096 tokens; fc1 N = 4,096, K = 7,168;
fc2 N = 7,168, K = 2,048; the ``.ragged`` variants draw each expert's token count uniformly within
+-30% of 4,096 (same total), as after real routing. Floor: the fp8 matmul ceiling.

Peers (same run, same shapes):
* ``torch._grouped_mm`` bf16 (offsets = cumulative group sizes),
* ``torch._scaled_grouped_mm`` with per-row (token) and per-column (weight row) fp32 scales,
* a loop of ``torch._scaled_mm`` per expert with per-tensor scales (cuBLAS; ANCHORS: 1,212 at fc1),
* a loop of ``torch._scaled_mm`` per expert with the recipe's own 1x128 / 128x128 scales (cuBLAS
  block scaling, CUDA >= 12.9; ANCHORS: 1,000-1,220 dense). A probe call decides availability and the
  row says why when this torch cannot.
dgrad and wgrad are timed against bf16 ``torch._grouped_mm`` on the same products (the wgrad peer writes bf16,
ours fp32: torch's fast grouped kernel only has a bf16 output). The layer case
times ``moe_ffn_fp8`` forward + backward against the model's bf16 path (``r1fast.moe.grouped_experts``:
two ``torch._grouped_mm`` on bf16 weights; issue 7's target is >= 1.5x it) and the per-expert-matmul
bf16 layer (``ref_fp8.moe_ffn_fp8`` with ``compute_dtype=bf16``).

Nothing here touches CUDA until ``make_inputs`` runs.
"""

from __future__ import annotations

from bench.registry import Case, Impl, register

NUM_EXPERTS, TOKENS_PER_EXPERT = 8, 4096
FC1 = ("fc1", 4096, 7168)  # (tag, N, K)
FC2 = ("fc2", 7168, 2048)


def _group_sizes(ragged: bool) -> list[int]:
    import random

    if not ragged:
        return [TOKENS_PER_EXPERT] * NUM_EXPERTS
    rng = random.Random(0)
    # multiples of 16 (not of 128): torch's fp8 grouped GEMM wants 16-aligned offsets
    sizes = [16 * round(TOKENS_PER_EXPERT * rng.uniform(0.7, 1.3) / 16) for _ in range(NUM_EXPERTS)]
    sizes[-1] += TOKENS_PER_EXPERT * NUM_EXPERTS - sum(sizes)  # same total as the even split
    return sizes


def _peer_available(name: str):
    def check():
        import torch

        if not torch.cuda.is_available():
            return "needs CUDA"
        if not hasattr(torch, name):
            return f"torch {torch.__version__} has no torch.{name}"
        if torch.cuda.get_device_capability() < (9, 0):
            return f"torch.{name} needs sm90+"
        return None

    return check


def _fwd_inputs(sizes, N, K):
    import torch

    from r1fast.kernels.fp8 import quantize_fp8_1x128, quantize_fp8_128x128

    E, M = len(sizes), sum(sizes)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    group_sizes = torch.tensor(sizes, dtype=torch.int32, device="cuda")
    offs = group_sizes.cumsum(0).to(torch.int32)
    xq, xs = quantize_fp8_1x128(x)
    wq, ws = quantize_fp8_128x128(w)
    # per-row / per-column scales for the torch fp8 peers
    x_row_scale = (x.float().abs().amax(1).clamp(min=1e-4) / 448.0)
    x_row = (x.float() / x_row_scale[:, None]).to(torch.float8_e4m3fn)
    w_col_scale = (w.float().abs().amax(2).clamp(min=1e-4) / 448.0)
    w_col = (w.float() / w_col_scale[:, :, None]).to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    # the cuBLAS block-scaled peer wants each expert's 1x128 scales outer-dim-major (M contiguous), made
    # here so the layout change is not timed; the 128x128 weight scales go in as [K/128, N/128] views
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    xs_cm = [xs[bounds[e]:bounds[e + 1]].t().contiguous().t() for e in range(E)]
    return xq, xs, wq, ws, group_sizes, out, x, w, offs, x_row, x_row_scale, w_col, w_col_scale, one, sizes, xs_cm


def _ours_fwd(xq, xs, wq, ws, group_sizes, out, *rest):
    from r1fast.kernels.moe_gemm import fp8_grouped_gemm

    return fp8_grouped_gemm(xq, xs, wq, ws, group_sizes, out=out, validate=False)


def _bf16_grouped(xq, xs, wq, ws, group_sizes, out, x, w, offs, *rest):
    import torch

    return torch._grouped_mm(x, w.transpose(1, 2), offs=offs, out_dtype=torch.bfloat16)


def _fp8_rowwise_grouped(xq, xs, wq, ws, group_sizes, out, x, w, offs, x_row, x_row_scale, w_col, w_col_scale, *rest):
    import torch

    return torch._scaled_grouped_mm(x_row, w_col.transpose(1, 2), x_row_scale, w_col_scale, offs=offs,
                                    out_dtype=torch.bfloat16)


def _fp8_per_tensor_loop(xq, xs, wq, ws, group_sizes, out, x, w, offs, x_row, x_row_scale, w_col, w_col_scale,
                         one, sizes, *rest):
    import torch

    start = 0
    for e, size in enumerate(sizes):
        torch._scaled_mm(x_row[start:start + size], w_col[e].t(), one, one, out_dtype=torch.bfloat16,
                         out=out[start:start + size])
        start += size
    return out


def _blockwise_scaled_mm_loop(xq, xs, wq, ws, group_sizes, out, x, w, offs, x_row, x_row_scale, w_col, w_col_scale,
                              one, sizes, xs_cm):
    import torch

    start = 0
    for e, size in enumerate(sizes):
        torch._scaled_mm(xq[start:start + size], wq[e].t(), xs_cm[e], ws[e].t(), out_dtype=torch.bfloat16,
                         out=out[start:start + size])
        start += size
    return out


def _blockwise_scaled_mm_available():
    """None when this torch/cuBLAS runs ``torch._scaled_mm`` with 1x128 x 128x128 scales, else why not."""
    reason = _peer_available("_scaled_mm")()
    if reason:
        return reason
    import torch

    a = torch.ones(128, 256, device="cuda").to(torch.float8_e4m3fn)
    b = torch.ones(128, 256, device="cuda").to(torch.float8_e4m3fn)
    a_scale = torch.ones(2, 128, device="cuda").t()  # [M, K/128], M contiguous
    b_scale = torch.ones(1, 2, device="cuda").t()  # [K/128, N/128]
    try:
        out = torch._scaled_mm(a, b.t(), a_scale, b_scale, out_dtype=torch.bfloat16)
    except (RuntimeError, ValueError) as err:  # e.g. built against CUDA < 12.9
        return f"torch._scaled_mm has no 1x128/128x128 block scaling here: {str(err).splitlines()[0][:120]}"
    if not bool((out == 256).all()):
        return "torch._scaled_mm block-scaled probe gave a wrong product"
    return None


def _wgrad_inputs(sizes, N, K, device="cuda"):
    import torch

    from r1fast.kernels.fp8 import quantize_fp8_128x1

    M = sum(sizes)
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    group_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    # The MoE layer's layout (moe_layer.py): every expert's tokens start on a 128-token tile of their own.
    # The global 128-row tiling is another kernel path (an expert starting inside a tile is masked), which
    # the layer never runs: at ragged sizes (multiples of 16, not 128) it would publish the wrong path's time.
    dyt, dyts = quantize_fp8_128x1(dy, group_sizes=group_sizes)
    xt, xts = quantize_fp8_128x1(x, group_sizes=group_sizes)
    grad = torch.zeros(len(sizes), N, K, device=device)
    offs = group_sizes.cumsum(0).to(torch.int32)
    return dyt, dyts, xt, xts, group_sizes, grad, dy, x, offs


def _ours_wgrad(dyt, dyts, xt, xts, group_sizes, grad, *rest):
    from r1fast.kernels.moe_gemm import fp8_grouped_gemm_wgrad

    return fp8_grouped_gemm_wgrad(dyt, dyts, xt, xts, group_sizes, out=grad, accumulate=True, group_aligned=True,
                                  validate=False)


def _bf16_wgrad(dyt, dyts, xt, xts, group_sizes, grad, dy, x, offs):
    import torch

    # torch._grouped_mm with 2-D x 2-D operands groups along K (the token axis): out [E, N, K]. bf16 out:
    # an fp32 out_dtype leaves CUDA's grouped kernel for a per-group loop with a host sync (a weaker peer)
    return torch._grouped_mm(dy.t(), x, offs=offs)


def _layer_inputs(T=8192, H=7168, inter=2048, E=8, k=8):
    import torch

    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    topk_weights, topk_ids = torch.randn(T, E, device="cuda").softmax(-1).topk(k, dim=-1)
    topk_weights.requires_grad_(True)
    w_gate_up = (torch.randn(E, 2 * inter, H, device="cuda") / H**0.5).requires_grad_(True)
    w_down = (torch.randn(E, H, inter, device="cuda") / inter**0.5).requires_grad_(True)
    dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    from r1fast.kernels.moe_layer import Fp8WeightCache

    # bf16 master weights for the bf16 peers (what a bf16 model holds)
    bf16_weights = [w.detach().bfloat16().requires_grad_(True) for w in (w_gate_up, w_down)]
    return x, topk_weights, topk_ids, w_gate_up, w_down, dout, Fp8WeightCache(), *bf16_weights


def _ours_layer(x, tw, ti, wgu, wd, dout, cache, *bf16_weights):
    from r1fast.kernels.moe_layer import moe_ffn_fp8

    # the harness sets .grad to None between calls: this times the first-micro-batch path (fresh fp32 gradients
    # handed to autograd); with an existing fp32 .grad the wgrad kernel adds into it and saves that pass
    moe_ffn_fp8(x, tw, ti, wgu, wd, cache=cache).backward(dout)


def _bf16_grouped_layer(x, tw, ti, wgu, wd, dout, cache, wgu_bf16, wd_bf16):
    from r1fast.moe import grouped_experts

    grouped_experts(x, tw, ti, wgu_bf16, wd_bf16).backward(dout)


def _bf16_layer(x, tw, ti, wgu, wd, dout, cache, wgu_bf16, wd_bf16):
    import torch

    from r1fast.kernels.ref_fp8 import moe_ffn_fp8 as bf16_layer

    bf16_layer(x, tw, ti, wgu_bf16, wd_bf16, compute_dtype=torch.bfloat16).backward(dout)


@register("moe_gemm")
def cases(quick):
    for tag, N, K in (FC1, FC2):
        for ragged in (False, True):
            sizes = _group_sizes(ragged)
            M = sum(sizes)
            name = f"moe_gemm.fwd.{tag}" + (".ragged" if ragged else "")
            yield Case(
                name=name,
                shape={"E": NUM_EXPERTS, "M": M, "N": N, "K": K, "group_sizes": sizes, "dtype": "e4m3->bf16"},
                make_inputs=lambda s=sizes, n=N, k=K: _fwd_inputs(s, n, k),
                impls=[
                    Impl("r1fast", _ours_fwd, ours=True),
                    Impl("torch._grouped_mm-bf16", _bf16_grouped, available=_peer_available("_grouped_mm")),
                    Impl("torch._scaled_grouped_mm-rowwise", _fp8_rowwise_grouped,
                         available=_peer_available("_scaled_grouped_mm")),
                    Impl("torch._scaled_mm-per-tensor-loop", _fp8_per_tensor_loop,
                         available=_peer_available("_scaled_mm")),
                    Impl("torch._scaled_mm-blockwise-loop", _blockwise_scaled_mm_loop,
                         available=_blockwise_scaled_mm_available),
                ],
                flops=2.0 * M * N * K,
                ceiling="fp8_matmul",
                quick=not ragged or tag == "fc1",
                input_bytes=M * K * 3 + NUM_EXPERTS * N * K * 3 + M * N * 2,
            )
            # dgrad of this GEMM = the same kernel on [M, N] x [E, K, N]^T (transposed weight blocks)
            yield Case(
                name=f"moe_gemm.dgrad.{tag}" + (".ragged" if ragged else ""),
                shape={"E": NUM_EXPERTS, "M": M, "N": K, "K": N, "group_sizes": sizes, "dtype": "e4m3->bf16"},
                make_inputs=lambda s=sizes, n=N, k=K: _fwd_inputs(s, k, n),
                impls=[
                    Impl("r1fast", _ours_fwd, ours=True),
                    Impl("torch._grouped_mm-bf16", _bf16_grouped, available=_peer_available("_grouped_mm")),
                ],
                flops=2.0 * M * N * K,
                ceiling="fp8_matmul",
                quick=False,
            )
            yield Case(
                name=f"moe_gemm.wgrad.{tag}" + (".ragged" if ragged else ""),
                shape={"E": NUM_EXPERTS, "M": M, "N": N, "K": K, "group_sizes": sizes, "dtype": "e4m3->fp32"},
                make_inputs=lambda s=sizes, n=N, k=K: _wgrad_inputs(s, n, k),
                impls=[
                    Impl("r1fast", _ours_wgrad, ours=True),
                    Impl("torch._grouped_mm-bf16", _bf16_wgrad, available=_peer_available("_grouped_mm")),
                ],
                flops=2.0 * M * N * K,
                ceiling="fp8_matmul",
                quick=not ragged and tag == "fc1",
            )
    T, H, inter, E, k = 8192, 7168, 2048, 8, 8
    yield Case(
        name="moe_gemm.layer.fwd_bwd",
        shape={"T": T, "H": H, "I": inter, "E": E, "k": k, "dtype": "bf16 activations, fp32 master weights"},
        make_inputs=lambda: _layer_inputs(T, H, inter, E, k),
        impls=[
            Impl("r1fast-fp8", _ours_layer, ours=True),
            Impl("bf16-torch._grouped_mm (the model's bf16 path)", _bf16_grouped_layer,
                 available=_peer_available("_grouped_mm")),
            Impl("bf16-per-expert-matmuls", _bf16_layer),
        ],
        flops=3 * 2.0 * T * k * (2 * inter * H + H * inter),  # fwd + 2x for dgrad and wgrad
        ceiling="fp8_matmul",
        notes="weights quantized once (Fp8WeightCache hit after the first call, as within an optimizer step)",
    )
