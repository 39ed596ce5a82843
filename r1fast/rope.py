"""Rotary position embeddings: inverse frequencies (default, linear, Llama-3, YaRN) and their application.

Frequencies follow the formulas of the respective papers / reference implementations (the same numbers
HF transformers computes, so checkpoints behave identically). Two layouts are supported:
rotate-half (Llama/Qwen: dims i and i + d/2 form a pair) and interleaved (DeepSeek MLA: dims 2i and
2i + 1 form a pair). The interleaved form writes its output de-interleaved (all first-of-pair values,
then all second-of-pair values); q and k get the same permutation, so q.k and hence attention are
unchanged, and it avoids a strided copy.
"""

from __future__ import annotations

import math

import torch


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(dim: int, theta: float, scaling: dict | None, max_position_embeddings: int):
    """Returns (inv_freq [dim/2] fp32, factor applied to cos/sin) for a rope_scaling dict (or None)."""
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    inv_freq = 1.0 / base
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        # absent: the model's own length, as transformers 5 fills it in (a KeyError here before)
        old_len = float(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated by `factor`, short ones kept, the band between blended smoothly
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
        factor = scaling.get("factor") or max_position_embeddings / orig
        factor = float(factor)
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001  # avoid 0/0 in the ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate by `factor`
        # 1/(factor*base), not (1/base)/factor: the same value rounded differently; transformers' order keeps
        # the frequencies bit-identical (DeepSeek-V3's factor 40, rope dim 64: 4 of 32 entries were 1 ulp off)
        interpolated = 1.0 / (factor * base)
        return interpolated * (1 - keep) + inv_freq * keep, float(attention_factor)
    raise ValueError(f"rope_scaling rope_type={kind!r} is not supported (default, linear, llama3, yarn)")


def mla_softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    """DeepSeek's softmax scale: 1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim**-0.5
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default" and scaling.get("mscale_all_dim"):
        m = _yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float):
    """cos, sin of shape [T, dim/2] in fp32 for integer positions [T]."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [T, heads, dim] by cos/sin [T, dim/2]; computed in x's dtype like the reference models."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
