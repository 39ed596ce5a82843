"""RoPE settings in config.json: read either HF form, write both.

transformers 5 names the RoPE settings ``rope_parameters`` (with ``rope_theta`` inside); transformers 4.x,
vLLM and DeepSeek's remote code read ``rope_scaling`` (no theta inside, ``rope_theta`` at top level, the kind
under ``rope_type`` or, in older code such as DeepSeek's ``modeling_deepseek.py``, ``type``). A config with
only ``rope_parameters`` loads in those readers with default RoPE: the model runs, with wrong positions for
every llama3 / yarn / linear checkpoint. So a save writes both forms with the same values; transformers 5
prefers ``rope_scaling`` when both are present and takes the theta from the top level, which gives it the
same dict it would have built from ``rope_parameters``.
"""

from __future__ import annotations

_NOT_SCALING = ("rope_theta", "partial_rotary_factor")
"""Keys of ``rope_parameters`` that are not scaling settings (4.x keeps them at the config's top level)."""


def read_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict with ``rope_type`` and without theta; None for default RoPE) from a config.json.

    Reads ``rope_parameters`` if present, else ``rope_scaling``; ValueError for partial rotary (not implemented).
    """
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    legacy_kind = rope.pop("type", None)
    rope.setdefault("rope_type", legacy_kind or "default")
    partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported")
    if rope["rope_type"] == "default":
        return theta, None
    return theta, rope


def rope_fields(theta: float, scaling: dict | None) -> dict:
    """The config.json entries for RoPE: ``rope_theta``, ``rope_parameters`` (transformers 5) and
    ``rope_scaling`` (transformers 4.x / vLLM: None for default RoPE, as 4.x writes it)."""
    scaling = {k: v for k, v in (scaling or {}).items() if k not in _NOT_SCALING and k != "type"}
    kind = scaling.get("rope_type", "default")
    parameters = {**scaling, "rope_type": kind, "rope_theta": theta}
    legacy = None if kind == "default" else {**scaling, "rope_type": kind, "type": kind}
    return {"rope_theta": theta, "rope_parameters": parameters, "rope_scaling": legacy}
