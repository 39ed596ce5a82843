"""Fused GRPO loss and log-probs (kernels/grpo_loss.py) against an independent dense fp64 oracle.

The oracle below materializes [B, T, V] logits and transcribes TRL's GRPOTrainer formulas directly
(it shares no code with kernels/ref_grpo_loss.py). The full option matrix (loss_type x
importance_level x beta x delta, rollout_is_ratio alternating) runs on the cheap chunked torch
reference; the Triton kernels run under the interpreter on a subset that still reaches every kernel
path (bias on/off, entropy on/off, one/several chunks, token- and sequence-level sweeps, bf16/fp32).
Argument validation, torch.compile, autocast and double backward are in test_grpo_loss_ops.py.
"""

import itertools
import math

import pytest
import torch
from conftest import assert_close_to_ref

from r1fast.kernels import grpo_loss as fused
from r1fast.kernels import ref_grpo_loss as ref

B, T, H, V = 3, 37, 96, 1001
TEMPERATURE = 0.7
MAX_LEN = 40


# ----------------------------------------------------------------------------------------------
# oracle and inputs
# ----------------------------------------------------------------------------------------------


def dense_oracle(hidden, weight, bias, ids, mask, adv, *, old=None, ref_lp=None, is_ratio=None, beta=0.0,
                 eps_low=0.2, eps_high=0.2, delta=None, temperature=TEMPERATURE, loss_type="grpo",
                 level="token", max_len=MAX_LEN, normalizer=None):
    """TRL GRPOTrainer's loss on materialized logits, in the inputs' dtype. Returns (loss, metrics, logp, ent)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    all_lp = torch.log_softmax(logits.float() if logits.dtype == torch.bfloat16 else logits, -1)
    logp = all_lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(all_lp.exp() * all_lp).sum(-1)
    m = mask.to(logp.dtype)
    old_lp = logp.detach() if old is None else old
    log_ratio = logp - old_lp
    if level == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if is_ratio is not None:
        per_token = per_token * is_ratio
    if beta != 0.0:
        kl = torch.exp(ref_lp - logp) - (ref_lp - logp) - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (m.shape[0] * max_len)
    else:
        loss = (per_token * m).sum() / (m.sum().clamp(min=1.0) if normalizer is None else normalizer)
    ratio = torch.exp(log_ratio).expand_as(m)
    clipped = ((ratio < 1 - eps_low) & (adv.unsqueeze(1) < 0)) | ((ratio > 1 + eps_high) & (adv.unsqueeze(1) > 0))
    count = m.sum().clamp(min=1.0)
    metrics = {"clip_frac": (clipped * m).sum() / count, "entropy": (entropy * m).sum() / count}
    if beta != 0.0:
        metrics["kl"] = (kl * m).sum() / count
    return loss, metrics, logp, entropy


def make_inputs(dtype=torch.float32, with_bias=True, b=B, t=T, h=H, v=V):
    """Random inputs with realistic spreads: ratios land on both sides of the clip range and delta."""
    hidden = torch.randn(b, t, h)
    weight = torch.randn(v, h) * (2.0 / math.sqrt(h))
    bias = torch.randn(v) * 0.5 if with_bias else None
    ids = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.25
    mask[1] = False  # a fully masked row
    mask[0, -5:] = False  # right padding
    adv = torch.randn(b, dtype=torch.float64)
    with torch.no_grad():
        true_lp = dense_oracle(hidden.double(), weight.double(), None if bias is None else bias.double(), ids,
                               mask, adv)[2]
    offset = (torch.rand(b, 1, dtype=torch.float64) - 0.5) * 0.8  # moves whole sequences (GSPO clipping)
    old = (true_lp + 0.25 * torch.randn(b, t, dtype=torch.float64) + offset).float()
    ref_lp = (true_lp + 0.25 * torch.randn(b, t, dtype=torch.float64)).float()
    is_ratio = (0.75 + 0.5 * torch.rand(b, t)).float()
    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    return dict(hidden=cast(hidden), weight=cast(weight), bias=None if bias is None else cast(bias), ids=ids,
                mask=mask, adv=adv.float(), old=old, ref=ref_lp, is_ratio=is_ratio)


def leaves(inp, dtype):
    """Fresh leaf tensors (hidden, weight, bias) of ``dtype`` that require grad."""
    out = [inp["hidden"].to(dtype), inp["weight"].to(dtype), None if inp["bias"] is None else inp["bias"].to(dtype)]
    return [None if x is None else x.detach().clone().requires_grad_(True) for x in out]


def run_op(fn, inp, params, dtype, **extra):
    """Loss, metrics and grads (hidden, weight, bias) of ``fn`` with the r1fast signature."""
    h, w, b = leaves(inp, dtype)
    loss, metrics = fn(h, w, inp["ids"], inp["mask"], inp["adv"].to(dtype), bias=b, temperature=TEMPERATURE,
                       **params, **extra)
    loss.backward()
    return loss, metrics, [h.grad, w.grad, None if b is None else b.grad]


def run_oracle(inp, params, dtype):
    h, w, b = leaves(inp, dtype)
    p = dict(params)
    loss, metrics, _, _ = dense_oracle(
        h, w, b, inp["ids"], inp["mask"], inp["adv"].to(dtype),
        old=None if p.get("old_logps") is None else p["old_logps"].to(dtype),
        ref_lp=None if p.get("ref_logps") is None else p["ref_logps"].to(dtype),
        is_ratio=None if p.get("rollout_is_ratio") is None else p["rollout_is_ratio"].to(dtype),
        beta=p.get("beta", 0.0), delta=p.get("delta"), loss_type=p.get("loss_type", "grpo"),
        level=p.get("importance_level", "token"), normalizer=p.get("normalizer"))
    loss.backward()
    return loss, metrics, [h.grad, w.grad, None if b is None else b.grad]


def loss_params(inp, loss_type, level, beta, delta, with_ratio, with_old=True):
    params = dict(loss_type=loss_type, importance_level=level, beta=beta, delta=delta,
                  old_logps=inp["old"] if with_old else None, ref_logps=inp["ref"] if beta > 0 else None,
                  rollout_is_ratio=inp["is_ratio"] if with_ratio else None)
    if loss_type == "dr_grpo":
        params["max_completion_length"] = MAX_LEN
    if loss_type == "dapo":
        params["normalizer"] = 123.0  # e.g. the global token count of several micro-batches
    return params


def check_against(out, oracle64, torch_same_dtype=None, dtype=torch.float32):
    """Every output of ``out`` within the tolerance of the fp64 oracle (bounded by PyTorch's own error)."""
    names = ("hidden.grad", "weight.grad", "bias.grad")
    t_loss, t_metrics, t_grads = torch_same_dtype if torch_same_dtype is not None else (None, {}, [None] * 3)
    assert_close_to_ref(out[0], oracle64[0], t_loss, dtype=dtype, name="loss")
    assert set(out[1]) == set(oracle64[1])
    for key in oracle64[1]:
        assert_close_to_ref(out[1][key], oracle64[1][key], t_metrics.get(key), dtype=dtype, name=key)
    for name, g, g64, gt in zip(names, out[2], oracle64[2], t_grads):
        if g64 is None:
            assert g is None
        else:
            assert_close_to_ref(g, g64, gt, dtype=dtype, name=name)


# ----------------------------------------------------------------------------------------------
# the option matrix on the torch reference (fp64, cheap)
# ----------------------------------------------------------------------------------------------

MATRIX = list(itertools.product(ref.LOSS_TYPES, ref.IMPORTANCE_LEVELS, (0.0, 0.04), (None, 1.5)))


@pytest.mark.parametrize("loss_type,level,beta,delta", MATRIX)
def test_reference_matches_dense_oracle(loss_type, level, beta, delta):
    inp = make_inputs(dtype=None)
    with_ratio = MATRIX.index((loss_type, level, beta, delta)) % 2 == 0
    params = loss_params(inp, loss_type, level, beta, delta, with_ratio)
    out = run_op(ref.fused_linear_grpo_loss, inp, params, torch.float64, chunk_tokens=32)
    oracle = run_oracle(inp, params, torch.float64)
    assert oracle[1]["clip_frac"] > 0 or level == "sequence"  # the inputs do exercise clipping
    check_against(out, oracle, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (or compiled on a GPU)
# ----------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # loss_type, level, beta, delta, rollout ratio, bias, chunk_tokens (None: one chunk)
    ("grpo", "token", 0.04, None, True, True, 32),
    ("bnpo", "sequence", 0.04, 1.5, False, True, 40),
    ("dr_grpo", "token", 0.0, 1.5, True, False, None),
    ("dapo", "sequence", 0.0, None, True, False, None),
]


@pytest.mark.parametrize("loss_type,level,beta,delta,with_ratio,with_bias,chunk", KERNEL_CASES)
def test_kernel_loss_fp32(loss_type, level, beta, delta, with_ratio, with_bias, chunk):
    inp = make_inputs(with_bias=with_bias)
    params = loss_params(inp, loss_type, level, beta, delta, with_ratio)
    out = run_op(fused.fused_linear_grpo_loss, inp, params, torch.float32, chunk_tokens=chunk)
    check_against(out, run_oracle(inp, params, torch.float64), run_oracle(inp, params, torch.float32))


def test_kernel_loss_bf16_bounded_by_torch_bf16():
    inp = make_inputs(dtype=torch.bfloat16)
    # No old_logps (r = 1 exactly): with them, bf16 rounding of logp moves tokens across the clip
    # boundary in PyTorch's bf16 run, its gradient error jumps to ~60% and the bound means nothing.
    params = loss_params(inp, "bnpo", "token", 0.04, 1.5, True, with_old=False)
    out = run_op(fused.fused_linear_grpo_loss, inp, params, torch.bfloat16, chunk_tokens=48)
    assert out[2][0].dtype == torch.bfloat16 and out[2][1].dtype == torch.bfloat16
    check_against(out, run_oracle(inp, params, torch.float64), run_oracle(inp, params, torch.bfloat16),
                  dtype=torch.bfloat16)


def test_kernel_without_old_logps_temperature_one_no_padding():
    """old = logp.detach(): r = 1 in value, but the gradient is A·r·dlogp (on-policy GRPO).

    Every token active: the kernel path that skips the gather/scatter of hidden rows."""
    inp = make_inputs(with_bias=False)
    inp["mask"] = torch.ones(B, T, dtype=torch.bool)
    params = loss_params(inp, "grpo", "token", 0.0, None, False, with_old=False)
    h, w, _ = leaves(inp, torch.float32)
    loss, _ = fused.fused_linear_grpo_loss(h, w, inp["ids"], inp["mask"], inp["adv"], chunk_tokens=64, **params)
    loss.backward()
    h64, w64, _ = leaves(inp, torch.float64)
    loss64 = dense_oracle(h64, w64, None, inp["ids"], inp["mask"], inp["adv"].double(), temperature=1.0)[0]
    loss64.backward()
    assert_close_to_ref(loss, loss64, atol=1e-6, name="loss")
    assert_close_to_ref(h.grad, h64.grad, atol=1e-6, name="hidden.grad")
    assert_close_to_ref(w.grad, w64.grad, atol=1e-6, name="weight.grad")


@pytest.mark.parametrize("impl", [fused.fused_linear_grpo_loss, ref.fused_linear_grpo_loss], ids=["kernel", "ref"])
def test_fully_masked_batch_gives_zero_loss_and_grads(impl):
    inp = make_inputs()
    h, w, b = leaves(inp, torch.float32)
    mask = torch.zeros(B, T, dtype=torch.bool)
    ids = torch.full((B, T), -100)  # padding ids are never looked at
    loss, metrics = impl(h, w, ids, mask, inp["adv"], bias=b, ref_logps=inp["ref"], beta=0.04,
                         loss_type="bnpo", importance_level="sequence")
    loss.backward()
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in metrics.values())
    for g in (h.grad, w.grad, b.grad):
        assert torch.equal(g, torch.zeros_like(g))


def test_poisoned_padding_and_buffers_do_not_leak(monkeypatch):
    """NaN in padded old/ref/ratio, -100 padding ids and a NaN-filled logits buffer change nothing."""
    inp = make_inputs()
    params = loss_params(inp, "grpo", "token", 0.04, 1.5, True)
    clean = run_op(fused.fused_linear_grpo_loss, inp, params, torch.float32, chunk_tokens=24)

    real_buffer = fused._logits_buffer

    def poisoned_buffer(*args, **kwargs):
        buf, chunk = real_buffer(*args, **kwargs)
        return buf.fill_(float("nan")), chunk

    monkeypatch.setattr(fused, "_logits_buffer", poisoned_buffer)
    pad = ~inp["mask"]
    dirty = dict(inp, ids=inp["ids"].masked_fill(pad, -100))
    dirty_params = dict(params, old_logps=inp["old"].masked_fill(pad, float("nan")),
                        ref_logps=inp["ref"].masked_fill(pad, float("inf")),
                        rollout_is_ratio=inp["is_ratio"].masked_fill(pad, float("nan")))
    poisoned = run_op(fused.fused_linear_grpo_loss, dirty, dirty_params, torch.float32, chunk_tokens=24)
    assert torch.equal(poisoned[0], clean[0])
    for g, g_clean in zip(poisoned[2], clean[2]):
        assert torch.equal(g, g_clean)


def test_grad_scaling_partial_requires_grad_and_no_grad():
    inp = make_inputs(with_bias=False)
    params = loss_params(inp, "dapo", "token", 0.04, None, True)
    w = inp["weight"].clone().requires_grad_(True)  # frozen hidden: only the lm_head learns
    loss, _ = fused.fused_linear_grpo_loss(inp["hidden"], w, inp["ids"], inp["mask"], inp["adv"],
                                           temperature=TEMPERATURE, **params)
    (2.5 * loss).backward()
    oracle = run_oracle(inp, params, torch.float64)
    assert_close_to_ref(w.grad, 2.5 * oracle[2][1], atol=1e-6, name="2.5 x weight.grad")
    with torch.no_grad():
        loss_ng, metrics_ng = fused.fused_linear_grpo_loss(inp["hidden"], w, inp["ids"], inp["mask"], inp["adv"],
                                                           temperature=TEMPERATURE, **params)
    assert loss_ng.grad_fn is None
    assert_close_to_ref(loss_ng, oracle[0], atol=1e-6, name="loss (no_grad)")
    assert_close_to_ref(metrics_ng["kl"], oracle[1]["kl"], atol=1e-6, name="kl (no_grad)")


def test_torch_env_forces_reference(monkeypatch):
    inp = make_inputs()
    params = loss_params(inp, "bnpo", "token", 0.04, None, False)
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    out = run_op(fused.fused_linear_grpo_loss, inp, params, torch.float32)
    assert out[0].grad_fn is not None and "FusedLinearGRPO" not in type(out[0].grad_fn).__name__
    check_against(out, run_oracle(inp, params, torch.float64), run_oracle(inp, params, torch.float32))


# ----------------------------------------------------------------------------------------------
# log-probs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,with_bias,chunk", [("3d", True, 40), ("2d", False, None)])
def test_kernel_logprobs_and_entropy_fp32(layout, with_bias, chunk):
    inp = make_inputs(with_bias=with_bias)
    h, ids = inp["hidden"], inp["ids"]
    if layout == "2d":
        h, ids = h.reshape(-1, H), ids.reshape(-1)
    lp, ent = fused.fused_linear_logprobs(h, inp["weight"], ids, bias=inp["bias"], temperature=TEMPERATURE,
                                          return_entropy=True, chunk_tokens=chunk)
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    b64 = None if inp["bias"] is None else inp["bias"].double()
    _, _, lp64, ent64 = dense_oracle(inp["hidden"].double(), inp["weight"].double(), b64, inp["ids"], inp["mask"],
                                     inp["adv"].double())
    _, _, lp32, ent32 = dense_oracle(inp["hidden"], inp["weight"], inp["bias"], inp["ids"], inp["mask"], inp["adv"])
    assert_close_to_ref(lp.reshape(B, T), lp64, lp32, name="logprobs")
    assert_close_to_ref(ent.reshape(B, T), ent64, ent32, name="entropy")
    alone = fused.fused_linear_logprobs(h, inp["weight"], ids, bias=inp["bias"], temperature=TEMPERATURE)
    assert torch.equal(alone, lp)  # the entropy-free kernel variant gives the same log-probs


def test_kernel_logprobs_bf16_bounded_by_torch_bf16():
    inp = make_inputs(dtype=torch.bfloat16)
    lp, ent = fused.fused_linear_logprobs(inp["hidden"], inp["weight"], inp["ids"], bias=inp["bias"],
                                          temperature=TEMPERATURE, return_entropy=True, chunk_tokens=64)
    _, _, lp64, ent64 = dense_oracle(inp["hidden"].double(), inp["weight"].double(), inp["bias"].double(),
                                     inp["ids"], inp["mask"], inp["adv"].double())
    _, _, lp16, ent16 = dense_oracle(inp["hidden"], inp["weight"], inp["bias"], inp["ids"], inp["mask"],
                                     inp["adv"].bfloat16())
    assert_close_to_ref(lp, lp64, lp16, dtype=torch.bfloat16, name="logprobs")
    assert_close_to_ref(ent, ent64, ent16, dtype=torch.bfloat16, name="entropy")


def test_reference_logprobs_matches_oracle():
    inp = make_inputs(dtype=None)
    lp, ent = ref.fused_linear_logprobs(inp["hidden"].double(), inp["weight"].double(), inp["ids"],
                                        bias=inp["bias"].double(), temperature=TEMPERATURE, return_entropy=True,
                                        chunk_tokens=16)
    _, _, lp64, ent64 = dense_oracle(inp["hidden"].double(), inp["weight"].double(), inp["bias"].double(),
                                     inp["ids"], inp["mask"], inp["adv"].double())
    assert_close_to_ref(lp, lp64, name="logprobs")
    assert_close_to_ref(ent, ent64, name="entropy")


def test_kernel_entropy_and_logprobs_large_logit_offset():
    """Softmax is shift-invariant; the kernel's statistics must be too, to fp32 PyTorch's own error.

    An offset of 1e3-1e4 on every logit (ulp 6e-5-1e-3) made the old lse - sum(p*z) entropy 8x-22x
    PyTorch's error. V = 9000 spans three 4096-wide tiles, and the ramp makes the row max grow from
    tile to tile, so the rescaling of the running sums is exercised too.
    """
    n, h, v = 6, 16, 9000
    hidden, weight, ids = torch.randn(n, h), torch.randn(v, h) * 0.5, torch.randint(0, v, (n,))
    for offset in (1e3, 1e4):
        bias = offset + torch.linspace(0.0, 4.0, v) + 0.1 * torch.randn(v)
        lp, ent = fused.fused_linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True)
        out = {}
        for dtype in (torch.float64, torch.float32):
            all_lp = torch.log_softmax(hidden.to(dtype) @ weight.to(dtype).t() + bias.to(dtype), -1)
            out[dtype] = (all_lp.gather(-1, ids[:, None]).squeeze(-1), -(all_lp.exp() * all_lp).sum(-1))
        assert_close_to_ref(lp, out[torch.float64][0], out[torch.float32][0], name=f"logprobs, offset {offset:g}")
        assert_close_to_ref(ent, out[torch.float64][1], out[torch.float32][1], name=f"entropy, offset {offset:g}")


def test_kernel_loss_grads_large_logit_offset():
    """The gradients must be shift-invariant too: softmax = exp(z - lse) with lse ~ 1e3-1e4 rounded to fp32 lost
    ulp(lse) of every probability: hidden.grad 7.6x (offset 1e3) and 10.8x (1e4) PyTorch's fp32 error, which
    works relative to the row max."""
    b, t, h, v = 2, 3, 16, 9000
    hidden, weight = torch.randn(b, t, h), torch.randn(v, h) * 0.5
    ids, mask, adv = torch.randint(0, v, (b, t)), torch.ones(b, t, dtype=torch.bool), torch.tensor([1.0, -0.5])
    for offset in (1e3, 1e4):
        bias = offset + torch.linspace(0.0, 4.0, v) + 0.1 * torch.randn(v)
        out = {}
        for dtype, fn in ((torch.float32, fused.fused_linear_grpo_loss), (torch.float64, None), ("eager", None)):
            dt = torch.float32 if dtype == "eager" else dtype
            leaves = [x.to(dt).clone().requires_grad_(True) for x in (hidden, weight, bias)]
            if fn is not None:
                loss, _ = fn(*leaves[:2], ids, mask, adv, bias=leaves[2], loss_type="bnpo", chunk_tokens=4)
            else:
                loss = dense_oracle(*leaves, ids, mask, adv.to(dt), temperature=1.0, loss_type="bnpo")[0]
            loss.backward()
            out[dtype] = [x.grad for x in leaves]
        for name, g, g64, gt in zip(("hidden", "weight", "bias"), out[torch.float32], out[torch.float64], out["eager"]):
            assert_close_to_ref(g, g64, gt, name=f"{name}.grad, offset {offset:g}")


# ----------------------------------------------------------------------------------------------
# GPU: real vocabulary, compiled kernels
# ----------------------------------------------------------------------------------------------

GPU_V = 152064


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_loss_real_vocab(dtype, level):
    torch.set_default_device("cuda")
    try:
        inp = make_inputs(dtype=dtype, b=4, t=160, h=256, v=GPU_V)
        # bf16 without old_logps: see test_kernel_loss_bf16_bounded_by_torch_bf16
        params = loss_params(inp, "bnpo", level, 0.04, 1.5, True, with_old=dtype == torch.float32)
        params = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
        out = run_op(fused.fused_linear_grpo_loss, inp, params, dtype, chunk_tokens=256)
        check_against(out, run_oracle(inp, params, torch.float64), run_oracle(inp, params, dtype), dtype=dtype)
    finally:
        torch.set_default_device("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_logprobs_real_vocab(dtype):
    torch.set_default_device("cuda")
    try:
        inp = make_inputs(dtype=dtype, b=4, t=300, h=512, v=GPU_V)
        lp, ent = fused.fused_linear_logprobs(inp["hidden"], inp["weight"], inp["ids"], bias=inp["bias"],
                                              temperature=TEMPERATURE, return_entropy=True)
        args64 = (inp["hidden"].double(), inp["weight"].double(), inp["bias"].double())
        _, _, lp64, ent64 = dense_oracle(*args64, inp["ids"], inp["mask"], inp["adv"].double())
        _, _, lpt, entt = dense_oracle(inp["hidden"], inp["weight"], inp["bias"], inp["ids"], inp["mask"],
                                       inp["adv"].to(dtype))
        assert_close_to_ref(lp, lp64, lpt, dtype=dtype, name="logprobs")
        assert_close_to_ref(ent, ent64, entt, dtype=dtype, name="entropy")
    finally:
        torch.set_default_device("cpu")
