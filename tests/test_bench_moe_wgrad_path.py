"""The wgrad benchmark case times the kernel path the FP8 MoE layer runs (group-aligned 128x1 tiles)."""

import torch
from bench_testing import REPO  # noqa: F401  (puts the repository, home of `bench`, on sys.path)

from bench.cases import moe_gemm as wgrad_case
from r1fast.kernels import fp8, moe_gemm


def test_wgrad_case_uses_the_layers_group_aligned_layout_and_call():
    # ragged sizes that are not multiples of 128, like the case's ".ragged" variant (multiples of 16)
    sizes = [80, 0, 16, 144]
    N, K = 128, 128
    torch.manual_seed(0)
    inputs = wgrad_case._wgrad_inputs(sizes, N, K, device="cpu")
    dyt, dyts, xt, xts, group_sizes, grad, dy, x, _ = inputs
    # moe_layer.py quantizes with group_sizes=: every expert starts on a tile of its own
    assert xt.shape[1] == dyt.shape[1] == fp8.aligned_tokens(sum(sizes), len(sizes))
    wgrad_case._ours_wgrad(*inputs)
    # what moe_layer._wgrad computes on the same activations, bit for bit
    want = moe_gemm.fp8_grouped_gemm_wgrad(*fp8.quantize_fp8_128x1(dy, group_sizes=group_sizes),
                                           *fp8.quantize_fp8_128x1(x, group_sizes=group_sizes), group_sizes,
                                           group_aligned=True)
    assert torch.equal(grad, want)
    # and it is the weight gradient: expert e's dy_e^T x_e within E4M3's error
    start = 0
    for e, size in enumerate(sizes):
        exact = dy[start:start + size].double().T @ x[start:start + size].double()
        if size:
            err = (grad[e].double() - exact).norm() / exact.norm()
            assert err < 0.05, (e, float(err))
        else:
            assert torch.all(grad[e] == 0)
        start += size
