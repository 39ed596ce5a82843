"""Block-FP8 checkpoints (DeepSeek-V3 / R1 as released, Qwen3-FP8): read by dequantizing each weight as it loads.

Format, config.json's ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [bn, bk]}``:
a quantized Linear weight W [..., N, K] is stored as float8_e4m3fn beside ``<name>_scale_inv`` [..., ceil(N/bn),
ceil(K/bk)] (fp32 or bf16) and W = fp8 · scale_inv over each bn × bk block. The last block of a dimension may be
partial: DeepSeek-V3's kv_a_proj_with_mqa has 576 rows, 4.5 blocks of 128, with 5 rows of scales (DeepSeek's own
``weight_dequant`` masks the partial block; transformers 5.24's dequantizing load, its path without a GPU, derives
the block from the grid instead and refuses 576 / 5). Which weights are quantized is read from the files (F8_E4M3 with a scale beside it), so
``modules_to_not_convert`` (lm_head, routers, norms, stored in bf16) needs no list.

The model holds the dequantized weights in its load dtype, exactly ``(fp8.float() * scale_inv.float()).to(dtype)``
as transformers computes them: RL updates need fp32/bf16 master weights (the FP8 MoE path re-quantizes its experts
from them once per optimizer step), and ``save_pretrained`` writes them unquantized, without quantization_config.
"""

from __future__ import annotations

import math

import torch
from safetensors import safe_open

from r1fast.kernels.ref_fp8 import dequantize_fp8  # the kernels' reference dequantization (no Triton import)

SCALE_SUFFIX = "_scale_inv"
FP8_HEADER_DTYPE = "F8_E4M3"
_SCALE_HEADER_DTYPES = ("F32", "BF16", "F16")
_CHUNK_ELEMENTS = 16 << 20
"""fp32 elements dequantized at a time (64 MiB): V3's first dense layers hold 18432 × 7168 weights, whose whole
fp32 copy (528 MB) would sit beside the model while it loads."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def weight_block(cfg: dict) -> tuple[int, int] | None:
    """(bn, bk) of config.json's block-FP8 ``quantization_config``; None when there is none. Any other quantization
    raises ValueError naming the field (r1fast would otherwise load packed integers or scales as weights)."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config={q!r} is not a JSON object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ValueError(f"quantization_config (quant_method={method!r}) is not supported: r1fast reads block-FP8 "
                         "checkpoints (quant_method 'fp8' with weight_block_size, as DeepSeek-V3/R1 and Qwen3-FP8 "
                         "ship); dequantize others to bf16 first")
    if q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt={q['fmt']!r} is not supported (only e4m3 weights)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme={q['activation_scheme']!r} is not supported "
                         "(only 'dynamic': static checkpoints carry activation scales r1fast would not use)")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_is_int(b) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size={block!r} is not supported: r1fast reads "
                         "block-wise FP8 (two positive ints such as [128, 128]), not per-tensor or per-channel scales")
    return int(block[0]), int(block[1])


def quantized_weights(found: dict, expected, block: tuple[int, int] | None) -> dict[str, str]:
    """{weight: its scale} for each expected tensor stored as F8_E4M3; ValueError "file: why" for an FP8 weight
    whose scale is missing, mis-shaped or not a float, and for FP8 weights in a checkpoint that declares no block.

    ``found``: HF name -> (file, shape, header dtype), as checkpoint reads it from the safetensors headers.
    """
    out = {}
    for name in expected:
        if name not in found or found[name][2] != FP8_HEADER_DTYPE:
            continue
        file, shape, _ = found[name]
        scale = name + SCALE_SUFFIX
        if block is None:
            raise ValueError(f"{file}: tensor {name} is stored as {FP8_HEADER_DTYPE} but config.json has no "
                             "block-FP8 quantization_config to say how to scale it")
        if scale not in found:
            raise ValueError(f"{file}: tensor {name} is stored as {FP8_HEADER_DTYPE} without its scale {scale}")
        scale_file, scale_shape, scale_dtype = found[scale]
        want = [*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])] if len(shape) >= 2 else None
        if want is None or list(scale_shape) != want:
            raise ValueError(f"{scale_file}: {scale} has shape {tuple(scale_shape)}, expected "
                             f"{tuple(want) if want else 'none'} for {name} {tuple(shape)} in {list(block)} blocks")
        if scale_dtype not in _SCALE_HEADER_DTYPES:
            raise ValueError(f"{scale_file}: {scale} is stored as {scale_dtype}, expected a float scale "
                             f"({', '.join(_SCALE_HEADER_DTYPES)})")
        out[name] = scale
    return out


def read_scale(found: dict, scale: str, opened, opened_file: str) -> torch.Tensor:
    """The scale tensor, from the already open weight file when it lives there, else from its own shard."""
    file = found[scale][0]
    if file == opened_file:
        return opened.get_tensor(scale)
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(scale)


@torch.no_grad()
def dequantize_into(dst: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    """``dst[...] = q · scale`` per (bn, bk) block, in fp32 then cast to dst's dtype, a few rows at a time (dst may
    be a strided view: a slice of the stacked experts)."""
    bn = block[0]
    if q.dim() > 2:
        for i in range(q.shape[0]):
            dequantize_into(dst[i], q[i], scale[i], block)
        return
    rows, cols = q.shape
    step = max(bn, _CHUNK_ELEMENTS // max(1, cols) // bn * bn)  # a multiple of bn: chunks start on a block
    scale = scale.to(dst.device)
    for start in range(0, rows, step):
        part = q[start:start + step].to(dst.device)
        part_scale = scale[start // bn: start // bn + math.ceil(part.shape[0] / bn)]  # this chunk's blocks only
        dst[start:start + part.shape[0]].copy_(dequantize_fp8(part, part_scale, block))
