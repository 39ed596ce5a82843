"""Integer helpers for launch grids and block sizes, in plain Python.

The launchers and the op modules call these on every path (the reference path and the fakes size
outputs with ``cdiv`` too), so they must not need Triton: ``triton.cdiv`` / ``triton.next_power_of_2``
made ``import r1fast.kernels.fp8`` fail on installs without Triton (setup.py declares it for Linux only).
Both give the same integers as Triton's functions of the same names for every size the launchers pass.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for integers, y > 0: the number of tiles of size ``y`` that cover ``x``."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for n <= 0, as Triton's bit-smearing version gives for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
