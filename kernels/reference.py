"""PyTorch references for every r1fast kernel: the CPU fallback and the test oracle.

Each op family keeps its reference in ``ref_<family>.py`` beside its kernel file (one job per file);
this module is the single place callers and tests import them from. References are chunked so they
never need more memory than the kernel's contract allows (e.g. no [N, V] logits for the loss).
"""

import importlib

# public name -> module (inside r1fast.kernels) that defines it
_REFERENCES = {
    "fused_linear_logprobs": "ref_grpo_loss",
    "fused_linear_grpo_loss": "ref_grpo_loss",
    "paged_attention": "ref_paged_attention",
    "append_kv": "ref_paged_attention",
    "paged_attention_cascade": "ref_paged_attention",
    "quantize_fp8_1x128": "ref_fp8",
    "quantize_fp8_128x128": "ref_fp8",
    "fp8_grouped_gemm": "ref_fp8",
    "moe_ffn_fp8": "ref_fp8",
}

__all__ = sorted(_REFERENCES)


def __getattr__(name):
    module = _REFERENCES.get(name)
    if module is None:
        raise AttributeError(f"module 'r1fast.kernels.reference' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"r1fast.kernels.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_REFERENCES))
