"""The fused GRPO loss / log-prob ops as ``torch.ops.r1fast.*``: opcheck, torch.compile, every backend.

Tiny shapes (the kernels run under Triton's interpreter on CPU). ``torch.compile`` with the
``aot_eager`` backend and ``fullgraph=True`` must trace both public functions, forward and backward,
without a graph break and give bitwise the eager results: the compiled graph calls the same op,
which runs the same kernels in the same order. Numerics against the fp64 oracle are in
test_grpo_loss.py.
"""

import pytest
import torch

import r1fast.kernels
from r1fast.kernels import grpo_loss as fused

pytestmark = pytest.mark.skipif(not r1fast.kernels.use_triton("cpu"), reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")

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


def test_shape_errors_are_raised_under_compile_too():
    """Only the checks that read device values are skipped while tracing; shapes are still checked."""
    inp = make_inputs(with_bias=False)

    def loss_fn(hidden, weight):
        return fused.fused_linear_grpo_loss(hidden, weight, inp["ids"], inp["mask"], inp["adv"][:1])

    with pytest.raises(Exception, match=r"advantages must be \[2\], got \(1,\)"):
        torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(inp["hidden"], inp["weight"])


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
