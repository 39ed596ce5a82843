"""Writing HF checkpoints: sharded safetensors plus config.json, each file landing atomically.

The layout and tensor names are ``checkpoint``'s (which reads them back); weights loaded from a block-FP8 file are
written dequantized, in the model's dtype or ``dtype``, with no quantization_config.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from .checkpoint import _KEEP_FP32, INDEX_FILE, SINGLE_FILE, Piece, _pieces, _warn_semantics, resolve_dtype
from .safe_write import open_new_beside


def parse_size(size) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (HF's convention: GB = 1e9)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size (e.g. 5GB, 500MB, 2GiB or an int)")
    unit = m.group(2).upper()
    power = "KMGT".index(unit[0]) + 1
    return int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))


def _atomic_write(final: str, write) -> None:
    """``write(tmp)`` (or text) into a new temp file beside ``final`` (``safe_write.open_new_beside``: a random name,
    never a planted link), fsync, rename over ``final``, with open()'s mode (safetensors writes 0600)."""
    fd, tmp = open_new_beside(final)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(write if isinstance(write, str) else "")
        if not isinstance(write, str):
            write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_pretrained(model, path, *, max_shard_size="5GB", dtype=None) -> None:
    """Write ``model`` as an HF directory; each file lands atomically, stale shards of an earlier save go.

    dtype: the dtype floating weights are written in, a torch dtype or its name as ``resolve_dtype`` takes it;
    None keeps each tensor's own dtype.
    """
    path = os.fspath(path)
    if dtype is not None:
        dtype = resolve_dtype(dtype)
    limit = parse_size(max_shard_size)
    _warn_semantics(model.args, "save")
    os.makedirs(path, exist_ok=True)
    pieces = _pieces(model)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())

    def out_dtype(p: Piece):
        t = state[p.ours]
        if dtype is None or not t.is_floating_point() or p.ours.endswith(_KEEP_FP32):
            return t.dtype
        return dtype

    shards, current, current_bytes = [], [], 0
    for p in pieces:
        nbytes = torch.Size(p.shape).numel() * torch.empty(0, dtype=out_dtype(p)).element_size()
        if current and current_bytes + nbytes > limit:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += nbytes
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        # clone: per-expert slices share storage, which safetensors refuses; also detaches from autograd
        tensors = {p.hf_name: state[p.ours].detach()[p.index].to("cpu", out_dtype(p)).clone() for p in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_write(os.path.join(path, name), lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        weight_map.update({n: name for n in tensors})
        del tensors
    if len(shards) > 1:
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        _atomic_write(os.path.join(path, INDEX_FILE), index)
    saved_dtype = dtype or model.embed_tokens.weight.dtype
    hf_config = model.args.to_hf_config(dtype=str(saved_dtype).replace("torch.", ""))
    if model.args.model_type.startswith("deepseek"):  # no MTP layer is kept (see load): declare none, or a reader
        hf_config["num_nextn_predict_layers"] = 0  # such as vLLM's MTP speculation looks for missing weights
    config = json.dumps(hf_config, indent=2)
    _atomic_write(os.path.join(path, "config.json"), config)
    if model.args.generation_config is not None:  # the loaded one, verbatim (stop ids, sampling defaults)
        generation = json.dumps(model.args.generation_config, indent=2)
        _atomic_write(os.path.join(path, "generation_config.json"), generation)
    for stale in os.listdir(path):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale) and stale not in names:
            if stale != INDEX_FILE or len(shards) == 1:
                os.remove(os.path.join(path, stale))
