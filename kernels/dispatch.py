"""The one kernel-dispatch rule of r1fast (see ARCHITECTURE.md, "Kernel dispatch").

1. ``R1FAST_KERNELS=torch``            -> the PyTorch reference everywhere.
2. CUDA tensor                         -> the Triton kernel, or ``r1fast._C`` for ops that were built
                                          and measured faster than their Triton version.
3. CPU tensor and ``TRITON_INTERPRET=1`` -> the same Triton kernel under Triton's interpreter
                                          (how CI exercises kernel code without a GPU).
4. any other tensor                    -> the PyTorch reference in ``reference.py``.

The environment is read on every call (it is a dictionary lookup), so tests can flip it.
``TRITON_INTERPRET`` itself must be set before Triton is imported: Triton decides at decoration
time whether a ``@triton.jit`` function is compiled or interpreted.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("triton", "cuda", "triton-interpret", "torch")
_KERNELS_ENV_VALUES = ("auto", "torch")


def _kernels_env() -> str:
    value = os.environ.get("R1FAST_KERNELS", "auto").strip().lower() or "auto"
    if value not in _KERNELS_ENV_VALUES:
        raise ValueError(f"R1FAST_KERNELS={value!r} is not understood; allowed values: {', '.join(_KERNELS_ENV_VALUES)}")
    return value


# Triton 3.x reads TRITON_INTERPRET with getenv_bool (triton.knobs.runtime.interpret): these words, ASCII
# case-insensitive, unstripped (' 1' compiles). Any other reading tests the wrong path: r1fast ran the torch
# reference for 'on'/'yes' while Triton interpreted, and claimed 'triton-interpret' for ' 1' while it compiled.
_TRITON_TRUE_WORDS = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET`` read as Triton reads it)."""
    value = os.environ.get("TRITON_INTERPRET", "")
    return value.isascii() and value.lower() in _TRITON_TRUE_WORDS


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # a plain constant: dynamo traces it freely


def triton_available() -> bool:
    return _TRITON_AVAILABLE


@functools.lru_cache(maxsize=1)
def cuda_extension():
    """The compiled ``r1fast._C`` module, or None when it was not built (CPU installs, no nvcc)."""
    try:
        from r1fast import _C  # noqa: PLC0415
    except ImportError:
        return None
    return _C


def cuda_extension_ops() -> frozenset[str]:
    """Ops for which ``r1fast._C`` was built and measured faster than the Triton kernel."""
    ext = cuda_extension()
    if ext is None:
        return frozenset()
    return frozenset(getattr(ext, "FASTER_THAN_TRITON", ()))


def backend(device, op: str | None = None) -> str:
    """Which implementation runs for tensors on ``device``.

    Returns ``"triton"``, ``"cuda"`` (the ``r1fast._C`` extension; only for an ``op`` it provides),
    ``"triton-interpret"`` or ``"torch"``.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if _kernels_env() == "torch":
        return "torch"
    if device.type == "cuda":
        if op is not None and op in cuda_extension_ops():
            return "cuda"
        if not triton_available():
            return "torch"
        return "triton"
    if device.type == "cpu" and interpreting() and triton_available():
        return "triton-interpret"
    return "torch"


def use_triton(device, op: str | None = None) -> bool:
    """True when the Triton kernel (compiled or interpreted) should run for ``device``."""
    return backend(device, op) in ("triton", "triton-interpret")
