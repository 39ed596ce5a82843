"""Fused GRPO loss: input layouts, the reference's memory bound and scalar-option validation.

Three regressions found by black-box probes (test_grpo_loss.py / _ops.py hold the numerics and ops):
  * strided inputs on the kernel path: ``token_ids[:, ::2]`` with no padding was read as contiguous by
    the row kernels (loss 0.131 instead of -0.094, no error). Every tensor input is passed here as a
    stride-2 view and must give exactly what its contiguous copy gives; the launchers are also called
    directly with strided side buffers (ids, lse, coef, outputs).
  * the PyTorch reference held ~4 chunk buffers and a full fp32 copy of a bf16 weight per chunk
    (1.06 GiB for log-probs at V = 152k, budget 0.5 GiB). Its allocations are measured with torch's
    profiler (CPU allocator events) against the bound the chunk sizing promises.
  * NaN/inf/str scalar options were accepted (beta = nan silently dropped the KL term) and NumPy /
    0-d tensor temperatures rejected; H = 0 raised a RuntimeError from reshape.
"""

import math

import numpy as np
import pytest
import torch
from conftest import assert_close_to_ref
from torch.profiler import ProfilerActivity, profile

from r1fast.kernels import grpo_loss as fused
from r1fast.kernels import grpo_loss_kernels as gk
from r1fast.kernels import ref_grpo_loss as ref

B, T, H, V = 3, 8, 16, 97


def _strided(t):
    """A stride-2 view (last dim) holding ``t``'s values: reshape(-1) of it is a view, not a copy."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _loss_inputs(padded):
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[0, 5:] = False
        mask[2, :2] = False
    return dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g) / 4,
                token_ids=torch.randint(0, V, (B, T), generator=g), mask=mask,
                advantages=torch.randn(B, generator=g), old_logps=torch.randn(B, T, generator=g) * 0.2 - 4.5,
                ref_logps=torch.randn(B, T, generator=g) * 0.2 - 4.5,
                rollout_is_ratio=torch.rand(B, T, generator=g) + 0.5, bias=torch.randn(V, generator=g) * 0.3)


def _loss_and_grads(inp, level):
    hidden, weight, bias = (inp[k].detach().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    kw = {k: v for k, v in inp.items() if k not in ("hidden", "weight", "bias", "token_ids", "mask", "advantages")}
    loss, metrics = fused.fused_linear_grpo_loss(hidden, weight, inp["token_ids"], inp["mask"], inp["advantages"],
                                                 bias=bias, beta=0.04, temperature=0.7, importance_level=level, **kw)
    loss.backward()
    return [loss, *(metrics[k] for k in sorted(metrics)), hidden.grad, weight.grad, bias.grad]


# ----------------------------------------------------------------------------------------------
# finding 1: strided inputs on the kernel path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "padded"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_strided_inputs_give_the_contiguous_result(level, padded):
    inp = _loss_inputs(padded)
    assert fused._kernel_applies(inp["hidden"]), "this test must exercise the Triton kernels"
    expected = _loss_and_grads(inp, level)
    for name in inp:  # one strided input at a time: a wrong result names the input that caused it
        got = _loss_and_grads({**inp, name: _strided(inp[name])}, level)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m, name=name: f"strided {name}: {m}")


def test_strided_inputs_to_logprobs_kernel():
    inp = _loss_inputs(False)
    args = [inp["hidden"], inp["weight"], inp["token_ids"]]
    expected = fused.fused_linear_logprobs(*args, bias=inp["bias"], temperature=0.7, return_entropy=True)
    for i in range(len(args) + 1):
        strided = [_strided(a) if j == i else a for j, a in enumerate(args)]
        bias = _strided(inp["bias"]) if i == len(args) else inp["bias"]
        got = fused.fused_linear_logprobs(*strided, bias=bias, temperature=0.7, return_entropy=True)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_row_launchers_accept_strided_side_buffers():
    """row_stats / dlogits_inplace with stride-2 ids, bias, lse, coef and outputs == contiguous ones."""
    g = torch.Generator().manual_seed(3)
    c = 5
    logits = torch.randn(c, V, generator=g) * 3
    bias, ids, coef = torch.randn(V, generator=g), torch.randint(0, V, (c,), generator=g), torch.randn(c, generator=g)
    outs = [torch.full((c,), math.nan) for _ in range(3)]
    gk.row_stats(logits, bias, ids, 0.7, *outs)
    strided_outs = [torch.full((c, 2), math.nan)[:, 0] for _ in range(3)]
    gk.row_stats(logits, _strided(bias), _strided(ids), 0.7, *strided_outs)
    for s, o in zip(strided_outs, outs, strict=True):
        torch.testing.assert_close(s, o, rtol=0, atol=0)
    d_contig, d_strided = logits.clone(), logits.clone()
    gk.dlogits_inplace(d_contig, bias, ids, outs[0], coef, 0.7)
    gk.dlogits_inplace(d_strided, _strided(bias), _strided(ids), _strided(outs[0]), _strided(coef), 0.7)
    torch.testing.assert_close(d_strided, d_contig, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unit stride"):  # written in place: cannot be made contiguous
        gk.row_stats(logits.t().contiguous().t(), bias, ids, 0.7, *outs)


# ----------------------------------------------------------------------------------------------
# finding 2: the reference's peak extra memory
# ----------------------------------------------------------------------------------------------


def _peak_allocated(fn):
    """Peak bytes allocated by torch's CPU allocator while ``fn`` runs (net of frees), from profiler events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocations: the measurement would be vacuous"
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def test_ref_chunk_tokens_counts_every_live_buffer():
    for vocab in (1001, 32000, 152064):
        for dtype in (torch.float32, torch.float64):
            rows = ref.ref_chunk_tokens(vocab, dtype)
            per_buffer = rows * vocab * torch.finfo(dtype).bits // 8
            assert rows % 16 == 0 and rows >= 16
            assert ref.REF_LIVE_CHUNK_BUFFERS * per_buffer <= ref.REF_CHUNK_BYTES
    # 2 fp32 buffers of 208 x 152064 = 242 MiB: with the weight slice (32 MiB) well inside 0.5 GiB
    assert ref.ref_chunk_tokens(152064, torch.float32) == 208


def _logprobs_case(dtype, n=160, vocab=3001, width=64):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, width, generator=g).to(dtype)
    return h, (torch.randn(vocab, width, generator=g) / 8).to(dtype), torch.randint(0, vocab, (n,), generator=g)


# O(N) outputs, ids.long(), the fp32 hidden chunk, max / lse rows: a few KiB at these shapes
SMALL_BYTES = 64 * 2**10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_logprobs_peak_memory_within_chunk_bound(dtype, monkeypatch):
    """48-row chunks of V = 3001 and a bf16 weight upcast 256 rows at a time: measured peak <= the bound.

    The old code held ~4.5 chunk buffers (logits, log_softmax, exp, exp·logp) plus a 768 KiB fp32 copy of
    the bf16 weight: 1.1 (fp32) to 1.9 (bf16) MiB over this bound.
    """
    h, w, ids = _logprobs_case(dtype)
    live_buffers = 2  # shifted logits + one buffer of temporaries (ref.REF_LIVE_CHUNK_BUFFERS, checked below)
    monkeypatch.setattr(ref, "WEIGHT_SLICE_BYTES", 64 * 2**10, raising=False)  # 256 rows at H = 64: 12 slices
    peak = _peak_allocated(lambda: ref.fused_linear_logprobs(h, w, ids, return_entropy=True, chunk_tokens=48))
    slice_bytes = 64 * 2**10 if dtype != torch.float32 else 0
    assert peak <= live_buffers * 48 * w.shape[0] * 4 + slice_bytes + SMALL_BYTES, f"peak {peak} B"
    assert ref.REF_LIVE_CHUNK_BUFFERS == live_buffers
    # numerics unchanged by the slicing: fp64 oracle on the same (bf16-rounded) values
    z64 = (h.double() @ w.double().t()).log_softmax(-1)
    z32 = (h.float() @ w.float().t()).log_softmax(-1)
    logp, ent = ref.fused_linear_logprobs(h, w, ids, return_entropy=True, chunk_tokens=48)
    assert_close_to_ref(logp, z64.gather(-1, ids[:, None])[:, 0], z32.gather(-1, ids[:, None])[:, 0], name="logp")
    assert_close_to_ref(ent, -(z64.exp() * z64).sum(-1), -(z32.exp() * z32).sum(-1), name="entropy")


def test_reference_default_chunks_fit_ref_chunk_bytes(monkeypatch):
    """With no chunk_tokens, every buffer alive at once fits REF_CHUNK_BYTES (shrunk to 2 x 48 rows here)."""
    h, w, ids = _logprobs_case(torch.float32)
    monkeypatch.setattr(ref, "REF_CHUNK_BYTES", ref.REF_LIVE_CHUNK_BUFFERS * 48 * w.shape[0] * 4)
    assert ref.ref_chunk_tokens(w.shape[0], torch.float32) == 48
    peak = _peak_allocated(lambda: ref.fused_linear_logprobs(h, w, ids, return_entropy=True))
    assert peak <= ref.REF_CHUNK_BYTES + SMALL_BYTES, f"peak {peak} B"


def test_reference_sliced_bf16_weight_gradients(monkeypatch):
    """Autograd through the sliced fp32 matmul (checkpointed chunks): error vs fp64 as small as unsliced.

    The bound is the repo's rule (a multiple of the established path's error): the unsliced run is one
    slice (the whole weight upcast at once, as before), the sliced one 16 vocab rows (7 slices).
    """
    inp = _loss_inputs(True)
    runs = {}
    for label, dtype, slice_bytes in (("sliced", torch.bfloat16, 16 * 4 * H), ("whole", torch.bfloat16, 2**30),
                                      ("fp64", torch.float64, 2**30)):
        monkeypatch.setattr(ref, "WEIGHT_SLICE_BYTES", slice_bytes)
        h = inp["hidden"].to(torch.bfloat16).to(dtype).requires_grad_(True)
        w = inp["weight"].to(torch.bfloat16).to(dtype).requires_grad_(True)
        loss, _ = ref.fused_linear_grpo_loss(h, w, inp["token_ids"], inp["mask"], inp["advantages"],
                                             old_logps=inp["old_logps"], chunk_tokens=7)
        loss.backward()
        runs[label] = (loss.detach(), h.grad, w.grad)
    for i, (name, row) in enumerate((("loss", torch.float32), ("grad_h", torch.bfloat16), ("grad_w", torch.bfloat16))):
        assert_close_to_ref(runs["sliced"][i], runs["fp64"][i], runs["whole"][i], dtype=row, name=name)


# ----------------------------------------------------------------------------------------------
# finding 3: scalar options
# ----------------------------------------------------------------------------------------------


BAD_SCALARS = {
    "beta_nan": (dict(beta=math.nan), "beta must be finite"),
    "beta_inf": (dict(beta=math.inf), "beta must be finite"),
    "eps_low_nan": (dict(eps_low=math.nan), "eps_low must be finite"),
    "eps_high_inf": (dict(eps_high=math.inf), "eps_high must be finite"),
    "eps_high_neg": (dict(eps_high=-0.1), "eps_high must be >= 0"),
    "delta_nan": (dict(delta=math.nan), "delta must be finite"),
    "delta_zero": (dict(delta=0.0), "delta must be > 0"),
    "len_inf": (dict(loss_type="dr_grpo", max_completion_length=math.inf), "max_completion_length must be finite"),
    "len_nan": (dict(loss_type="dr_grpo", max_completion_length=math.nan), "max_completion_length must be finite"),
    "len_str": (dict(loss_type="dr_grpo", max_completion_length="8"), "max_completion_length must be a real"),
    "len_zero": (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length must be > 0"),
    "temperature_nan": (dict(temperature=math.nan), "temperature must be finite"),
    "temperature_bool": (dict(temperature=True), "temperature must be a real"),
    "temperature_vector": (dict(temperature=torch.tensor([0.7, 0.7])), "temperature must be a real"),
    "temperature_zero_tensor": (dict(temperature=torch.tensor(0.0)), "temperature must be > 0"),
}


def _small_call(h=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, h, generator=g), torch.randn(11, h, generator=g), torch.randint(0, 11, (2, 4), generator=g),
            torch.ones(2, 4, dtype=torch.bool), torch.randn(2, generator=g)), torch.randn(2, 4, generator=g) - 3


@pytest.mark.parametrize("case", sorted(BAD_SCALARS))
def test_bad_scalar_option_raises_value_error_naming_it(case):
    args, ref_lp = _small_call()
    kw, match = BAD_SCALARS[case]
    for impl in (fused.fused_linear_grpo_loss, ref.fused_linear_grpo_loss):
        with pytest.raises(ValueError, match=match):
            impl(*args, ref_logps=ref_lp, **kw)


def test_zero_hidden_width_raises_value_error():
    args, _ = _small_call(h=0)
    for impl in (fused.fused_linear_grpo_loss, ref.fused_linear_grpo_loss):
        with pytest.raises(ValueError, match=r"hidden's last dim \(H\) must be > 0"):
            impl(*args)
    for impl in (fused.fused_linear_logprobs, ref.fused_linear_logprobs):
        with pytest.raises(ValueError, match=r"hidden's last dim \(H\)"):
            impl(args[0], args[1], args[2])


@pytest.mark.parametrize("value", [np.float32(0.7), np.float64(0.7), torch.tensor(0.7), torch.tensor(0.7).double()],
                         ids=["np32", "np64", "tensor32", "tensor64"])
def test_numpy_and_zero_dim_tensor_scalars_are_numbers(value):
    """A NumPy or 0-d tensor temperature (and beta) equals the same Python float, on both paths."""
    args, ref_lp = _small_call()
    for impl in (fused.fused_linear_grpo_loss, ref.fused_linear_grpo_loss):
        got, metrics = impl(*args, ref_logps=ref_lp, beta=value * 0.1, temperature=value)
        want, want_metrics = impl(*args, ref_logps=ref_lp, beta=float(value) * 0.1, temperature=float(value))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert "kl" in metrics and torch.isfinite(metrics["kl"]) and "kl" in want_metrics
