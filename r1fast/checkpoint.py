"""HF-format checkpoints: streaming safetensors load onto a meta-built model (``checkpoint_save`` writes them).

Layout read and written (what ``transformers`` uses): ``config.json`` plus either ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` shards listed in ``model.safetensors.index.json``. Tensor names are
HF's; r1fast's stacked experts (``w_gate_up`` [E, 2I, H], ``w_down`` [E, H, I]) map to HF's per-expert
``experts.{e}.{gate,up,down}_proj.weight`` (transformers-5's fused ``experts.gate_up_proj`` /
``experts.down_proj`` are also accepted on load).

Loading checks everything it can from the safetensors headers before allocating any weight (missing,
unexpected, wrongly shaped tensors, where a tensor of 0 elements is never unexpected; unreadable or truncated files), then allocates the model once on the
target device and copies one tensor at a time into it, so no second copy of the weights exists. Every
problem raises ``CheckpointError`` (a ``ConfigError``, so a ``ValueError``) naming the file and the tensor; a
model is returned only when every parameter was filled. Block-FP8 files (DeepSeek-V3/R1, Qwen3-FP8) are
dequantized tensor by tensor as they load (``checkpoint_fp8``).

Tied embeddings follow transformers 5 (``PreTrainedModel.tie_weights`` during ``from_pretrained``): config.json's
``tie_word_embeddings=true`` with a stored ``lm_head.weight`` that differs from ``model.embed_tokens.weight``
(compared exactly, in the load dtype) loads untied with a warning, so the stored head is used and a later save
writes ``tie_word_embeddings=false``; an equal one is dropped (tied); a stored head without an embedding fills
the embedding.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .checkpoint_fp8 import dequantize_into, quantized_weights, read_scale, weight_block
from .config_io import ConfigError
from .model_config import ModelArgs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_KEEP_FP32 = ("e_score_correction_bias",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
"""The weight dtypes every op runs in (float64 for oracle runs); block-FP8 files are dequantized into one of them."""
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32",
                  "fp64": "float64", "double": "float64"}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
_COMPARE_BLOCK_BYTES = 64 << 20
"""Rows of the head and the embedding compared at a time: 64 MiB of fp32 per side is ~4.6k rows of a 3584-wide
Qwen2.5-7B vocabulary (152k rows), so the check never holds a second [V, H] copy (1.1 GB in bf16)."""
_FLOAT_HEADER_DTYPES = ("F64", "F32", "F16", "BF16")
"""safetensors header dtypes that copy into a float parameter as the same numbers (FP8 weights need their scales:
checkpoint_fp8)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded as asked (missing, corrupt or mismatched files); the message is one line
    naming the file and the tensor. A ``ConfigError``: the checkpoint is the user's input (model.name_or_path),
    so the CLIs print it as ``<prog>: error: ...`` instead of a traceback."""


@dataclass
class Piece:
    """One HF tensor and where it lives in r1fast's state: ``state[ours][index]``."""

    hf_name: str
    ours: str
    index: tuple
    shape: tuple


_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")
"""Module-name segments that wrappers applied from outside insert (activation checkpointing, torch.compile)."""


def _canonical(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _pieces(model, fused_expert_layers=frozenset()) -> list[Piece]:
    """HF tensors of ``model`` in a stable order (HF names; experts split per expert unless fused).

    HF names ignore wrapper segments (``_checkpoint_wrapped_module.``), so a model saved with activation
    checkpointing on loads anywhere; ``Piece.ours`` keeps the real attribute path.
    """
    out = []
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    for ours, t in state.items():
        name = _canonical(ours)
        if name.endswith("experts.w_gate_up") or name.endswith("experts.w_down"):
            prefix = "model." + name[: -len("w_gate_up" if name.endswith("w_gate_up") else "w_down")]
            if prefix in fused_expert_layers:
                hf = prefix + ("gate_up_proj" if name.endswith("w_gate_up") else "down_proj")
                out.append(Piece(hf, ours, (), tuple(t.shape)))
                continue
            num_experts, rows = t.shape[0], t.shape[1]
            for e in range(num_experts):
                if name.endswith("w_down"):
                    out.append(Piece(f"{prefix}{e}.down_proj.weight", ours, (e,), tuple(t.shape[1:])))
                else:
                    half = rows // 2
                    out.append(Piece(f"{prefix}{e}.gate_proj.weight", ours, (e, slice(0, half)), (half, t.shape[2])))
                    out.append(Piece(f"{prefix}{e}.up_proj.weight", ours, (e, slice(half, rows)), (half, t.shape[2])))
        else:
            hf = name if name.startswith("lm_head.") else "model." + name
            out.append(Piece(hf, ours, (), tuple(t.shape)))
    return out


def _ignorable(hf_name: str, args: ModelArgs) -> bool:
    """Tensors HF checkpoints may carry that r1fast deliberately does not load."""
    if args.tie_word_embeddings and hf_name == HEAD:
        return True  # tied: the head is the embedding
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # derived from the config
    return _is_mtp(hf_name, args)


def _is_mtp(hf_name: str, args: ModelArgs) -> bool:
    """A tensor of a DeepSeek multi-token-prediction layer (a layer past the last decoder layer)."""
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    if not (m and args.model_type.startswith("deepseek")):
        return False
    # DeepSeek-V3's multi-token-prediction layers sit right after the last decoder layer (transformers' default
    # and the released V3 both have 1); training ignores them. Any other surplus layer means the config and
    # the weights disagree, which must stay an error.
    mtp = args.hf_config.get("num_nextn_predict_layers", 1 if args.model_type == "deepseek_v3" else 0) or 0
    return args.num_layers <= int(m.group(1)) < args.num_layers + int(mtp)


def _stored_equal(found: dict, a: str, b: str, dtype: torch.dtype) -> bool:
    """Whether stored tensors ``a`` and ``b`` hold the same numbers once cast to ``dtype`` (``torch.equal``, as
    transformers compares the loaded parameters), read in row blocks so neither is held whole."""
    (file_a, shape, _), (file_b, shape_b, _) = found[a], found[b]
    if shape != shape_b or len(shape) != 2:
        return False
    rows = max(1, _COMPARE_BLOCK_BYTES // max(1, shape[1] * 4))
    try:
        with safe_open(file_a, framework="pt") as fa, safe_open(file_b, framework="pt") as fb:
            sa, sb = fa.get_slice(a), fb.get_slice(b)
            for start in range(0, shape[0], rows):
                if not torch.equal(sa[start:start + rows].to(dtype), sb[start:start + rows].to(dtype)):
                    return False
    except Exception as e:  # safetensors raises its own error types for truncated data
        raise CheckpointError(f"{file_a}: {a} or {b} cannot be read ({e})") from e
    return True


def _tie_as_stored(path: str, args: ModelArgs, found: dict, dtype: torch.dtype) -> tuple[ModelArgs, dict]:
    """(args, {HF name: stored name}) after transformers 5's tying rules for a tied config (module docstring).

    A head that differs from the embedding is a checkpoint untied by another trainer without updating its
    config.json; dropping it changed the logits by up to 1.39 (a probe's tiny Llama) and a later save wrote the
    changed model as tied.
    """
    if not (args.tie_word_embeddings and HEAD in found):
        return args, {}
    if EMBED not in found:
        return args, {EMBED: HEAD}  # transformers ties the embedding to the head that exists
    if _stored_equal(found, HEAD, EMBED, dtype):
        return args, {}
    warnings.warn(f"{found[HEAD][0]}: {HEAD} differs from {EMBED} although {os.path.join(path, 'config.json')} sets "
                  "tie_word_embeddings=true; loading them untied as transformers does (the stored head is used and a "
                  "save writes tie_word_embeddings=false)", stacklevel=4)
    return args.replace(tie_word_embeddings=False), {}


def _warn_semantics(args: ModelArgs, when: str) -> None:
    """UserWarnings for configs r1fast runs as written but another reader computes differently or ignores."""
    divergence = args.transformers_divergence()
    if divergence:
        warnings.warn(f"{when}: {divergence}", stacklevel=3)


def weights_file(path: str) -> str | None:
    """The weight file of the HF directory ``path``: its index if present, else its single file, else None."""
    candidates = [os.path.join(path, name) for name in (INDEX_FILE, SINGLE_FILE)]
    return next((file for file in candidates if os.path.isfile(file)), None)


def _read_headers(path: str) -> dict[str, tuple[str, list[int], str]]:
    """HF name -> (file, shape, header dtype such as "BF16") from the safetensors headers (no tensor data read)."""
    index_file, single = os.path.join(path, INDEX_FILE), os.path.join(path, SINGLE_FILE)
    where = weights_file(path)
    if where == index_file:
        try:
            with open(index_file, encoding="utf-8") as f:
                weight_map = dict(json.load(f)["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: unreadable index ({e})") from e
        for name, file in weight_map.items():  # checked before any open: '../x' or '/x' read files outside path
            if not isinstance(file, str) or file in ("", ".", "..") or os.path.basename(file) != file:
                raise CheckpointError(f"{index_file}: tensor {name} maps to {file!r}, not a file name in {path}")
        files = sorted(set(weight_map.values()))
    elif where == single:
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no weights: neither {single} nor {index_file} exists")
    found = {}
    for file in files:
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: listed in {INDEX_FILE} but missing")
        try:
            with safe_open(full, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    found[name] = (full, list(piece.get_shape()), piece.get_dtype())
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise CheckpointError(f"{full}: not a readable safetensors file ({e})") from e
    for name, file in (weight_map or {}).items():
        if name not in found or os.path.basename(found[name][0]) != file:
            raise CheckpointError(f"{os.path.join(path, file)}: tensor {name} is listed in {INDEX_FILE} but not stored there")
    return found


def resolve_dtype(dtype) -> torch.dtype:
    """A weight dtype (fp32, bf16, fp16 or fp64) from a torch.dtype or its name ("bfloat16", "bf16", "torch.float32").

    Anything else raises ValueError naming ``dtype``: integer dtypes would truncate the weights, and FP8 casts
    without scales produce a model whose forward fails (no fp8 add/matmul on plain tensors).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; use one of {sorted(_DTYPES)}")
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use a torch dtype or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_pretrained(cls, path, *, dtype=None, device=None):
    """Build ``cls`` from an HF directory; see the module docstring for what is checked and when.

    dtype: a torch dtype or its name ("bfloat16", "bf16", "float32", ...); None: config.json's dtype.
    """
    path = os.fspath(path)
    if dtype is not None:
        dtype = resolve_dtype(dtype)
    args = ModelArgs.from_dir(path)
    _warn_semantics(args, "load")
    alpha = args.hf_config.get("aux_loss_alpha") if args.is_moe else None
    if isinstance(alpha, (int, float)) and alpha > 0:
        # real DeepSeek-V2/V3 configs carry 0.001: say once per load that nothing balances the router
        warnings.warn(f"load: aux_loss_alpha={alpha} is ignored: r1fast computes no load-balancing loss and never "
                      "updates V3's e_score_correction_bias (RL fine-tuning keeps the router's balance as loaded; see "
                      "r1fast.moe)", stacklevel=2)
    if dtype is None:
        dtype = _DTYPES.get(str(args.torch_dtype).replace("torch.", ""), torch.float32)
    device = torch.device(device or "cpu")
    found = _read_headers(path)
    args, stored_as = _tie_as_stored(path, args, found, dtype)
    found.update({name: found[source] for name, source in stored_as.items()})
    with torch.device("meta"):
        model = cls(args).to(dtype)
    fused = {n[: -len("gate_up_proj")] for n in found if n.endswith("experts.gate_up_proj")}
    pieces = _pieces(model, frozenset(fused))
    expected = {p.hf_name for p in pieces}
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{weights_file(path)}: {len(missing)} missing tensor(s), e.g. {sorted(missing)[:5]}")
    # A tensor with no elements holds no weights: transformers writes 0-width modules r1fast leaves out
    # (shared_experts [0, H] and [H, 0] when n_shared_experts=0); they add exactly zero there.
    block = weight_block(args.hf_config)  # ModelArgs checked it
    try:
        fp8 = quantized_weights(found, expected, block)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    extra = sorted(n for n in found if n not in expected and not _ignorable(n, args) and math.prod(found[n][1])
                   and n not in fp8.values())
    if extra:
        raise CheckpointError(f"{found[extra[0]][0]}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all: {extra[:5]})")
    mtp = [n for n in found if _is_mtp(n, args) and math.prod(found[n][1])]
    if mtp:  # said once: a save writes no MTP layer (and num_nextn_predict_layers = 0, see save_pretrained)
        warnings.warn(f"load: {len(mtp)} multi-token-prediction tensors of {path} (layers past num_hidden_layers="
                      f"{args.num_layers}) are not loaded: r1fast trains next-token prediction only, and saves none",
                      stacklevel=3)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    for p in pieces:
        file, shape, stored = found[p.hf_name]
        if tuple(shape) != p.shape:
            raise CheckpointError(f"{file}: tensor {p.hf_name} has shape {tuple(shape)}, expected {p.shape}")
        if state[p.ours].is_floating_point() and stored not in _FLOAT_HEADER_DTYPES and p.hf_name not in fp8:
            # copy_ would cast integers into the float weights silently
            raise CheckpointError(f"{file}: tensor {p.hf_name} is stored as {stored}, expected a float dtype "
                                  f"({', '.join(_FLOAT_HEADER_DTYPES)})")
    model.to_empty(device=device)
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    by_file: dict[str, list[Piece]] = {}
    for p in pieces:
        by_file.setdefault(found[p.hf_name][0], []).append(p)
    with torch.no_grad():
        for file, file_pieces in by_file.items():
            try:
                with safe_open(file, framework="pt") as f:
                    for p in file_pieces:
                        try:
                            tensor = f.get_tensor(stored_as.get(p.hf_name, p.hf_name))
                        except Exception as e:
                            raise CheckpointError(f"{file}: tensor {p.hf_name} cannot be read ({e})") from e
                        if p.hf_name in fp8:
                            scale = read_scale(found, fp8[p.hf_name], f, file)
                            dequantize_into(state[p.ours][p.index], tensor, scale, block)
                        else:
                            state[p.ours][p.index].copy_(tensor)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file}: cannot be read ({e})") from e
    return model
