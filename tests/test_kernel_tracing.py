"""r1fast.kernels as a library under tracing: meta / fake tensors, torch.compile, and the grad contract.

What FSDP2's meta init, ``torch.export`` and shape inference do with the public ops: run them on meta
tensors or under ``FakeTensorMode``, where no value can be read (``host_checks_enabled`` is then False
and the ops must not call ``.item()``). What a user of ``torch.compile`` does: compile with
``dynamic=True``, and call a compiled loss with many sequence lengths (it must not recompile per
length). And the inference ops (paged attention, append_kv) refuse inputs that require grad on every
backend instead of differing silently. Every case runs on the kernel path (Triton's interpreter) and
on the PyTorch reference (``R1FAST_KERNELS=torch``). Tiny shapes: compile cases cost ~1-3 s each.
"""

import threading

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import r1fast.kernels as K
from r1fast.kernels.registration import host_checks_enabled

BACKENDS = ["kernel", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test on the kernel path (interpreted Triton on CPU) and on the PyTorch reference."""
    if request.param == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    elif not K.use_triton("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py)")
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# meta tensors and FakeTensorMode
# ----------------------------------------------------------------------------------------------


def test_host_checks_off_for_meta_and_fake():
    assert host_checks_enabled(torch.ones(2))
    assert host_checks_enabled()
    assert not host_checks_enabled(torch.ones(2, device="meta"))
    with FakeTensorMode() as mode:
        fake = torch.ones(2)
        assert not host_checks_enabled(fake)
        assert not host_checks_enabled()  # the active mode alone: a check without a tensor at hand
    assert not host_checks_enabled(fake)  # a fake tensor outside its mode still has no values
    assert mode is not None


def _logprobs(d):
    return K.fused_linear_logprobs(torch.randn(2, 5, 8, device=d), torch.randn(11, 8, device=d),
                                   torch.zeros(2, 5, dtype=torch.long, device=d), return_entropy=True)


def _loss_and_grad(d):
    h = torch.randn(2, 5, 8, device=d, requires_grad=True)
    loss, metrics = K.fused_linear_grpo_loss(h, torch.randn(11, 8, device=d), torch.zeros(2, 5, dtype=torch.long, device=d),
                                             torch.ones(2, 5, device=d), torch.randn(2, device=d))
    loss.backward()  # the kernel path's backward reads grad_loss only with host checks
    return loss, h.grad, metrics["entropy"]


def _moe(d):
    return K.moe_ffn_fp8(torch.randn(4, 128, device=d), torch.rand(4, 2, device=d),
                         torch.zeros(4, 2, dtype=torch.long, device=d), torch.randn(2, 256, 128, device=d),
                         torch.randn(2, 128, 128, device=d))


def _grouped_gemm(d):
    a = torch.randn(6, 128, device=d).to(torch.float8_e4m3fn)
    b = torch.randn(3, 16, 128, device=d).to(torch.float8_e4m3fn)
    return K.fp8_grouped_gemm(a, torch.ones(6, 1, device=d), b, torch.ones(3, 1, 1, device=d),
                              torch.tensor([6, 0, 0], dtype=torch.int32, device=d))


OPS = {  # name -> (call, expected output shapes)
    "fused_linear_logprobs": (_logprobs, [(2, 5), (2, 5)]),
    "fused_linear_grpo_loss": (_loss_and_grad, [(), (2, 5, 8), ()]),
    "moe_ffn_fp8": (_moe, [(4, 128)]),
    "fp8_grouped_gemm": (_grouped_gemm, [(6, 16)]),
}


@pytest.mark.parametrize("mode", ["meta", "fake"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_public_ops_infer_shapes_without_reading_values(name, mode, backend):
    """Before: "Tensor.item() cannot be called on meta tensors" / DataDependentOutputException."""
    call, shapes = OPS[name]
    if mode == "meta":
        outs = call("meta")
    else:
        with FakeTensorMode():
            outs = call("cpu")
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert [tuple(o.shape) for o in outs] == shapes
    assert all(o.is_meta for o in outs) if mode == "meta" else True


def test_real_tensors_still_checked_after_fake_mode():
    """The checks come back with real values: a bad token id is still a ValueError."""
    with FakeTensorMode():
        _logprobs("cpu")
    with pytest.raises(ValueError, match="token_ids"):
        K.fused_linear_logprobs(torch.randn(1, 2, 8), torch.randn(11, 8), torch.tensor([[0, 11]]))


# ----------------------------------------------------------------------------------------------
# torch.compile: dynamic=True, and no recompile per sequence length
# ----------------------------------------------------------------------------------------------


def _inputs(T, V=13, H=8, B=2):
    return (torch.randn(B, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True),
            torch.randint(0, V, (B, T)), torch.ones(B, T), torch.randn(B))


def _loss_plus_logprobs(h, w, ids, m, a):
    loss = K.fused_linear_grpo_loss(h, w, ids, m, a, temperature=0.7)[0]
    return loss + K.fused_linear_logprobs(h.detach(), w.detach(), ids, temperature=0.7).sum()


def test_compile_dynamic_true_fullgraph(backend):
    """Before: "torch.* op returned non-Tensor" (math.isfinite on the temperature) on both paths."""
    h, w, ids, m, a = _inputs(5)
    compiled = torch.compile(_loss_plus_logprobs, fullgraph=True, dynamic=True, backend="aot_eager")
    got = compiled(h, w, ids, m, a)
    got.backward()
    grad_h = h.grad.clone()
    h.grad = None
    want = _loss_plus_logprobs(h, w, ids, m, a)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_h, h.grad, rtol=1e-6, atol=1e-6)


def test_compiled_loss_compiles_twice_for_many_lengths(backend):
    """Before (reference path): one compile per sequence length, FailOnRecompileLimitHit at the 9th.

    Four lengths: a static graph for the first, one dynamic graph for the rest (2 compiles, as the
    kernel path always did); the old chunk loop specialized on N, so it took 4.
    """
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda *args: K.fused_linear_grpo_loss(*args)[0], fullgraph=True, backend=counter)
    for T in (3, 4, 6, 9):
        compiled(*_inputs(T)).backward()
    assert counter.frame_count == 2


# ----------------------------------------------------------------------------------------------
# the inference ops refuse inputs that require grad (on every backend)
# ----------------------------------------------------------------------------------------------


def _paged_inputs():
    k_cache, v_cache = torch.randn(8, 16, 2, 64), torch.randn(8, 16, 2, 64)
    table = torch.arange(6, dtype=torch.int32).view(2, 3)
    return torch.randn(2, 4, 64), k_cache, v_cache, table, torch.tensor([5, 9], dtype=torch.int32)


@pytest.mark.parametrize("needs_grad", ["q", "k_cache", "v_cache"])
def test_paged_attention_refuses_grad(needs_grad, backend):
    """Before: differentiable on the reference path, silently detached on the kernel path."""
    q, k_cache, v_cache, table, lens = _paged_inputs()
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache)
    args[needs_grad].requires_grad_()
    with pytest.raises(ValueError, match=f"paged_attention: {needs_grad} requires grad"):
        K.paged_attention(args["q"], args["k_cache"], args["v_cache"], table, lens)
    group_of_seq = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"paged_attention_cascade: {needs_grad} requires grad"):
        K.paged_attention_cascade(args["q"], args["k_cache"], args["v_cache"], table[:1], lens[:1], group_of_seq,
                                  table[:, :1] + 6, torch.tensor([1, 2], dtype=torch.int32))
    with torch.no_grad():  # how rollout calls it: fine, and the output is a plain tensor
        out = K.paged_attention(args["q"], args["k_cache"], args["v_cache"], table, lens)
    assert out.shape == (2, 4, 64) and not out.requires_grad


@pytest.mark.parametrize("needs_grad", ["k", "v_cache"])
def test_append_kv_refuses_grad(needs_grad, backend):
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    slots = torch.tensor([0, 5, 17])
    args = dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    args[needs_grad].requires_grad_()
    with pytest.raises(ValueError, match=f"append_kv: {needs_grad} requires grad"):
        K.append_kv(**args, slot_mapping=slots)
    with torch.inference_mode():
        K.append_kv(k.detach(), v.detach(), k_cache.detach(), v_cache.detach(), slots)
    assert torch.equal(k_cache[0, 5], k[1].detach()) and torch.equal(v_cache[1, 1], v[2])  # slot = block * 16 + offset


# ----------------------------------------------------------------------------------------------
# threads under Triton's interpreter
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not K.interpreting(), reason="the interpreter lock exists only under TRITON_INTERPRET")
def test_concurrent_calls_under_interpreter():
    """Before: InterpreterError('x >= grid_dim[0]') when threads launched at once (interpreter not thread-safe)."""
    inputs = {T: (torch.randn(2, T, 8), torch.randn(11, 8), torch.randint(0, 11, (2, T)), torch.randn(T, 130))
              for T in (3, 17, 9)}
    results, errors = {}, []

    def worker(T):
        h, w, ids, x = inputs[T]
        try:
            for _ in range(3):
                results[T] = (K.fused_linear_logprobs(h, w, ids), K.quantize_fp8_1x128(x)[1])
        except Exception as e:  # noqa: BLE001 (collected and asserted below, with the thread's length)
            errors.append(f"T={T}: {e!r}")

    threads = [threading.Thread(target=worker, args=(T,)) for T in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for T, (h, w, ids, x) in inputs.items():
        assert torch.equal(results[T][0], K.fused_linear_logprobs(h, w, ids))
        assert torch.equal(results[T][1], K.quantize_fp8_1x128(x)[1])
