"""PyTorch reference for paged attention: argument checks, the CPU fallback and the test oracle.

Same signatures and the same errors as ``paged_attention.py``. Each sequence's KV is gathered from
its blocks into a contiguous [L, Hkv, D] tensor and attended to in fp32 (fp64 when the inputs are
fp64, which is how tests build the oracle), one sequence at a time, so the largest temporary is one
sequence's [Hq, Lq, L] score matrix.

Semantics shared with the kernels:
- ``seq_lens[b]`` counts the KV tokens of sequence b *including* its new tokens; with
  ``cu_seqlens_q`` the Lq queries of b sit at positions ``seq_lens[b] - Lq + j`` (aligned to the end)
  and, when ``causal``, query j sees keys ``0 .. seq_lens[b] - Lq + j``.
- A query row that sees no key at all (an empty sequence or an empty prefix) gets out = 0 and
  lse = -inf instead of NaN: merging such a partial result with another one then is exact.
- ``append_kv`` skips tokens whose slot is negative (padding), as vLLM does.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_HEAD_DIMS = (64, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)


# ---------------------------------------------------------------------------------------------
# argument checks (shared with the Triton path; they never read device memory, so no host sync)
# ---------------------------------------------------------------------------------------------


def _check_cache(q, k_cache, v_cache):
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if q.dtype not in REFERENCE_DTYPES:
        raise ValueError(f"q dtype {q.dtype} unsupported; use one of {REFERENCE_DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache dtype ({k_cache.dtype}, {v_cache.dtype}) must equal q dtype {q.dtype}")
    head_dim = q.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q head dim D={head_dim} unsupported; use one of {SUPPORTED_HEAD_DIMS}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} != q head dim {head_dim}")
    block_size = k_cache.shape[1]
    if block_size < 8 or block_size > 128 or block_size & (block_size - 1):
        raise ValueError(f"k_cache block_size={block_size} must be a power of two from 8 to 128")
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"q heads Hq={num_heads} must be a multiple of k_cache heads Hkv={num_kv_heads}")


def _check_table(name_table, block_table, name_lens, seq_lens, device):
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(
            f"{name_table} must be int32 [B, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}"
        )
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32 or seq_lens.shape[0] != block_table.shape[0]:
        raise ValueError(
            f"{name_lens} must be int32 [{block_table.shape[0]}] (one per {name_table} row), "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    for name, t in ((name_table, block_table), (name_lens, seq_lens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_out(out, q):
    if out is None:
        return
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be {q.dtype} {tuple(q.shape)} on {q.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def check_paged_attention_args(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, out):
    """Raise ValueError naming the offending argument; never reads device memory."""
    _check_cache(q, k_cache, v_cache)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_table("block_table", block_table, "seq_lens", seq_lens, q.device)
    batch = block_table.shape[0]
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise ValueError(
                f"decode (cu_seqlens_q=None) needs one query per sequence: q has T={q.shape[0]}, B={batch}"
            )
    else:
        if cu_seqlens_q.dim() != 1 or cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape[0] != batch + 1:
            raise ValueError(
                f"cu_seqlens_q must be int32 [B + 1] = [{batch + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
            )
        if cu_seqlens_q.device != q.device:
            raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device} but q is on {q.device}")
        if not isinstance(max_seqlen_q, int) or max_seqlen_q < 1:
            raise ValueError(f"max_seqlen_q must be a positive int (the longest query chunk), got {max_seqlen_q!r}")
    _check_out(out, q)


def check_cascade_args(
    q, k_cache, v_cache, prefix_block_table, prefix_lens, group_of_seq, suffix_block_table, suffix_lens, out
):
    """Raise ValueError naming the offending argument of ``paged_attention_cascade``."""
    _check_cache(q, k_cache, v_cache)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_table("prefix_block_table", prefix_block_table, "prefix_lens", prefix_lens, q.device)
    _check_table("suffix_block_table", suffix_block_table, "suffix_lens", suffix_lens, q.device)
    batch = q.shape[0]
    if suffix_block_table.shape[0] != batch:
        raise ValueError(f"suffix_block_table has {suffix_block_table.shape[0]} rows but q has B={batch} queries")
    if group_of_seq.shape != (batch,) or group_of_seq.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"group_of_seq must be int32/int64 [{batch}], got {group_of_seq.dtype} {tuple(group_of_seq.shape)}"
        )
    if group_of_seq.device != q.device:
        raise ValueError(f"group_of_seq is on {group_of_seq.device} but q is on {q.device}")
    _check_out(out, q)


def check_append_kv_args(k, v, k_cache, v_cache, slot_mapping):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must be equal [num_blocks, block_size, Hkv, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(
            f"k [T, Hkv, D] = {tuple(k.shape)} does not match k_cache heads/dim {tuple(k_cache.shape[2:])}"
        )
    if k.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"k head dim D={k.shape[2]} unsupported; use one of {SUPPORTED_HEAD_DIMS}")
    if not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"k, v, k_cache, v_cache dtypes must match, got {k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.dtype != torch.int64 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(
            f"slot_mapping must be int64 [T] = [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")


# ---------------------------------------------------------------------------------------------
# reference math
# ---------------------------------------------------------------------------------------------


def gather_kv(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, [length, Hkv, D], read through its block table row."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_row[:num_blocks].long()
    return cache[blocks].reshape(num_blocks * block_size, *cache.shape[2:])[:length]


def _attend(q, k, v, scale, causal):
    """q [Lq, Hq, D], k/v [L, Hkv, D] -> out [Lq, Hq, D], lse [Lq, Hq]; queries aligned to the end."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_q, num_heads, _ = q.shape
    length = k.shape[0]
    group = num_heads // k.shape[1]
    qc = q.to(compute).transpose(0, 1)  # [Hq, Lq, D]
    kc = k.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    vc = v.to(compute).repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qc, kc.transpose(1, 2)) * scale  # [Hq, Lq, L]
    if causal:
        pos = torch.arange(num_q, device=q.device) + (length - num_q)
        allowed = torch.arange(length, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]; -inf for rows without keys
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(weights, vc)  # rows without keys: all weights are exp(-inf) = 0 -> out 0
    return out.transpose(0, 1), lse.transpose(0, 1)


def _finish(out_c, lse_c, q, out, return_lse):
    if out is None:
        out = torch.empty_like(q)
    out.copy_(out_c)
    if return_lse:
        return out, lse_c.to(torch.float32 if q.dtype != torch.float64 else torch.float64)
    return out


def paged_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    *,
    cu_seqlens_q=None,
    max_seqlen_q=1,
    softmax_scale=None,
    causal=True,
    out=None,
    return_lse=False,
    num_splits=None,
):
    """Reference of ``r1fast.kernels.paged_attention`` (``num_splits`` is accepted and ignored).

    lse is fp32 (fp64 for fp64 inputs).
    """
    check_paged_attention_args(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, out)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_c = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse_c = torch.full(q.shape[:2], float("-inf"), dtype=compute, device=q.device)
    lens = seq_lens.tolist()
    starts = list(range(len(lens) + 1)) if cu_seqlens_q is None else cu_seqlens_q.tolist()
    for b, length in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = gather_kv(k_cache, block_table[b], length)
        v = gather_kv(v_cache, block_table[b], length)
        out_c[s:e], lse_c[s:e] = _attend(q[s:e], k, v, scale, causal)
    return _finish(out_c, lse_c, q, out, return_lse)


def paged_attention_cascade(
    q,
    k_cache,
    v_cache,
    prefix_block_table,
    prefix_lens,
    group_of_seq,
    suffix_block_table,
    suffix_lens,
    *,
    softmax_scale=None,
    out=None,
    return_lse=False,
    max_group_size=None,
    num_splits=None,
):
    """Reference of ``r1fast.kernels.paged_attention.paged_attention_cascade``: decode query b attends to the
    ``prefix_lens[g]`` tokens of its group's shared prefix (g = group_of_seq[b]) followed by its own
    ``suffix_lens[b]`` tokens. ``max_group_size`` and ``num_splits`` are accepted and ignored."""
    check_cascade_args(
        q, k_cache, v_cache, prefix_block_table, prefix_lens, group_of_seq, suffix_block_table, suffix_lens, out
    )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_c = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse_c = torch.full(q.shape[:2], float("-inf"), dtype=compute, device=q.device)
    prefix = prefix_lens.tolist()
    for b, (g, length) in enumerate(zip(group_of_seq.tolist(), suffix_lens.tolist(), strict=True)):
        k = torch.cat(
            [gather_kv(k_cache, prefix_block_table[g], prefix[g]), gather_kv(k_cache, suffix_block_table[b], length)]
        )
        v = torch.cat(
            [gather_kv(v_cache, prefix_block_table[g], prefix[g]), gather_kv(v_cache, suffix_block_table[b], length)]
        )
        out_c[b : b + 1], lse_c[b : b + 1] = _attend(q[b : b + 1], k, v, scale, causal=False)
    return _finish(out_c, lse_c, q, out, return_lse)


def check_slot_range(slot_mapping, k_cache):
    """Refuse a slot past the cache's num_blocks * block_size slots (negative slots mean "skip")."""
    capacity = k_cache.shape[0] * k_cache.shape[1]
    top = int(slot_mapping.max()) if slot_mapping.numel() else -1
    if top >= capacity:
        raise ValueError(f"slot_mapping holds slot {top} beyond the cache's {capacity} slots")


def append_kv(k, v, k_cache, v_cache, slot_mapping):
    """Reference of ``append_kv``: ``cache[slot // block_size, slot % block_size] = k[t]``; slot < 0 skips t."""
    check_append_kv_args(k, v, k_cache, v_cache, slot_mapping)
    check_slot_range(slot_mapping, k_cache)
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]
