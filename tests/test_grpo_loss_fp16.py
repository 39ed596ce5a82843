"""fp16 inputs on the kernel path: logits beyond fp16's 65504 and the fp32 logits buffer (grpo_logits_chunk.py).

Finite fp16 hidden/weight can make logits of 2.4e5; the sweep once held them in an fp16 [C, V] buffer,
where they became inf and every log-prob, the loss, the entropy and the gradients came out NaN with no
error. The sweep now fills an fp32 buffer for fp16 inputs (and writes fp16 dlogits to a second one for
the gradient GEMMs); bf16 and fp32 keep their single in-place buffer.
"""

import pytest
import torch
from conftest import assert_close_to_ref
from test_grpo_loss import TEMPERATURE, leaves, loss_params, make_inputs, run_op, run_oracle

from r1fast.kernels import grpo_logits_chunk as glc
from r1fast.kernels import grpo_loss as fused
from r1fast.kernels import grpo_loss_kernels as gk
from r1fast.kernels import ref_grpo_loss as ref


def _huge_logit_inputs(n=5, h=64, v=129):
    """fp16 hidden/weight (|x| ~ 100, finite) whose logits reach ~2e5 (the probe's repro shape)."""
    torch.manual_seed(0)
    hidden = (torch.randn(n, h) * 100).half()
    weight = (torch.randn(v, h) * 100).half()
    ids = torch.randint(0, v, (n,))
    z64 = hidden.double() @ weight.double().t()
    assert z64.abs().max() > 1.5e5  # the premise: far past fp16's 65504
    return hidden, weight, ids, z64


def test_logprobs_beyond_fp16_range_match_fp64():
    hidden, weight, ids, z64 = _huge_logit_inputs()
    logp, ent = fused.fused_linear_logprobs(hidden, weight, ids, return_entropy=True, chunk_tokens=2)
    lp64 = torch.log_softmax(z64, -1)
    want = lp64.gather(-1, ids[:, None]).squeeze(-1)
    # fp32 logits of size 2.4e5 carry an ulp of 0.016: the bound is a few ulps of the largest logit,
    # a NaN (the bug) or an fp16-rounded logit (ulp 128 past 65504) fails it
    assert_close_to_ref(logp, want, atol=4 * torch.finfo(torch.float32).eps * z64.abs().max().item(), name="logp")
    assert_close_to_ref(ent, -(lp64.exp() * lp64).sum(-1), atol=1e-4, name="entropy")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_and_grads_beyond_fp16_range_match_reference(level):
    hidden, weight, ids, _ = _huge_logit_inputs()
    n = ids.numel()
    old = fused.fused_linear_logprobs(hidden, weight, ids).view(1, n) + 0.1  # ratios just below 1: clipping off
    args = (ids.view(1, n), torch.ones(1, n, dtype=torch.bool), torch.tensor([1.0]))
    kw = dict(old_logps=old, importance_level=level, chunk_tokens=2)
    outs = []
    for impl in (fused.fused_linear_grpo_loss, ref.fused_linear_grpo_loss):  # reference: fp32 logits inside
        h, w = hidden.view(1, n, -1).clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = impl(h, w, *args, **kw)
        loss.backward()
        outs.append((loss, metrics["entropy"], h.grad, w.grad))
    for name, got, want in zip(("loss", "entropy", "hidden.grad", "weight.grad"), *outs, strict=True):
        assert torch.isfinite(got).all(), f"{name} is not finite"
        assert_close_to_ref(got, want, atol=1e-3 * max(1.0, want.abs().max().item()), name=name)
    assert outs[0][2].abs().max() > 0  # the gradients are not trivially zero


def test_in_range_fp16_error_is_the_fp32_references():
    """Ordinary fp16 inputs: the kernel path's error vs fp64 is that of the reference (fp32 logits).

    Measured here (chunk_tokens=48): hidden.grad relative error 9.5e-4 for the fp32 buffer and the
    reference, 3.3e-3 for the old fp16 buffer, 1.4e-2 for a bf16 buffer; logp max error 2.6e-6 vs 3.1e-3.
    """
    inp = make_inputs(dtype=None)
    params = loss_params(inp, "grpo", "token", 0.04, None, True)
    out = run_op(fused.fused_linear_grpo_loss, inp, params, torch.float16, chunk_tokens=48)
    want = run_op(ref.fused_linear_grpo_loss, inp, params, torch.float16, chunk_tokens=48)
    oracle = run_oracle(inp, params, torch.float64)
    assert_close_to_ref(out[0], oracle[0], want[0], mult=1.5, atol=1e-6, name="loss")
    for name, g, g_ref, g64 in zip(("hidden.grad", "weight.grad", "bias.grad"), out[2], want[2], oracle[2]):
        assert g.dtype == torch.float16
        assert_close_to_ref(g, g64, g_ref, mult=1.5, atol=1e-6, name=name)
    h, w, b = leaves(inp, torch.float16)
    lp = fused.fused_linear_logprobs(h, w, inp["ids"], bias=b, temperature=TEMPERATURE)
    lp_ref = ref.fused_linear_logprobs(h, w, inp["ids"], bias=b, temperature=TEMPERATURE)
    lp64 = ref.fused_linear_logprobs(h.double(), w.double(), inp["ids"], bias=b.double(), temperature=TEMPERATURE)
    assert_close_to_ref(lp, lp64, lp_ref, mult=1.5, atol=1e-5, name="logp")


@pytest.mark.parametrize("dtype, buffer_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float32)])
def test_buffer_dtype_and_byte_budget(dtype, buffer_dtype):
    """fp16 gets fp32 logits (+ an fp16 dlogits buffer) in the same bytes; bf16/fp32 keep one in-place buffer."""
    vocab, budget = 1000, 48 * 2**20
    like = torch.empty(1, dtype=dtype)
    for with_dlogits in (False, True):
        buf, rows = fused._logits_buffer(10**6, vocab, like, None, budget, with_dlogits)
        dl = glc.dlogits_buffer(buf, dtype)
        assert buf.dtype == buffer_dtype and dl.dtype == dtype
        assert (dl is buf) == (dtype != torch.float16)
        used = buf.numel() * buf.element_size() + (0 if dl is buf or not with_dlogits else dl.numel() * 2)
        assert budget - 16 * vocab * 6 < used <= budget  # within one 16-row step of the budget
    assert fused._logits_buffer(10**6, vocab, like, 7)[1] == 7  # an explicit chunk_tokens is kept


def test_dlogits_into_fp16_buffer_equals_in_place_then_cast():
    torch.manual_seed(1)
    rows, vocab = 6, 300
    logits = torch.randn(rows, vocab) * 30
    bias = torch.randn(vocab).half()
    ids = torch.randint(0, vocab, (rows,))
    lse = torch.logsumexp((logits + bias.float()) * 0.5, -1)
    coef = torch.randn(rows)
    in_place = logits.clone()
    gk.dlogits_inplace(in_place, bias, ids, lse, coef, 0.5)
    out = torch.full((rows, vocab), float("nan"), dtype=torch.float16)
    src = logits.clone()
    gk.dlogits_inplace(src, bias, ids, lse, coef, 0.5, out)
    assert torch.equal(src, logits)  # the fp32 logits are only read
    assert torch.equal(out, in_place.half())
    with pytest.raises(ValueError, match="out must be shaped like logits"):
        gk.dlogits_inplace(logits.clone(), bias, ids, lse, coef, 0.5, out[:, :-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_only_fp16_writes_dlogits_out_of_place(monkeypatch, dtype, level):
    """bf16 keeps the one-buffer, in-place dlogits kernel; fp16 writes fp16 dlogits next to fp32 logits."""
    seen = []

    def spy(logits, bias, ids, lse, coef, inv_t, out=None):
        seen.append((logits.dtype, out is None or out is logits, None if out is None else out.dtype))
        return gk.dlogits_inplace(logits, bias, ids, lse, coef, inv_t, out)

    monkeypatch.setattr(fused, "dlogits_inplace", spy)
    inp = make_inputs(dtype=None, b=2, t=9, v=203)
    run_op(fused.fused_linear_grpo_loss, inp, loss_params(inp, "bnpo", level, 0.0, None, False), dtype,
           chunk_tokens=8)
    want = (torch.float32, False, torch.float16) if dtype == torch.float16 else (dtype, True, dtype)
    assert seen and all(call == want for call in seen)
