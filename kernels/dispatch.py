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

Before the first interpreted kernel, ``use_triton`` runs ``check_interpreter`` (once per process): a
one-loop probe kernel that fails fast, with one RuntimeError naming the versions and the way out, on
stacks whose interpreter cannot run r1fast's kernels (Triton < 3.7 with NumPy >= 2.4).

Without Triton installed (setup.py declares it for Linux only: macOS and Windows installs get torch alone),
``import r1fast.kernels``, every public op's reference path (rule 4, and rule 1 anywhere) and the registered
``torch.ops.r1fast.*`` work: the op modules import their ``*_triton.py`` kernel modules only inside the branch
that launches a kernel. When rule 2 or 3 picks a kernel there (a CUDA tensor, or ``TRITON_INTERPRET=1``),
``use_triton`` raises ImportError "Triton is not installed; ..." (``backend`` still names the rule's choice, as
it does for a broken interpreter). It raises rather than falls back: ``TRITON_INTERPRET=1`` asks for the kernel
code (a silent fallback would pass kernel tests on the reference), and on a GPU a silent fallback would hide a
broken install behind slower steps; ``R1FAST_KERNELS=torch`` is the explicit way to run the reference there.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Callable

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


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a finder that refuses the name, or a half-removed module in sys.modules
        return False


_TRITON_AVAILABLE = _find_triton()  # a plain constant: dynamo traces it freely


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (decided once, at import)."""
    return _TRITON_AVAILABLE


def triton_missing_error(choice: str) -> ImportError:
    """The error for a call that the dispatch rule sends to a Triton kernel (``choice``) on an install without it."""
    why = "a CUDA tensor runs the Triton kernels" if choice == "triton" else "TRITON_INTERPRET asks for the kernels"
    return ImportError(f"Triton is not installed; {why} (dispatch rule backend={choice!r}). Install triton "
                       "(pip install triton; on Windows the triton-windows package), or set R1FAST_KERNELS=torch "
                       "to run the PyTorch reference" + (", or unset TRITON_INTERPRET." if choice != "triton" else "."),
                       name="triton")


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


def check_same_device(lead_name: str, lead: torch.Tensor, tensors) -> None:
    """ValueError naming the first of ``tensors`` ((name, tensor or None) pairs) that is not on ``lead``'s device.

    The rule above picks the implementation from the lead tensor's device; the kernels then take raw pointers to
    every other argument, so one elsewhere (or on meta, where the value checks are skipped) was read as garbage."""
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.device != lead.device:
            raise ValueError(f"{name} is on {t.device} but {lead_name} is on {lead.device}")


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
        return "triton"  # also without Triton installed: use_triton then raises (see the module docstring)
    if device.type == "cpu" and interpreting():
        return "triton-interpret"
    return "torch"


# Triton 3.6's interpreter turns a runtime scalar argument into a Python int with int() of its shape-(1,) NumPy
# array (``tensor.__index__``, runtime/interpreter.py:888), which NumPy >= 2.4 refuses: every kernel looping
# ``range(0, V, BLOCK)`` over a runtime V died with InterpreterError(TypeError('only 0-dimensional arrays ...')),
# 112 kernel tests on Triton 3.6.0 + NumPy 2.4.6. The 3.7.0, 3.8.0 and 3.9.0 wheels squeeze the array first.
FIRST_FIXED_TRITON = "3.7.0"
_INDEX_DEFECT_TEXT = "0-dimensional arrays"  # NumPy's words for the refused int(array of shape (1,))
_probe_lock = threading.Lock()
_interpreter_verdict: list[str | None] = []  # [] not probed yet; [None] fine; [message] broken (raised again)


def _probe_kernel() -> None:
    """Run a one-program kernel that counts ``range(0, n)`` for a runtime ``n`` = 3 under the interpreter."""
    import triton  # noqa: PLC0415  (kept out of import time: importing r1fast.kernels must not import Triton)
    import triton.language as tl  # noqa: PLC0415

    @triton.jit
    def _count_kernel(out_ptr, n):
        count = tl.zeros((), dtype=tl.int32)
        for _ in range(0, n, 1):  # the loop shape of every row kernel: a runtime bound turned into a Python int
            count += 1
        tl.store(out_ptr, count)

    out = torch.zeros(1, dtype=torch.int32)
    _count_kernel[(1,)](out, 3)
    if int(out[0]) != 3:
        raise RuntimeError(f"the probe kernel counted {int(out[0])} iterations of range(0, 3)")


def interpreter_problem(probe: Callable[[], None], triton_version: str, numpy_version: str) -> str | None:
    """None when ``probe`` (a tiny interpreted kernel) runs; else the message of the error to raise.

    The known defect (an error whose cause chain names NumPy's refused conversion) gets the way out: Triton
    >= ``FIRST_FIXED_TRITON`` or NumPy < 2.4. Any other failure is reported as it is.
    """
    try:
        probe()
    except Exception as err:  # noqa: BLE001  (any failure means no interpreted kernel can be trusted)
        chain, cause = [], err
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        stack = f"Triton {triton_version} with NumPy {numpy_version}"
        if any(_INDEX_DEFECT_TEXT in str(e) for e in chain):
            return (f"Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run r1fast's kernels on {stack}: its "
                    "tensor __index__ calls int() on a shape-(1,) NumPy array, which NumPy >= 2.4 refuses, so every "
                    f"kernel that loops over a runtime bound fails. Install triton>={FIRST_FIXED_TRITON} or "
                    "numpy<2.4, or run the PyTorch reference (unset TRITON_INTERPRET, or R1FAST_KERNELS=torch). "
                    "Compiled GPU kernels are not affected.")
        return (f"Triton's CPU interpreter (TRITON_INTERPRET=1) failed r1fast's probe kernel on {stack}: "
                f"{type(err).__name__}: {err}. Run the PyTorch reference instead (unset TRITON_INTERPRET, or "
                "R1FAST_KERNELS=torch).")
    return None


def check_interpreter() -> None:
    """RuntimeError when Triton's interpreter cannot run r1fast's kernels here; probes once per process (72 ms on the CI machine)."""
    if not _interpreter_verdict:
        with _probe_lock:  # one probe; other threads wait for it, so no kernel runs beside the interpreter's patching
            if not _interpreter_verdict:
                import numpy  # noqa: PLC0415
                import triton  # noqa: PLC0415

                _interpreter_verdict.append(interpreter_problem(_probe_kernel, triton.__version__, numpy.__version__))
    if _interpreter_verdict[0] is not None:
        raise RuntimeError(_interpreter_verdict[0])


def use_triton(device, op: str | None = None) -> bool:
    """True when the Triton kernel (compiled or interpreted) should run for ``device``.

    ImportError "Triton is not installed; ..." when the rule picks a kernel and Triton is missing (see the module
    docstring). The first interpreted call checks the interpreter (``check_interpreter``): RuntimeError on a stack
    where it cannot run the kernels, instead of an InterpreterError deep inside one. Skipped while torch.compile
    traces (the eager call that precedes or follows it checks).
    """
    choice = backend(device, op)
    if choice in ("triton", "triton-interpret") and not _TRITON_AVAILABLE:
        raise triton_missing_error(choice)
    if choice == "triton-interpret" and not torch.compiler.is_compiling():
        check_interpreter()
    return choice in ("triton", "triton-interpret")
