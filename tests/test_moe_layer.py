"""The FP8 MoE FFN layer (``moe_ffn_fp8``): vs the recipe in exact arithmetic, vs the unquantized
layer, gradient accumulation into ``.grad``, the weight cache, torch.compile.

Bounds. One E4M3 rounding of Gaussian data is ~31.7 dB SQNR, a GEMM with both operands quantized
~28.7 dB, and the layer chains five roundings with a SwiGLU product in between. The recipe itself,
run in exact arithmetic (every op's PyTorch reference: same quantizers bit for bit, fp64 GEMMs),
lands at 22.2-25.0 dB from the unquantized layer on these inputs (measured on the CI machine), and
the Triton layer equals that emulation to >= 80 dB (mostly bit for bit: the two differ only in fp32
vs fp64 accumulation, which rarely moves a bf16 rounding). So: kernel vs emulation >= 60 dB (an
indexing or scale bug lands below 20 dB), kernel vs unquantized >= 21 dB.
"""

import pytest
import torch

from r1fast.kernels import ref_fp8
from r1fast.kernels.moe_layer import Fp8WeightCache, moe_ffn_fp8


def _sqnr_db(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    err = ((out - ref) ** 2).sum()
    return float("inf") if err == 0 else float(10 * torch.log10((ref * ref).sum() / err))


def _layer_inputs(T, H, inter, E, k, dtype=torch.bfloat16, device="cpu"):
    x = torch.randn(T, H, device=device).to(dtype)
    topk_weights, topk_ids = torch.randn(T, E, device=device).softmax(-1).topk(k, dim=-1)
    w_gate_up = torch.randn(E, 2 * inter, H, device=device) / H**0.5
    w_down = torch.randn(E, H, inter, device=device) / inter**0.5
    return x, topk_weights, topk_ids, w_gate_up, w_down


def _layer_grads(x, topk_weights, topk_ids, w_gate_up, w_down, dout, fn, cast=None):
    leaves = [t.detach().clone().to(cast or t.dtype).requires_grad_(True) for t in (x, topk_weights, w_gate_up, w_down)]
    out = fn(leaves[0], leaves[1], topk_ids, leaves[2], leaves[3])
    out.backward(dout.to(out.dtype))
    return out, [t.grad for t in leaves]


NAMES = ("x", "topk_weights", "w_gate_up", "w_down")


def test_moe_ffn_fp8_forward_backward_vs_unquantized_reference():
    x, tw, ti, wgu, wd = _layer_inputs(T=48, H=256, inter=128, E=3, k=2)
    dout = torch.randn(48, 256)
    cache = Fp8WeightCache()
    out, grads = _layer_grads(x, tw, ti, wgu, wd, dout, lambda *a: moe_ffn_fp8(*a, cache=cache))
    ref, ref_grads = _layer_grads(x, tw, ti, wgu, wd, dout, ref_fp8.moe_ffn_fp8, cast=torch.float64)
    assert out.dtype == torch.bfloat16 and grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    assert _sqnr_db(out, ref) >= 21.0
    for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert _sqnr_db(g, r) >= 21.0, f"grad of {name}: {_sqnr_db(g, r):.1f} dB"
    out2, grads2 = _layer_grads(x, tw, ti, wgu, wd, dout, lambda *a: moe_ffn_fp8(*a, cache=cache))
    assert torch.equal(out2, out) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))  # bitwise repeatable


def test_kernels_equal_the_recipe_in_exact_arithmetic(monkeypatch):
    """The Triton layer adds nothing to the recipe's own error: same quantization points, fp32 vs fp64 sums."""
    x, tw, ti, wgu, wd = _layer_inputs(T=150, H=256, inter=128, E=4, k=2)  # 300 rows: tiles straddle experts
    dout = torch.randn(150, 256)
    out, grads = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)
    monkeypatch.setenv("R1FAST_KERNELS", "torch")  # every op's PyTorch reference, forward and backward
    emu, emu_grads = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)
    monkeypatch.delenv("R1FAST_KERNELS")
    exact, exact_grads = _layer_grads(x, tw, ti, wgu, wd, dout, ref_fp8.moe_ffn_fp8, cast=torch.float64)
    assert _sqnr_db(out, emu) >= 60.0
    for name, g, e in zip(NAMES, grads, emu_grads, strict=True):
        assert _sqnr_db(g, e) >= 60.0, f"grad of {name}: {_sqnr_db(g, e):.1f} dB from the emulated recipe"
    # the emulation is genuinely quantized: FP8 error, not the unquantized layer
    assert 20.0 <= _sqnr_db(emu, exact) <= 27.0
    assert all(20.0 <= _sqnr_db(e, r) <= 27.0 for e, r in zip(emu_grads, exact_grads, strict=True))


def _spy_wgrad_accumulate(monkeypatch):
    """Record the ``accumulate`` flag of every wgrad call the layer makes."""
    from r1fast.kernels import moe_layer

    flags, wgrad = [], moe_layer.fp8_grouped_gemm_wgrad

    def spy(*args, accumulate=False, **kwargs):
        flags.append(accumulate)
        return wgrad(*args, accumulate=accumulate, **kwargs)

    monkeypatch.setattr(moe_layer, "fp8_grouped_gemm_wgrad", spy)
    return flags


@pytest.mark.parametrize("backend", ["triton-interpret", "torch"])
def test_zero_tokens_give_empty_output_and_zero_weight_gradients(monkeypatch, backend):
    """A micro-batch (or an expert-parallel rank) that received no tokens, on the kernels and the reference."""
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    x, tw, ti, wgu, wd = _layer_inputs(T=0, H=128, inter=128, E=2, k=2)
    out, grads = _layer_grads(x, tw, ti, wgu, wd, torch.randn(0, 128), moe_ffn_fp8)
    assert out.shape == (0, 128) and grads[0].shape == (0, 128) and grads[1].shape == (0, 2)
    assert grads[2].shape == wgu.shape and not grads[2].any() and not grads[3].any()


@pytest.mark.parametrize("backend", ["triton-interpret", "torch"])
def test_tiny_gradients_keep_their_precision(monkeypatch, backend):
    """Gradients quantize with their own amax floor: scaling dout by 2^-34 (1e-10, what a loss normalized by
    millions of tokens gives) scales every gradient by exactly 2^-34. With the activations' 1e-4 floor the
    weight gradients were 100% off at 1e-10 (flushed to zero), 15% at 1e-8."""
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    x, tw, ti, wgu, wd = _layer_inputs(T=40, H=128, inter=128, E=3, k=2)
    dout = torch.randn(40, 128)
    _, grads = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)
    _, tiny = _layer_grads(x, tw, ti, wgu, wd, dout * 2.0**-34, moe_ffn_fp8)
    for name, g, t in zip(NAMES, grads, tiny, strict=True):
        assert torch.equal(t * 2.0**34, g), name


@pytest.mark.parametrize("backend", ["triton-interpret", "torch"])
def test_one_experts_bad_token_leaves_the_other_experts_weight_gradients_alone(monkeypatch, backend):
    """The wgrad's 128-token tiles restart at every expert: a NaN token of expert 0 (4 rows, sharing its tile
    with experts 1 and 2 before) made their weight gradients NaN too; a x1e5 outlier cost expert 1 9.6 dB."""
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    x, tw, _, wgu, wd = _layer_inputs(T=12, H=128, inter=128, E=3, k=1)
    ti = torch.arange(3).repeat_interleave(4)[:, None]  # tokens 0-3 -> expert 0, 4-7 -> 1, 8-11 -> 2
    x[0, 5] = float("nan")
    out, grads = _layer_grads(x, tw, ti, wgu, wd, torch.randn(12, 128), moe_ffn_fp8)
    assert out[0].isnan().any() and out[1:].isfinite().all()
    for name, g in zip(NAMES[2:], grads[2:], strict=True):
        assert g[0].isnan().any() and g[1:].isfinite().all(), name
    x[0, 5] = 1e5
    dout = torch.randn(12, 128)
    _, grads = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)
    _, ref_grads = _layer_grads(x, tw, ti, wgu, wd, dout, ref_fp8.moe_ffn_fp8, cast=torch.float64)
    for name, g, r in zip(NAMES[2:], grads[2:], ref_grads[2:], strict=True):
        assert _sqnr_db(g[1:], r[1:]) >= 21.0, f"grad of {name}, experts 1-2: {_sqnr_db(g[1:], r[1:]):.1f} dB"


def test_weight_gradients_accumulate_in_place_into_fp32_grad(monkeypatch):
    x, tw, ti, wgu, wd = _layer_inputs(T=40, H=128, inter=128, E=3, k=2)
    douts = torch.randn(2, 40, 128, dtype=torch.bfloat16)
    separate = [_layer_grads(x, tw, ti, wgu, wd, d, moe_ffn_fp8)[1] for d in douts]
    w_gate_up, w_down = wgu.clone().requires_grad_(True), wd.clone().requires_grad_(True)
    cache = Fp8WeightCache()
    flags = _spy_wgrad_accumulate(monkeypatch)
    moe_ffn_fp8(x, tw, ti, w_gate_up, w_down, cache=cache).backward(douts[0])
    assert flags == [False, False]
    buffers = (w_gate_up.grad, w_down.grad)
    assert torch.equal(buffers[0], separate[0][2])  # first micro-batch: autograd adopted the fp32 result
    moe_ffn_fp8(x, tw, ti, w_gate_up, w_down, cache=cache).backward(douts[1])
    assert flags == [False, False, True, True]  # second: the kernel added into the same buffers
    assert w_gate_up.grad is buffers[0] and w_down.grad is buffers[1]
    assert torch.equal(w_gate_up.grad, separate[0][2] + separate[1][2])  # fp32 a + b, bit for bit
    assert torch.equal(w_down.grad, separate[0][3] + separate[1][3])


def test_autograd_grad_and_backward_inputs_never_touch_an_existing_grad(monkeypatch):
    """The in-place shortcut is for ``backward()`` only: ``autograd.grad`` must return the weight's
    gradient and ``backward(inputs=[x])`` must not add into the weights' ``.grad``."""
    x, tw, ti, wgu, wd = _layer_inputs(T=24, H=128, inter=128, E=2, k=2)
    dout = torch.randn(24, 128, dtype=torch.bfloat16)
    expected = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)[1]
    w_gate_up, w_down = wgu.clone().requires_grad_(True), wd.clone().requires_grad_(True)
    w_gate_up.grad, w_down.grad = torch.zeros_like(wgu), torch.zeros_like(wd)  # an earlier micro-batch's
    grads = torch.autograd.grad(moe_ffn_fp8(x, tw, ti, w_gate_up, w_down), (w_gate_up, w_down), dout)
    assert torch.equal(grads[0], expected[2]) and torch.equal(grads[1], expected[3])
    assert not w_gate_up.grad.any() and not w_down.grad.any()
    xl = x.clone().requires_grad_(True)
    moe_ffn_fp8(xl, tw, ti, w_gate_up, w_down).backward(dout, inputs=[xl])
    assert torch.equal(xl.grad, expected[0])
    assert not w_gate_up.grad.any() and not w_down.grad.any()
    moe_ffn_fp8(x, tw, ti, w_gate_up, w_down).backward(dout, inputs=[w_down])  # the in-place path again
    assert torch.equal(w_down.grad, expected[3]) and not w_gate_up.grad.any()


def test_hooked_or_low_precision_weights_get_their_gradient_through_autograd(monkeypatch):
    x, tw, ti, wgu, wd = _layer_inputs(T=24, H=128, inter=128, E=2, k=1)
    dout = torch.randn(24, 128, dtype=torch.bfloat16)
    expected = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)[1]
    flags = _spy_wgrad_accumulate(monkeypatch)
    w_gate_up, w_down = wgu.clone().requires_grad_(True), wd.clone().requires_grad_(True)
    calls = []
    w_gate_up.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.clone()))
    for _ in range(2):
        moe_ffn_fp8(x, tw, ti, w_gate_up, w_down).backward(dout)
    assert len(calls) == 2  # the hook saw both micro-batches: no in-place shortcut around autograd
    assert flags == [False, False, True, False]  # (w_down, then w_gate_up): w_down, unhooked, goes in place
    assert torch.equal(calls[1], expected[2] + expected[2]) and torch.equal(w_down.grad, expected[3] * 2)

    bf16_up, bf16_down = wgu.bfloat16().requires_grad_(True), wd.bfloat16().requires_grad_(True)
    for _ in range(2):
        moe_ffn_fp8(x, tw, ti, bf16_up, bf16_down).backward(dout)
    assert bf16_up.grad.dtype == torch.bfloat16 and flags[4:] == [False] * 4
    assert _sqnr_db(bf16_up.grad, expected[2] * 2) >= 20.0  # bf16 master weights quantize to other FP8 values


def test_weight_cache_reuses_until_in_place_update():
    w = torch.randn(2, 128, 256, requires_grad=True)
    cache = Fp8WeightCache()
    first = cache.get(w)
    assert cache.get(w) is first and cache.quantizations == 1
    with torch.no_grad():
        w.add_(1.0)  # what an optimizer step does
    pointers = [t.data_ptr() for t in (first.q, first.scale, first.q_t, first.scale_t)]
    second = cache.get(w)
    assert cache.quantizations == 2
    assert torch.equal(second.scale, ref_fp8.quantize_fp8_128x128(w.detach())[1])
    assert torch.equal(second.q_t.view(torch.uint8), second.q.transpose(1, 2).view(torch.uint8))
    # re-quantized in place: a decode graph captured on the copy reads these addresses (fresh tensors after
    # an optimizer step left it reading freed memory, since the step keeps the parameters' own addresses)
    assert second is first and [t.data_ptr() for t in (second.q, second.scale, second.q_t, second.scale_t)] == pointers
    w.data = torch.randn(2, 256, 256)  # another shape: a new copy
    third = cache.get(w)
    assert third is not first and third.q.shape == (2, 256, 256) and cache.quantizations == 3


def test_a_backward_pending_on_the_old_copy_fails_loudly_after_a_re_quantization():
    """The in-place re-quantization must not hand an earlier forward's backward the new weights silently."""
    x, tw, ti, wgu, wd = _layer_inputs(T=8, H=128, inter=128, E=2, k=1)
    x.requires_grad_(True), wgu.requires_grad_(True)
    cache = Fp8WeightCache()
    out = moe_ffn_fp8(x, tw, ti, wgu, wd, cache=cache)
    with torch.no_grad():
        wgu.add_(0.5)
    moe_ffn_fp8(x, tw, ti, wgu, wd, cache=cache)  # re-quantizes w_gate_up into the saved copy
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_compiled_layer_equals_eager():
    x, tw, ti, wgu, wd = _layer_inputs(T=16, H=128, inter=128, E=3, k=2)
    dout = torch.randn(16, 128, dtype=torch.bfloat16)
    compiled = torch.compile(moe_ffn_fp8, backend="aot_eager", fullgraph=True)
    out, grads = _layer_grads(x, tw, ti, wgu, wd, dout, compiled)
    ref, ref_grads = _layer_grads(x, tw, ti, wgu, wd, dout, moe_ffn_fp8)
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


# ---------------------------------------------------------------------------------------------- GPU (H100)


@pytest.mark.gpu
def test_moe_ffn_fp8_gpu():
    x, tw, ti, wgu, wd = _layer_inputs(T=2048, H=1024, inter=512, E=8, k=4, device="cuda")
    dout = torch.randn(2048, 1024, device="cuda")
    out, grads = _layer_grads(x, tw, ti, wgu, wd, dout, lambda *a: moe_ffn_fp8(*a, cache=Fp8WeightCache()))
    ref, ref_grads = _layer_grads(x, tw, ti, wgu, wd, dout, ref_fp8.moe_ffn_fp8, cast=torch.float64)
    assert _sqnr_db(out, ref) >= 21.0
    for g, r in zip(grads, ref_grads, strict=True):
        assert _sqnr_db(g, r) >= 21.0


@pytest.mark.xfail(strict=True, reason="issue 7 asks >= 25 dB vs the bf16 layer; the recipe itself reaches 22.2-25.0 "
                   "dB on Gaussian data (five E4M3 roundings around SwiGLU; the kernels equal its exact-arithmetic "
                   "emulation, see test_kernels_equal_the_recipe_in_exact_arithmetic). Strict: fails loudly if met.")
def test_moe_ffn_fp8_reaches_the_issue_25db_target_vs_bf16_layer():
    x, tw, ti, wgu, wd = _layer_inputs(T=48, H=256, inter=128, E=3, k=2)
    dout = torch.randn(48, 256)
    out, grads = _layer_grads(x, tw, ti, wgu, wd, dout, lambda *a: moe_ffn_fp8(*a, cache=Fp8WeightCache()))
    ref, ref_grads = _layer_grads(x, tw, ti, wgu, wd, dout, ref_fp8.moe_ffn_fp8, cast=torch.bfloat16)
    worst = min([_sqnr_db(out, ref)] + [_sqnr_db(g, r) for g, r in zip(grads, ref_grads, strict=True)])
    assert worst >= 25.0, f"worst SQNR {worst:.1f} dB"


def test_cache_is_invalidated_by_the_attached_optimizer_step():
    """FSDP2 writes gathered weights without bumping ``_version`` (and may reuse the address); writing
    through ``.data`` reproduces that: the keys cannot see it, the optimizer hook can."""
    w = torch.nn.Parameter(torch.randn(2, 128, 128))
    cache = Fp8WeightCache()
    optimizer = torch.optim.SGD([w], lr=0.5)
    handle = cache.attach(optimizer)
    first = cache.get(w)
    with torch.no_grad():
        w.data.copy_(torch.randn(2, 128, 128))  # same storage, same version counter
    assert cache.get(w) is first  # invisible to the keys: why training must attach the optimizer
    w.grad = torch.randn_like(w)
    optimizer.step()
    fresh = cache.get(w)
    assert fresh is first and cache.quantizations == 2  # re-quantized in place
    assert torch.equal(fresh.scale, ref_fp8.quantize_fp8_128x128(w.detach())[1])
    handle.remove()
    w.grad = torch.randn_like(w)
    optimizer.step()  # detached: no invalidation, but the step's in-place update bumps the version
    again = cache.get(w)
    assert cache.quantizations == 3 and torch.equal(again.scale, ref_fp8.quantize_fp8_128x128(w.detach())[1])


@pytest.mark.parametrize("backend", ["triton-interpret", "torch"])
def test_a_forward_without_backward_skips_the_backward_only_work_and_gives_the_same_bits(monkeypatch, backend):
    """Rollout and the frozen KL reference run the layer with no gradient: it still built the 128x1 tiles of x
    and the FP8 copy of h, then dropped them. Skipped now; the output is the same bits."""
    from r1fast.kernels import moe_layer

    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    x, tw, ti, wgu, wd = _layer_inputs(T=37, H=256, inter=128, E=3, k=2)
    with_grad, _ = _layer_grads(x, tw, ti, wgu, wd, torch.randn(37, 256), moe_ffn_fp8)
    calls = []
    real_dual, real_plain = moe_layer.quantize_fp8_1x128_dual, moe_layer.quantize_fp8_1x128
    monkeypatch.setattr(moe_layer, "quantize_fp8_1x128_dual", lambda *a, **k: calls.append("dual") or real_dual(*a, **k))
    monkeypatch.setattr(moe_layer, "quantize_fp8_1x128", lambda *a, **k: calls.append("1x128") or real_plain(*a, **k))
    with torch.no_grad():
        frozen = moe_ffn_fp8(x, tw, ti, wgu.requires_grad_(True), wd)
    assert calls == ["1x128", "1x128"]  # x and the SwiGLU output; before: dual, h, act
    assert torch.equal(frozen, with_grad) and not frozen.requires_grad
    calls.clear()
    no_leaf_needs_grad = moe_ffn_fp8(x, tw, ti, wgu.detach(), wd)
    assert calls == ["1x128", "1x128"] and torch.equal(no_leaf_needs_grad, with_grad)
