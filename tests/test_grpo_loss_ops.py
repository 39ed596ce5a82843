"""The fused GRPO loss / log-prob ops as ``torch.ops.r1fast.*``: opcheck, torch.compile, every backend.

Tiny shapes (the kernels run under Triton's interpreter on CPU). ``torch.compile`` with the
``aot_eager`` backend and ``fullgraph=True`` must trace both public functions, forward and backward,
without a graph break and give bitwise the eager results: the compiled graph calls the same op,
which runs the same kernels in the same order. The reference path (``R1FAST_KERNELS=torch``) must
trace too. Also here: argument validation of both paths, autocast, and double backward. Numerics
against the fp64 oracle are in test_grpo_loss.py.
"""

import math

import pytest
import torch
from conftest import assert_close_to_ref
from test_grpo_loss import dense_oracle
from test_grpo_loss import make_inputs as make_loss_inputs

import r1fast.kernels
from r1fast.kernels import grpo_loss as fused
from r1fast.kernels import ref_grpo_loss as ref

needs_kernels = pytest.mark.skipif(not r1fast.kernels.use_triton("cpu"),
                                   reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")

B, T, H, V = 2, 5, 8, 33
TEMPERATURE = 0.7


def make_inputs(with_bias=True):
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) * 0.4
    mask = torch.rand(B, T) > 0.3
    mask[0, 0] = True
    mask[1, -1] = False  # padding: the gather / scatter path
    return dict(hidden=hidden, weight=weight, bias=torch.randn(V) * 0.3 if with_bias else None,
                ids=torch.randint(0, V, (B, T)), mask=mask, adv=torch.randn(B),
                old=torch.randn(B, T) * 0.3 - 3.5, ref=torch.randn(B, T) * 0.3 - 3.5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each case compiles from scratch (no recompile limits across cases)
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("with_bias,with_entropy", [(True, True), (False, False)])
def test_opcheck_linear_logprobs(with_bias, with_entropy):
    inp = make_inputs(with_bias)
    args = (inp["hidden"].reshape(-1, H), inp["weight"], inp["bias"], inp["ids"].reshape(-1), TEMPERATURE,
            with_entropy, 4)
    torch.library.opcheck(torch.ops.r1fast.grpo_linear_logprobs.default, args)


def _loss_op_args(inp, *, level="token", old=True, ref=True, normalizer=None, want=(True, True, True)):
    return (inp["hidden"], inp["weight"], inp["bias"], inp["ids"], inp["mask"], inp["adv"],
            inp["old"] if old else None, inp["ref"] if ref else None, None, normalizer,
            0.04 if ref else 0.0, 0.2, 0.25, 1.5 if ref else None, TEMPERATURE, "dapo" if normalizer is not None
            else "grpo", level, None, 4, *want)


@needs_kernels
@pytest.mark.parametrize("case", ["token-all", "sequence-normalizer", "no-optionals-no-grads"])
def test_opcheck_linear_grpo_loss_and_grads(case):
    inp = make_inputs(with_bias=case != "no-optionals-no-grads")
    if case == "token-all":
        args = _loss_op_args(inp)
    elif case == "sequence-normalizer":
        args = _loss_op_args(inp, level="sequence", ref=False, normalizer=torch.tensor(7.0))
    else:
        args = _loss_op_args(inp, old=False, ref=False, want=(False, False, False))
    torch.library.opcheck(torch.ops.r1fast.grpo_linear_loss_and_grads.default, args)


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) equals eager, forward and backward
# ----------------------------------------------------------------------------------------------


def _loss_and_grads(fn, inp, kwargs, scale=1.0, grad_of=(True, True, True)):
    leaves = [None if x is None else x.clone().requires_grad_(g)
              for x, g in zip((inp["hidden"], inp["weight"], inp["bias"]), grad_of)]
    loss, metrics = fn(*leaves, **kwargs)
    (loss * scale).backward()
    return loss.detach(), metrics, [None if x is None else x.grad for x in leaves]


LOSS_CASES = {
    # name: (bias, old_logps, ref_logps / beta, extra options)
    "plain": (False, False, False, {}),
    "bias-old-ref": (True, True, True, dict(delta=1.5, eps_high=0.28)),
    "bias-gspo-dapo": (True, True, False, dict(importance_level="sequence", loss_type="dapo", normalizer=7)),
    "old-ref-dr_grpo": (False, True, True, dict(loss_type="dr_grpo", max_completion_length=6)),
}


@needs_kernels
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_compiled_loss_equals_eager(case):
    with_bias, with_old, with_ref, extra = LOSS_CASES[case]
    inp = make_inputs(with_bias)
    opts = dict(old_logps=inp["old"] if with_old else None, ref_logps=inp["ref"] if with_ref else None,
                beta=0.04 if with_ref else 0.0, temperature=TEMPERATURE, chunk_tokens=3, **extra)

    def loss_fn(hidden, weight, bias, **kwargs):
        return fused.fused_linear_grpo_loss(hidden, weight, inp["ids"], inp["mask"], inp["adv"], bias=bias, **kwargs)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager = _loss_and_grads(loss_fn, inp, opts)
    traced = _loss_and_grads(compiled, inp, opts)
    assert eager[0].dtype == torch.float32 and torch.equal(traced[0], eager[0])
    assert set(traced[1]) == set(eager[1]) == ({"clip_frac", "entropy", "kl"} if with_ref else {"clip_frac", "entropy"})
    for key in eager[1]:
        assert torch.equal(traced[1][key], eager[1][key]), key
    for name, g_traced, g_eager in zip(("hidden", "weight", "bias"), traced[2], eager[2]):
        assert (g_traced is None) == (g_eager is None) == (name == "bias" and not with_bias)
        assert g_eager is None or torch.equal(g_traced, g_eager), name


@needs_kernels
def test_shape_errors_are_raised_under_compile_too():
    """Only the checks that read device values are skipped while tracing; shapes are still checked."""
    inp = make_inputs(with_bias=False)

    def loss_fn(hidden, weight):
        return fused.fused_linear_grpo_loss(hidden, weight, inp["ids"], inp["mask"], inp["adv"][:1])

    with pytest.raises(Exception, match=r"advantages must be \[2\], got \(1,\)"):
        torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(inp["hidden"], inp["weight"])


@needs_kernels
def test_compiled_loss_scaled_backward_and_frozen_hidden():
    """grad_output != 1 and a hidden without grad: the compiled backward scales like eager."""
    inp = make_inputs(with_bias=True)

    def loss_fn(hidden, weight, bias):
        return fused.fused_linear_grpo_loss(hidden, weight, inp["ids"], inp["mask"], inp["adv"], bias=bias,
                                            old_logps=inp["old"], temperature=TEMPERATURE)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager = _loss_and_grads(loss_fn, inp, {}, scale=2.5, grad_of=(False, True, True))
    traced = _loss_and_grads(compiled, inp, {}, scale=2.5, grad_of=(False, True, True))
    assert traced[2][0] is None and eager[2][0] is None
    assert torch.equal(traced[2][1], eager[2][1]) and torch.equal(traced[2][2], eager[2][2])
    unscaled = _loss_and_grads(loss_fn, inp, {}, grad_of=(False, True, True))
    assert torch.equal(eager[2][1], unscaled[2][1] * 2.5)


@needs_kernels
@pytest.mark.parametrize("with_bias,with_entropy", [(True, True), (False, False)])
def test_compiled_logprobs_equals_eager(with_bias, with_entropy):
    inp = make_inputs(with_bias)

    def logprobs_fn(hidden):
        return fused.fused_linear_logprobs(hidden, inp["weight"], inp["ids"], bias=inp["bias"],
                                           temperature=TEMPERATURE, return_entropy=with_entropy, chunk_tokens=4)

    eager = logprobs_fn(inp["hidden"])
    traced = torch.compile(logprobs_fn, backend="aot_eager", fullgraph=True)(inp["hidden"])
    eager, traced = (eager, traced) if with_entropy else ((eager,), (traced,))
    for e, t in zip(eager, traced, strict=True):
        assert t.shape == (B, T) and torch.equal(t, e)


# ----------------------------------------------------------------------------------------------
# the ops on the PyTorch path of the dispatch rule (R1FAST_KERNELS=torch)
# ----------------------------------------------------------------------------------------------


@needs_kernels
def test_ops_on_torch_backend_match_kernels(monkeypatch):
    """Called directly, the ops run everywhere: the row launchers fall back to PyTorch."""
    inp = make_inputs(with_bias=True)
    lp_args = (inp["hidden"].reshape(-1, H), inp["weight"], inp["bias"], inp["ids"].reshape(-1), TEMPERATURE, True, 4)
    loss_args = _loss_op_args(inp)
    kernel = (torch.ops.r1fast.grpo_linear_logprobs(*lp_args), torch.ops.r1fast.grpo_linear_loss_and_grads(*loss_args))
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    torch_path = (torch.ops.r1fast.grpo_linear_logprobs(*lp_args),
                  torch.ops.r1fast.grpo_linear_loss_and_grads(*loss_args))
    for k, t in zip((*kernel[0], *kernel[1]), (*torch_path[0], *torch_path[1]), strict=True):
        torch.testing.assert_close(t, k, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------
# the reference path: torch.compile and autocast
# ----------------------------------------------------------------------------------------------


def test_compiled_reference_equals_eager(monkeypatch):
    """README: both public functions trace with fullgraph=True on the reference path too.

    The reference used to re-validate with host checks on (reading hidden and the ids on the
    host), which failed with a data-dependent guard error.
    """
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    inp = make_inputs(with_bias=True)

    def loss_fn(hidden, weight, bias):
        return fused.fused_linear_grpo_loss(hidden, weight, inp["ids"], inp["mask"], inp["adv"], bias=bias,
                                            old_logps=inp["old"], ref_logps=inp["ref"], beta=0.04, loss_type="dapo",
                                            normalizer=torch.tensor(7.0), temperature=TEMPERATURE, chunk_tokens=3)

    def logprobs_fn(hidden):
        return fused.fused_linear_logprobs(hidden, inp["weight"], inp["ids"], bias=inp["bias"],
                                           temperature=TEMPERATURE, return_entropy=True, chunk_tokens=4)

    eager = _loss_and_grads(loss_fn, inp, {})
    traced = _loss_and_grads(torch.compile(loss_fn, backend="aot_eager", fullgraph=True), inp, {})
    assert r1fast.kernels.backend("cpu") == "torch"
    for t, e in zip((traced[0], *traced[1].values(), *traced[2]), (eager[0], *eager[1].values(), *eager[2]), strict=True):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)
    compiled_lp = torch.compile(logprobs_fn, backend="aot_eager", fullgraph=True)(inp["hidden"])
    for t, e in zip(compiled_lp, logprobs_fn(inp["hidden"]), strict=True):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)


def test_public_function_validates_once_on_reference_path(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    calls = []
    real = ref.validate_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ref, "validate_loss", counting)
    monkeypatch.setattr(fused, "validate_loss", counting)
    inp = make_inputs(with_bias=False)
    fused.fused_linear_grpo_loss(inp["hidden"], inp["weight"], inp["ids"], inp["mask"], inp["adv"])
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_autocast_bf16_keeps_fp32(backend, monkeypatch):
    """Under torch.autocast(bfloat16) both paths compute in fp32 (the reference's matmul was bf16: 3e-2 off)."""
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    elif not r1fast.kernels.use_triton("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py)")
    inp = make_loss_inputs(with_bias=False, t=7, v=1001, h=72)
    h, w = inp["hidden"].clone().requires_grad_(True), inp["weight"].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fused.fused_linear_logprobs(inp["hidden"], inp["weight"], inp["ids"])
        loss, _ = fused.fused_linear_grpo_loss(h, w, inp["ids"], inp["mask"], inp["adv"], old_logps=inp["old"],
                                               temperature=1.0)
    loss.backward()
    results = {}
    for dtype in (torch.float64, torch.float32):
        h_ref = inp["hidden"].to(dtype).requires_grad_(True)
        w_ref = inp["weight"].to(dtype).requires_grad_(True)
        loss_ref, _, lp_ref, _ = dense_oracle(h_ref, w_ref, None, inp["ids"], inp["mask"], inp["adv"].to(dtype),
                                              old=inp["old"].to(dtype), temperature=1.0)
        loss_ref.backward()
        results[dtype] = (lp_ref, loss_ref, h_ref.grad, w_ref.grad)
    assert lp.dtype == loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    for name, out, r64, r32 in zip(("logprobs", "loss", "hidden.grad", "weight.grad"), (lp, loss, h.grad, w.grad),
                                   results[torch.float64], results[torch.float32], strict=True):
        assert_close_to_ref(out, r64, r32, name=name)


# ----------------------------------------------------------------------------------------------
# gradients: only hidden, weight and bias; no double backward on the kernel path
# ----------------------------------------------------------------------------------------------


def _penalty_grad(inp):
    """d/dW of |d loss / d hidden|², which needs the loss's second derivatives (create_graph=True)."""
    h, w = inp["hidden"].clone().requires_grad_(True), inp["weight"].clone().requires_grad_(True)
    loss, _ = fused.fused_linear_grpo_loss(h, w, inp["ids"], inp["mask"], inp["adv"], old_logps=inp["old"])
    (grad_h,) = torch.autograd.grad(loss, h, create_graph=True)
    return torch.autograd.grad((grad_h ** 2).sum(), w)[0]


@needs_kernels
def test_kernel_double_backward_raises():
    """The kernel's saved gradients are constants to autograd: a gradient penalty silently lost its
    second-order term (54% off in the probe); it must raise instead."""
    with pytest.raises(RuntimeError, match="double backward"):
        _penalty_grad(make_inputs(with_bias=False))


def test_reference_double_backward_matches_fp64(monkeypatch):
    """The alternative the kernel path's error names: R1FAST_KERNELS=torch differentiates twice."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    inp = make_inputs(with_bias=False)
    got = _penalty_grad(inp)
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in inp.items() if v is not None}
    assert_close_to_ref(got, _penalty_grad(as64), atol=1e-6, name="penalty grad")


# ----------------------------------------------------------------------------------------------
# validation (issue item 5), both paths
# ----------------------------------------------------------------------------------------------

LB = 3  # make_loss_inputs' batch


def _bad_call(case):
    inp = make_loss_inputs(with_bias=False, t=5, v=17, h=8)
    kw = dict(hidden=inp["hidden"], weight=inp["weight"], token_ids=inp["ids"], mask=torch.ones(LB, 5, dtype=bool),
              advantages=inp["adv"])
    opts = {}
    if case == "hidden_shape":
        kw["hidden"] = inp["hidden"][0]
    elif case == "weight_shape":
        kw["weight"] = inp["weight"][:, :4]
    elif case == "weight_dtype":
        kw["weight"] = inp["weight"].double()
    elif case == "token_range":
        kw["token_ids"] = inp["ids"].masked_fill(torch.eye(LB, 5, dtype=bool), 17)
    elif case == "token_dtype":
        kw["token_ids"] = inp["ids"].float()
    elif case == "mask_shape":
        kw["mask"] = kw["mask"][:, :4]
    elif case == "mask_not_binary":  # a 0.25 used to count as 1 (mask.bool())
        kw["mask"] = torch.ones(LB, 5).index_fill(1, torch.tensor([1]), 0.25)
    elif case == "advantages_shape":
        kw["advantages"] = inp["adv"][:2]
    elif case == "old_logps_shape":
        opts["old_logps"] = inp["old"][:, :4]
    elif case == "beta_without_ref":
        opts["beta"] = 0.04
    elif case == "loss_type":
        opts["loss_type"] = "ppo"
    elif case == "importance_level":
        opts["importance_level"] = "sentence"
    elif case == "dr_grpo_without_len":
        opts["loss_type"] = "dr_grpo"
    elif case == "nonfinite_hidden":
        kw["hidden"] = inp["hidden"].clone()
        kw["hidden"][2, 3, 1] = float("nan")
    elif case == "bias_shape":
        opts["bias"] = torch.zeros(16)
    elif case == "temperature":
        opts["temperature"] = 0.0
    elif case.startswith("normalizer_"):
        value = {"nan": math.nan, "inf": math.inf, "zero": 0.0, "two": torch.tensor([3.0, 4.0])}[case[11:]]
        opts.update(loss_type="dapo", normalizer=value)
    elif case.startswith("chunk_tokens_"):
        opts["chunk_tokens"] = int(case[13:])
    elif case.endswith("_requires_grad"):  # silently got no gradient on the kernel path
        name = case[:-len("_requires_grad")]
        value = {"advantages": inp["adv"], "old_logps": inp["old"], "ref_logps": inp["ref"]}[name].clone()
        (kw if name == "advantages" else opts)[name] = value.requires_grad_(True)
        opts["beta"] = 0.04 if name == "ref_logps" else 0.0
    return kw, opts


BAD = {
    "hidden_shape": "hidden", "weight_shape": "weight", "weight_dtype": "weight", "token_range": "token_ids",
    "token_dtype": "token_ids", "mask_shape": "mask", "advantages_shape": "advantages",
    "old_logps_shape": "old_logps", "beta_without_ref": "ref_logps", "loss_type": "loss_type",
    "importance_level": "importance_level", "dr_grpo_without_len": "max_completion_length",
    "nonfinite_hidden": "hidden", "bias_shape": "bias", "temperature": "temperature",
    "mask_not_binary": "mask must hold only 0 and 1", "normalizer_nan": "normalizer must be finite",
    "normalizer_inf": "normalizer must be finite", "normalizer_zero": "normalizer must be finite and > 0",
    "normalizer_two": "normalizer must be a number or a one-element tensor", "chunk_tokens_-4": "chunk_tokens",
    "chunk_tokens_0": "chunk_tokens", "advantages_requires_grad": "advantages requires grad",
    "old_logps_requires_grad": "old_logps requires grad", "ref_logps_requires_grad": "ref_logps requires grad",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_value_error_naming_argument(case):
    kw, opts = _bad_call(case)
    for impl in (fused.fused_linear_grpo_loss, ref.fused_linear_grpo_loss):
        with pytest.raises(ValueError, match=BAD[case]):
            impl(kw["hidden"], kw["weight"], kw["token_ids"], kw["mask"], kw["advantages"], **opts)


def test_zero_one_float_mask_and_detached_inputs_are_accepted():
    """The new checks reject only what they name: a 0./1. float mask and no_grad calls pass."""
    kw, _ = _bad_call("advantages_requires_grad")
    mask = torch.ones(LB, 5).index_fill(1, torch.tensor([1]), 0.0)
    with torch.no_grad():
        loss, _ = fused.fused_linear_grpo_loss(kw["hidden"], kw["weight"], kw["token_ids"], mask, kw["advantages"])
    expected, _ = ref.fused_linear_grpo_loss(kw["hidden"], kw["weight"], kw["token_ids"], mask.bool(),
                                             kw["advantages"].detach())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_logprobs_rejects_out_of_range_ids_and_bad_chunk_tokens():
    inp = make_loss_inputs(with_bias=False, t=5, v=17, h=8)
    ids = inp["ids"].masked_fill(torch.eye(LB, 5, dtype=bool), -1)
    for impl in (fused.fused_linear_logprobs, ref.fused_linear_logprobs):
        with pytest.raises(ValueError, match="token_ids"):
            impl(inp["hidden"], inp["weight"], ids)
        with pytest.raises(ValueError, match="chunk_tokens"):
            impl(inp["hidden"], inp["weight"], inp["ids"], chunk_tokens=0)
