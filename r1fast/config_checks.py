"""Field checks shared by the run configs of r1fast.train, r1fast.sft and r1fast.pipeline (kept out of
``r1fast.config`` so that module stays one dataclass per concern)."""

from __future__ import annotations

import os

from r1fast.config_io import ConfigError

__all__ = ["check_dir_name", "check_fp8_experts", "check_master_weights"]


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


def check_fp8_experts(enabled: bool, name_or_path: str) -> None:
    """``parallel.fp8_experts`` needs routed experts whose hidden and moe_intermediate sizes are multiples of the
    recipe's 128 tile: read from config.json before the model loads (a dense model was refused only after its
    whole load, minutes for a 7B)."""
    if not enabled:
        return
    if name_or_path == "tiny":
        raise ConfigError("parallel.fp8_experts=true: the tiny model is dense (no routed experts to run in FP8)")
    from r1fast.kernels.moe_layer import TILE as FP8_TILE  # the kernels' tile, not a second copy of 128
    from r1fast.model_config import ModelArgs

    args = ModelArgs.from_dir(name_or_path)
    if not args.is_moe:
        raise ConfigError(f"parallel.fp8_experts=true: {name_or_path} is a dense {args.model_type} model (no routed "
                          "experts to run in FP8)")
    if args.hidden_size % FP8_TILE or args.moe_intermediate_size % FP8_TILE:
        raise ConfigError(f"parallel.fp8_experts=true: the FP8 recipe needs hidden_size and moe_intermediate_size to "
                          f"be multiples of {FP8_TILE}, {name_or_path} has {args.hidden_size} and "
                          f"{args.moe_intermediate_size}")
