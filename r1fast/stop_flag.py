"""Graceful stop of ``r1fast.train``: SIGTERM or a first Ctrl-C (SIGINT) only sets a flag; the loop checks it,
agreed by all ranks, at the end of each step, writes a checkpoint and exits with 128 + the signal number.

Why a flag and not an exception: the signal lands in whatever the rank is doing, usually inside an FSDP
all-gather. Python's default SIGINT handler raised KeyboardInterrupt there, and the run ended with a traceback
and no checkpoint (the other ranks then waited out the collective timeout). A second Ctrl-C gets the handler
that was there before (Python's: KeyboardInterrupt), so an impatient user can still stop at once.
"""

from __future__ import annotations

import signal
import threading

import torch

from r1fast import distributed as D

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM or SIGINT; checked (and agreed on by all ranks) at the end of each step."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __call__(self, signum, frame):
        self.requested = True
        self.signum = self.signum or signum
        if signum == signal.SIGINT and signum in self._previous:
            signal.signal(signum, _handler(self._previous[signum]))  # the next Ctrl-C stops at once

    @property
    def name(self) -> str:
        """The signal that stopped this rank ("SIGTERM" when another rank's signal did)."""
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a process the signal killed reports it (143 for SIGTERM, 130 for SIGINT),
        so a scheduler tells an interrupted run from a finished one."""
        return 128 + int(self.signum or signal.SIGTERM)

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(D.all_reduce_sum(flag).item() > 0)

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (main thread only: Python delivers signals there; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self)

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced."""
        for signum, previous in self._previous.items():
            signal.signal(signum, _handler(previous))
        self._previous.clear()


def _handler(previous):
    """``previous`` as signal.signal takes it (None: a handler not installed from Python, the default)."""
    return signal.SIG_DFL if previous is None else previous
