"""The attention backend the engine hands to the model: KV goes into the paged cache, attention reads it.

The model calls ``attn(q, k, v, *, layer, cu_seqlens, max_seqlen, softmax_scale, positions)`` once per layer
(see ``r1fast.attention``). The engine sets this object's per-step metadata before each forward
(``set_step``); the call then

1. writes the step's k, v [T, Hkv, D] into the layer's cache at ``slot_mapping`` (``append_kv``), and
2. attends the step's queries to everything cached for their sequences (``paged_attention``, or
   ``paged_attention_cascade`` when decode samples share their group's prompt blocks).

The ``cu_seqlens`` / ``max_seqlen`` the model passes describe the packed *query* chunks, which the engine
already put into the metadata, so they are ignored here.

Head dims: the kernels take one head dim D in {64, 128, 256} for q, k and v. Other widths (tiny test
models, MLA's Dqk = 192 / Dv = 128) are zero-padded up to the next supported D: zero columns in q and k
leave q . k unchanged (the softmax scale is passed explicitly), zero columns in v only produce output
columns that are sliced off. Dense models with D in {64, 128, 256} pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Imported from the op module rather than as ``r1fast.kernels.paged_attention``: that package attribute
# name is also the submodule's name, and once the submodule is imported the attribute is the module.
# The functions dispatch themselves (Triton, interpreted Triton or the reference) by the one rule.
from r1fast.kernels.paged_attention import append_kv, paged_attention, paged_attention_cascade

from .kv_cache import PagedKVCache

SUPPORTED_HEAD_DIMS = (64, 128, 256)


def cache_head_dim(qk_dim: int, v_dim: int) -> int:
    """The cache's D for a model's key/value widths (the smallest kernel-supported D that holds both)."""
    need = max(qk_dim, v_dim)
    for dim in SUPPORTED_HEAD_DIMS:
        if need <= dim:
            return dim
    raise ValueError(f"attention head dims (qk={qk_dim}, v={v_dim}) exceed the largest supported {SUPPORTED_HEAD_DIMS[-1]}")


@dataclass
class StepMetadata:
    """Device tensors describing one forward step (built by the engine).

    ``mode``: "varlen" (any mix of prefill chunks and decodes), "decode" (one query per sequence) or
    "cascade" (one query per sequence; sequences of a group share ``prefix_block_table[group]``).
    """

    mode: str
    slot_mapping: torch.Tensor  # int64 [T]
    block_table: torch.Tensor | None = None  # int32 [B, W]   (varlen, decode)
    seq_lens: torch.Tensor | None = None  # int32 [B]         (varlen, decode)
    cu_seqlens_q: torch.Tensor | None = None  # int32 [B + 1] (varlen)
    max_seqlen_q: int = 1
    prefix_block_table: torch.Tensor | None = None  # int32 [G, P]  (cascade)
    prefix_lens: torch.Tensor | None = None  # int32 [G]
    group_of_seq: torch.Tensor | None = None  # int32 [B]
    suffix_block_table: torch.Tensor | None = None  # int32 [B, S]
    suffix_lens: torch.Tensor | None = None  # int32 [B]
    max_group_size: int = 1


class PagedAttentionBackend:
    """Callable attention backend over a ``PagedKVCache``."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.meta: StepMetadata | None = None

    def set_step(self, meta: StepMetadata) -> None:
        self.meta = meta

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.cache.head_dim - x.shape[-1]
        return F.pad(x, (0, extra)) if extra else x

    def __call__(self, q, k, v, *, layer, cu_seqlens=None, max_seqlen=None, softmax_scale=None, positions=None):
        meta = self.meta
        if meta is None:
            raise RuntimeError("PagedAttentionBackend used before set_step(); the engine sets it per step")
        v_dim = v.shape[-1]
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** -0.5  # the scale of the unpadded width
        q, k, v = self._pad(q), self._pad(k), self._pad(v)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        append_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.mode == "cascade":
            out = paged_attention_cascade(
                q, k_cache, v_cache, meta.prefix_block_table, meta.prefix_lens, meta.group_of_seq,
                meta.suffix_block_table, meta.suffix_lens, softmax_scale=softmax_scale,
                max_group_size=meta.max_group_size,
            )
        else:
            varlen = meta.mode == "varlen"
            out = paged_attention(
                q, k_cache, v_cache, meta.block_table, meta.seq_lens,
                cu_seqlens_q=meta.cu_seqlens_q if varlen else None,
                max_seqlen_q=meta.max_seqlen_q if varlen else 1,
                softmax_scale=softmax_scale, causal=True,
            )
        return out[..., :v_dim] if out.shape[-1] != v_dim else out
