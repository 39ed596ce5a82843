"""PyTorch reference for paged attention: argument checks, the CPU fallback and the test oracle.

Same signatures and the same errors as ``paged_attention.py``. KV is gathered from the blocks into
contiguous tensors and attended to in fp32 (fp64 when the inputs are fp64, which is how tests build
the oracle). Prefill (``cu_seqlens_q``) goes one sequence at a time, so its largest temporary is one
sequence's [Hq, Lq, L] score matrix; decode (one query per sequence, the CPU rollout's every step)
attends to all sequences at once, ``DECODE_CHUNK`` key positions at a time with a log-sum-exp merge:
the per-sequence loop was 85% of a CPU rollout of the tiny recipe (9,320 small attention calls for 64
samples x 48 tokens, 1.6 of 1.97 s). Chunks start at fixed positions and only rows that reach a chunk
take part, so a row's result never depends on the other rows of the batch (their number or lengths):
a 1-rank run and a 2-rank run, and the CUDA-graph path's padded batches, sample the same tokens.

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
import numbers

import torch

from .ref_grpo_loss import compute_dtype

SUPPORTED_HEAD_DIMS = (64, 128, 256)
DECODE_CHUNK = 64  # key positions per decode step of the reference: 1-2 chunks for the tiny recipe's <= 128
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
        # numpy integers too (np.int64(1) was refused); True is no length (it was taken as 1)
        if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, numbers.Integral) or max_seqlen_q < 1:
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
    compute = compute_dtype(q.dtype)
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


def _chunk_slots(rows: dict, start: int, block_size: int):
    """(block [B, DECODE_CHUNK], offset, valid) of positions [start, start + DECODE_CHUNK) of each row's
    sequence; valid: position < the row's length. A row's sequence is its ``prefix_len`` tokens read through
    ``prefix_table`` followed by its ``own_len`` tokens read through ``own_table`` (plain paged attention: no
    prefix), so cascade and plain tables of one sequence read the same positions in the same chunks. Table
    entries past a row's last used block are never read (they may hold any value); invalid slots are (0, 0)."""
    pos = torch.arange(start, start + DECODE_CHUNK, device=rows["own_len"].device)[None, :]
    prefix_len = rows["prefix_len"][:, None]
    valid = pos < prefix_len + rows["own_len"][:, None]
    in_prefix = pos < prefix_len
    at = torch.where(in_prefix, pos, pos - prefix_len).clamp(min=0)
    block = torch.zeros_like(at)
    for table, mine in ((rows["prefix_table"], in_prefix & valid), (rows["own_table"], ~in_prefix & valid)):
        if table.shape[1]:
            picked = table.long().gather(1, (at // block_size).clamp(max=table.shape[1] - 1))
            block = torch.where(mine, picked, block)
    return block, torch.where(valid, at % block_size, 0), valid


def _attend_rows(q, k, v, valid, scale):
    """One query per row: q [B, Hq, D], k/v [B, L, Hkv, D], valid [B, L] -> out [B, Hq, D], lse [B, Hq];
    a row without a valid key gets out 0 and lse -inf, as ``_attend``."""
    compute = compute_dtype(q.dtype)
    rows, num_heads, dim = q.shape
    kv_heads = k.shape[2]
    qc = q.to(compute).reshape(rows, kv_heads, num_heads // kv_heads, 1, dim)  # query head h reads KV head h // G
    # products summed over the last dim rather than a batched matmul: a sum reduces each output element on its
    # own, while bmm's blocking may depend on the batch size (a row alone and the same row among 7 differed in
    # the last bit, and the sampled tokens then depend on which rows share a step)
    scores = (qc * k.to(compute).permute(0, 2, 1, 3)[:, :, None]).sum(-1) * scale  # [B, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    values = v.to(compute).permute(0, 2, 3, 1)[:, :, None]  # [B, Hkv, 1, Dv, L]
    out = (weights[:, :, :, None, :] * values).sum(-1)  # [B, Hkv, G, Dv]
    return out.reshape(rows, num_heads, v.shape[-1]), lse.reshape(rows, num_heads)


def _merge(out, lse, rows, part_out, part_lse):
    """out[rows], lse[rows] := the softmax merge of themselves with a partial result over other keys. Merging
    into the initial (0, -inf) gives the part exactly (weights 0 and 1)."""
    old_out, old_lse = out[rows], lse[rows]
    top = torch.maximum(old_lse, part_lse)
    top = torch.where(torch.isinf(top), 0.0, top)
    w_old, w_new = torch.exp(old_lse - top), torch.exp(part_lse - top)
    total = w_old + w_new
    out[rows] = (w_old[..., None] * old_out + w_new[..., None] * part_out) / torch.where(total == 0, 1.0, total)[..., None]
    lse[rows] = torch.where(total == 0, float("-inf"), top + torch.log(total))


def _accumulators(q):
    """(out [Lq, Hq, D] zeros, lse [Lq, Hq] -inf) in ``q``'s compute dtype: the merge's starting point."""
    compute = compute_dtype(q.dtype)
    return (torch.zeros(q.shape, dtype=compute, device=q.device),
            torch.full(q.shape[:2], float("-inf"), dtype=compute, device=q.device))


def _decode(q, k_cache, v_cache, rows: dict, scale, out, return_lse):
    """One query per row over its sequence (``_chunk_slots``), DECODE_CHUNK positions at a time from position
    0 with a log-sum-exp merge; only rows that reach a chunk take part (module docstring)."""
    out_c, lse_c = _accumulators(q)
    lengths = rows["prefix_len"] + rows["own_len"]
    for start in range(0, int(lengths.max()) if lengths.numel() else 0, DECODE_CHUNK):
        live = (lengths > start).nonzero().squeeze(1)
        block, offset, valid = _chunk_slots({name: value[live] for name, value in rows.items()}, start,
                                            k_cache.shape[1])
        # invalid slots read slot (0, 0), which may hold anything (NaN-poisoned in tests): their scores are
        # masked, but 0 * NaN is NaN, so their values are zeroed
        v = torch.where(valid[..., None, None], v_cache[block, offset], 0)
        _merge(out_c, lse_c, live, *_attend_rows(q[live], k_cache[block, offset], v, valid, scale))
    return _finish(out_c, lse_c, q, out, return_lse)


def _finish(out_c, lse_c, q, out, return_lse):
    if out is None:
        out = torch.empty_like(q)
    out.copy_(out_c)
    if return_lse:
        return out, lse_c.to(compute_dtype(q.dtype))
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
    if cu_seqlens_q is None:  # decode: every sequence at once
        rows = {"prefix_table": block_table[:, :0], "prefix_len": torch.zeros_like(seq_lens, dtype=torch.long),
                "own_table": block_table, "own_len": seq_lens.long()}
        return _decode(q, k_cache, v_cache, rows, scale, out, return_lse)
    out_c, lse_c = _accumulators(q)
    lens = seq_lens.tolist()
    starts = cu_seqlens_q.tolist()
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
    group = group_of_seq.long()
    rows = {"prefix_table": prefix_block_table[group], "prefix_len": prefix_lens.long()[group],
            "own_table": suffix_block_table, "own_len": suffix_lens.long()}
    return _decode(q, k_cache, v_cache, rows, scale, out, return_lse)


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
