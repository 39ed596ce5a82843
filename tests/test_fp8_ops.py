"""The FP8 / MoE kernels as ``torch.ops.r1fast`` operators: schemas, fakes, torch.compile.

``torch.library.opcheck`` runs each op for real (interpreted Triton on CPU) and checks its schema
(declared mutations only, no aliasing), its fake against the real outputs, and AOT dispatch.
"""

import pytest
import torch

from r1fast.kernels import fp8, moe_gemm, moe_permute
from r1fast.kernels.registration import registered_ops


def _group_sizes(*sizes):
    return torch.tensor(sizes, dtype=torch.int32)


def _op_cases():
    x = torch.randn(130, 256)
    xq, xs, xtq, xts = fp8.quantize_fp8_1x128_dual(x)
    w = torch.randn(2, 192, 256)
    wq, ws = fp8.quantize_fp8_128x128(w)
    gs = _group_sizes(129, 1)
    y = torch.randn(130, 192)
    yt, yts = fp8.quantize_fp8_128x1(y)
    ya, yas = fp8.quantize_fp8_128x1(y, group_sizes=gs)  # the group-aligned layout the MoE layer uses
    xa, xas = fp8.quantize_fp8_128x1(x, group_sizes=gs)
    ids = torch.randint(0, 3, (9, 2))
    rows = torch.randperm(18)
    # non-contiguous inputs (a transposed view): each op returns contiguous outputs, so its fake must too
    # (empty_like kept a transposed input's strides: fp8_quantize_blocks, moe_combine_backward)
    x_t = torch.randn(256, 130).t()
    y_t = torch.randn(256, 18, dtype=torch.bfloat16).t()
    return {
        "fp8_quantize_rows_cols": [(x, True, True, False, 1e-4, None), (x.bfloat16(), True, False, True, 1e-4, None),
                                   (x, False, True, False, 1e-20, None), (x, True, True, False, 1e-4, gs),
                                   (x[:0], False, True, True, 1e-4, _group_sizes(0, 0, 0)),
                                   (x_t, True, True, False, 1e-4, None)],
        "fp8_quantize_blocks": [(w, False), (w[:, :100, :200].contiguous(), True), (w.transpose(1, 2), False)],
        "fp8_grouped_gemm": [(xq, xs, wq, ws, gs, torch.empty(130, 192, dtype=torch.bfloat16))],
        "fp8_grouped_gemm_wgrad": [(yt, yts, xtq, xts, gs, torch.zeros(2, 192, 256), True, False),
                                   (yt, yts, xtq, xts, gs, torch.empty(2, 192, 256), False, False),
                                   (ya, yas, xa, xas, gs, torch.empty(2, 192, 256), False, True)],
        "moe_expert_histogram": [(ids, 3)],
        "moe_gather_rows": [(xq[:18], rows), (x[:18].bfloat16(), rows), (y_t, rows)],
        "moe_combine": [(x[:18].bfloat16(), rows, torch.rand(9, 2), 2, torch.float32),
                        (x[:18], rows, None, 2, torch.bfloat16), (y_t, rows, torch.rand(9, 2), 2, torch.float32)],
        "moe_combine_backward": [(torch.randn(9, 256, dtype=torch.bfloat16), x[:18].bfloat16(), rows, torch.rand(9, 2)),
                                 (torch.randn(256, 9, dtype=torch.bfloat16).t(), y_t, rows, torch.rand(2, 9).t())],
    }


def _bytes(t):
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


@pytest.mark.parametrize("name", sorted(_op_cases()))
def test_opcheck(name):
    op = registered_ops()[name]
    mutable = {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    for args in _op_cases()[name]:
        has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
        # opcheck's schema test compares tensors with arithmetic PyTorch lacks for float8 on CPU; for those
        # ops the same check (no undeclared mutation) is done here on the raw bytes
        tests = ("test_faketensor", "test_aot_dispatch_dynamic") if has_fp8 else \
            ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(op, args, test_utils=tests)
        names = [a.name for a in op.default._schema.arguments]
        before = [_bytes(a).clone() if isinstance(a, torch.Tensor) else a for a in args]
        op(*args)
        for arg_name, old, new in zip(names, before, args, strict=True):
            if isinstance(new, torch.Tensor) and arg_name not in mutable:
                assert torch.equal(old, _bytes(new)), f"{name} modified {arg_name}, which its schema keeps read-only"


def test_compiled_quantizers_and_grouped_gemms_equal_eager():
    def forward(x, w, group_sizes):
        xq, xs, xtq, xts = fp8.quantize_fp8_1x128_dual(x)
        wq, ws = fp8.quantize_fp8_128x128(w)
        out = moe_gemm.fp8_grouped_gemm(xq, xs, wq, ws, group_sizes)
        grad = moe_gemm.fp8_grouped_gemm_wgrad(*fp8.quantize_fp8_128x1(out), xtq, xts, group_sizes)
        return out, grad

    x, w, gs = torch.randn(70, 256, dtype=torch.bfloat16), torch.randn(3, 128, 256), _group_sizes(0, 69, 1)
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)  # no host sync: validation skipped
    for got, want in zip(compiled(x, w, gs), forward(x, w, gs), strict=True):
        assert torch.equal(got, want)


def test_compiled_routing_equals_eager():
    def route_and_combine(ids, x, weights):
        _, token_of_row, row_of_slot = moe_permute.route_tokens(ids, 5)
        return moe_permute.combine(moe_permute.gather_rows(x, token_of_row), row_of_slot, weights, 2, torch.float32)

    ids, x, weights = torch.randint(0, 5, (11, 2)), torch.randn(11, 96, dtype=torch.bfloat16), torch.rand(11, 2)
    compiled = torch.compile(route_and_combine, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(ids, x, weights), route_and_combine(ids, x, weights))
