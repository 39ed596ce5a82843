"""Field checks shared by the run configs of r1fast.train, r1fast.sft and r1fast.pipeline (kept out of
``r1fast.config`` so that module stays one dataclass per concern)."""

from __future__ import annotations

import os

from r1fast.config_io import ConfigError

__all__ = ["check_dir_name", "check_master_weights"]


def check_dir_name(value: str, key: str) -> None:
    """``value`` becomes one directory inside another (``out_dir/<name>``): a single non-empty path component.

    '' and '.' would make the run directory the parent itself (a rerun then moves every other run aside),
    '..' or 'a/../..' would write outside it, 'a/b' would nest runs where listing tools do not look.
    """
    separators = [s for s in ("/", os.sep, os.altsep) if s]
    if value in ("", ".", "..") or any(s in value for s in separators) or "\0" in value:
        raise ConfigError(f"{key}: {value!r} is not a directory name; use one non-empty path component "
                          "without '/' that is not '.' or '..'")


def check_master_weights(dtype: str, fsdp: bool) -> None:
    """Training in bf16/fp16 keeps fp32 master weights through FSDP2's mixed precision: refuse it without FSDP.

    With bf16 parameters AdamW's updates below bf16's resolution round away: at lr 1e-6 two GRPO steps moved 77
    of 28,320 weights (fp32: 28,319)."""
    if dtype in ("bfloat16", "float16") and not fsdp:
        raise ConfigError(f"model.dtype={dtype} trains with fp32 master weights, which FSDP2's mixed precision "
                          "keeps: set parallel.fsdp=true (one rank works too)")
