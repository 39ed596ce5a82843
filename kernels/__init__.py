"""r1fast.kernels: Triton kernels for GRPO training, each with a PyTorch reference.

Public ops (each module holds kernels -> launcher -> autograd registration -> public function):

    grpo_loss        fused_linear_logprobs, fused_linear_grpo_loss
    paged_attention  paged_attention, paged_attention_cascade, append_kv
    fp8              quantize_fp8_1x128, quantize_fp8_128x128
    moe_gemm         fp8_grouped_gemm, moe_ffn_fp8 (the layer lives in moe_layer, routing in moe_permute)

Which implementation runs is decided by one rule in ``dispatch.py``; ``backend(device)`` tells it.
Every launcher is registered as a ``torch.ops.r1fast.*`` operator with a fake (``registration.py``),
so torch.compile traces the public functions without graph breaks.
Ops are imported lazily so that ``import r1fast.kernels`` stays cheap and does not import Triton.

Library contract (what callers outside r1fast may rely on):
  * Meta tensors and ``FakeTensorMode`` (FSDP2 meta init, ``torch.export``, shape inference): every
    public op returns outputs of the right shapes; checks that read values are skipped there and run
    on real tensors (``registration.host_checks_enabled``).
  * ``torch.compile(fullgraph=True)``, also with ``dynamic=True``: no graph break; the GRPO loss
    compiles twice for any number of sequence lengths (a static graph, then a dynamic one) on the
    kernel path, and on the reference path while B·T fits one reference chunk (``ref_chunk_tokens``).
  * ``R1FAST_KERNELS`` is read on every eager call, but a compiled function keeps the implementation
    it traced: the variable is not a dynamo guard. Call ``torch._dynamo.reset()`` after changing it.
  * Gradients: ``fused_linear_grpo_loss`` differentiates hidden, weight and bias (no double backward
    on the kernel path); ``fused_linear_logprobs`` and the quantizers return no-grad outputs; paged
    attention and ``append_kv`` are inference ops and raise ValueError for an input that requires
    grad while grad mode is on. ``torch.func`` transforms (grad, vmap) are not supported: the ops
    have no functorch rules and fail with PyTorch's own error.
  * Threads: compiled Triton launches are thread-safe as usual; Triton's CPU interpreter is not, so
    under ``TRITON_INTERPRET`` every op body runs under one process-wide lock (calls serialize).
"""

import importlib
import sys
import types

from .dispatch import BACKENDS, backend, interpreting, use_triton

# public name -> module (inside r1fast.kernels) that defines it
_OPS = {
    "fused_linear_logprobs": "grpo_loss",
    "fused_linear_grpo_loss": "grpo_loss",
    "paged_attention": "paged_attention",
    "append_kv": "paged_attention",
    "paged_attention_cascade": "paged_attention",
    "quantize_fp8_1x128": "fp8",
    "quantize_fp8_128x128": "fp8",
    "fp8_grouped_gemm": "moe_gemm",
    "moe_ffn_fp8": "moe_gemm",
}

__all__ = ["BACKENDS", "backend", "interpreting", "use_triton", *sorted(_OPS)]


def __getattr__(name):
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(f"module 'r1fast.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_OPS))


class _KernelsPackage(types.ModuleType):
    """Keeps public ops bound to functions when a same-named submodule is imported.

    ``paged_attention`` is both an op and its module: importing ``r1fast.kernels.paged_attention``
    makes Python set the package attribute to the module, which would shadow the function.
    """

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _OPS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage
