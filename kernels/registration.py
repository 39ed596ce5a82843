"""One way to register r1fast's kernels as ``torch.ops.r1fast.*`` operators (with fakes for torch.compile).

Every launcher that runs a kernel is registered here, so ``torch.compile`` (and anything that traces
with fake tensors: FSDP2's meta init, ``torch.export``) sees an opaque operator with a known output
shape instead of tracing into Triton's Python. The op's implementation is the launcher itself: it keeps
the dispatch rule (Triton, interpreter or PyTorch reference) inside, so one registration serves all
devices.

Why ``torch.library.Library.define/impl`` and not the ``@torch.library.custom_op`` decorator: measured
on the CI machine, a ``custom_op`` call costs 11.2 us of Python dispatch against 1.1 us for an op
defined directly (and 0.06 us for a plain call). Decode runs paged attention once per layer per step,
so 28 layers x 10 us would add ~0.3 ms to every un-graphed decode step.

Rules for ops registered here (what ``torch.library.opcheck`` checks):
- an op returns new tensors or mutates arguments listed in ``mutates_args``, never an alias of an input;
  ``out=`` style APIs register an op that fills ``out`` and returns nothing;
- host synchronizations (argument validation that reads device values) stay in the public Python
  function, outside the op, and are skipped while ``host_checks_enabled()`` is False (compile, CUDA-graph
  capture, meta and fake tensors);
- ops that autograd must differentiate get ``register_autograd``; the others are called inside an
  ``autograd.Function`` (or under no_grad), where autograd is off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .dispatch import interpreting

NAMESPACE = "r1fast"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive for the process: dropping it unregisters
_REGISTERED: dict[str, object] = {}
_FAKE_MODE_KEY = torch._C._TorchDispatchModeKey.FAKE
# Triton's interpreter is not thread-safe (it patches triton.language globally during a launch): two
# threads launching at once crashed inside it, a plain @triton.jit kernel too. Under TRITON_INTERPRET
# every op body runs under this lock (reentrant: an op may call another); compiled Triton (GPU) takes
# no lock, the choice is made once at registration.
_INTERPRETER_LOCK = threading.RLock()
_TRUSTED_INPUTS = contextvars.ContextVar("r1fast_trusted_inputs", default=False)


def _serialized(impl):
    """``impl`` run under ``_INTERPRETER_LOCK`` (same signature, so ``infer_schema`` reads it through)."""
    @functools.wraps(impl)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return impl(*args, **kwargs)
    return locked


def register_op(name: str, impl, *, fake, mutates_args: tuple[str, ...] = ()):
    """Define ``torch.ops.r1fast.<name>`` from ``impl``'s type-annotated signature; return the op.

    ``fake(*args)`` returns empty tensors of the outputs' shapes/dtypes/devices (``None`` for ops
    that only mutate). Registering a name twice (a module reloaded) returns the first op.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    schema = torch.library.infer_schema(impl, mutates_args=mutates_args)
    _LIB.define(name + schema)
    _LIB.impl(name, _serialized(impl) if interpreting() else impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    op = getattr(getattr(torch.ops, NAMESPACE), name)
    _REGISTERED[name] = op
    return op


def register_autograd(name: str, backward, *, setup_context) -> None:
    """``torch.library.register_autograd`` for the op ``register_op`` defined as ``name``."""
    if name not in _REGISTERED:
        raise ValueError(f"{name!r} is not registered: call register_op first")
    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=_LIB)


def registered_ops() -> dict[str, object]:
    """name -> ``torch.ops.r1fast.<name>`` for every op registered so far (imports register them)."""
    return dict(_REGISTERED)


def host_checks_enabled(tensor: torch.Tensor | None = None) -> bool:
    """Whether a validation that reads device values on the host may run now.

    Not while ``torch.compile`` traces (it would break the graph), nor while a CUDA graph is being
    captured on ``tensor``'s device (the read would be illegal), nor for values that do not exist:
    ``tensor`` on the meta device (FSDP2's meta init) or a fake tensor, or any call under an active
    ``FakeTensorMode`` (shape inference, ``torch.export``). Those cannot be read (``.item()`` raises
    on meta, and fake mode raises DataDependentOutputException), and the checks will run on the real
    values later. Cost: ~0.5 us per call (``torch._guards.detect_fake_mode`` took 5.7 us, too much for
    a decode step that validates once per layer, so the fake mode is found by its dispatch key).
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._get_dispatch_mode(_FAKE_MODE_KEY) is not None:
        return False
    if tensor is not None:
        if tensor.is_meta or isinstance(tensor, FakeTensor):
            return False
        if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
    return True


@contextlib.contextmanager
def trusted_inputs():
    """Inside: the GRPO ops skip the validation that reads device *values* (non-finite hidden, token
    range, a mask that is not 0/1); shapes, dtypes and options are still checked.

    Internal, for r1fast's own trainer, whose inputs hold these by construction: ``pack()`` builds a 0/1
    mask, the completion ids were sampled from the same vocabulary, and a non-finite hidden state shows
    up as a non-finite loss or entropy, which the trainer detects on the device (skipping the update;
    ``clip_and_step`` also refuses a non-finite gradient norm). The checks cost 4 host syncs and one
    extra pass over hidden per micro-batch; a sync stops the CPU from queueing the next micro-batch and
    breaks FSDP2's prefetch overlap. Every other caller keeps the full validation.
    """
    token = _TRUSTED_INPUTS.set(True)
    try:
        yield
    finally:
        _TRUSTED_INPUTS.reset(token)


def value_checks_enabled() -> bool:
    """False inside ``trusted_inputs()`` (see there); the host-sync rules of ``host_checks_enabled`` still apply."""
    return not _TRUSTED_INPUTS.get()
