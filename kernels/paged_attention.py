"""Paged attention for rollout: decode (split-KV), varlen prefill, group-shared-prefix decode, KV append.

Public ops
    paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None, max_seqlen_q=1,
                    softmax_scale=None, causal=True, out=None, return_lse=False, num_splits=None)
    paged_attention_cascade(q, k_cache, v_cache, prefix_block_table, prefix_lens, group_of_seq,
                            suffix_block_table, suffix_lens, *, softmax_scale=None, out=None,
                            return_lse=False, max_group_size=None, num_splits=None)
    append_kv(k, v, k_cache, v_cache, slot_mapping)

Layout: caches are [num_blocks, block_size, Hkv, D] with any strides (block_size a power of two,
8..128); block tables are int32 [rows, max_blocks]; lengths are int32. Semantics (masking, queries
aligned to the end of their sequence, out = 0 / lse = -inf for a query that sees no key) are those
of ``ref_paged_attention.py``, which is also the fallback and the test oracle.

One kernel does all three attention forms. A program owns one (sequence, KV head, query-row tile,
KV split). Its query tile stacks rows ``r -> (query token r // GROUP, query head kv_head * GROUP +
r % GROUP)``: all Hq/Hkv query heads that read one KV head share each loaded K/V tile (GQA packing),
and a prefill chunk's tokens stack below them. The tile is padded to >= 16 rows with masking (tl.dot's
minimum, also under the interpreter). K/V are gathered token by token through the block table, so a
tile of BLOCK_N tokens spans BLOCK_N / block_size pages and BLOCK_N does not depend on block_size.
- decode: one query per sequence; the KV range is cut into ``num_splits`` pieces so that B * Hkv
  programs become enough to fill 132 SMs; every split writes a normalised fp32 partial (out, lse)
  and a second small kernel merges them by log-sum-exp.
- cascade (GRPO: G samples share a prompt's blocks): pass 1 runs the same kernel over each group's
  shared prefix with the queries of all the group's samples stacked in the tile (G * Hq/Hkv rows,
  e.g. 16 * 7 = 112 -> one 128-row tile), so each prefix block is read once per group, not once per
  sample; pass 2 is plain split decode over each sample's own blocks; the merge kernel combines both
  passes' partials (they are simply different splits of one partial buffer).
Address math is int64 (pages * stride overflow int32 on an 80 GB cache).

Hopper tuning (by reasoning; no GPU was available when this was written, see bench/cases):
decode is bandwidth bound, so the goal is enough bytes in flight on every SM for the whole call.
BLOCK_N = 64 tokens (D <= 128; 32 for D = 256) is a 16 KB K tile at bf16/D = 128, loaded with
cp.async in a 2-stage pipeline. Compiled for sm_90a (bf16, D = 128, Hq/Hkv = 7; checked on CPU by
tests/test_paged_attention.py's compile test): the 16-row decode tile with 4 warps uses 144 registers
and 38 KB of shared memory, no spills, so registers allow 3 programs per SM (65,536 / (144 x 128)),
keeping ~100 KB of loads in flight per SM, above latency x per-SM bandwidth (~1 us x 25 GB/s).
The 128-row cascade/prefill tile uses 8 warps (189-240 registers, 96 KB shared memory, no spills).
Splits (``choose_num_splits``): a wave model, cost = waves x (tokens per split + a fixed overhead),
with 3 x 132 = 396 resident slots: B = 64, L = 8192 -> 3 splits (768 programs, 1.94 waves);
B = 256, L = 4096 -> 3; B = 16, L = 32768 -> 6 (384 programs, one wave). A split keeps >= 512 tokens.
fp32 inputs on a GPU go through tl.dot's default TF32 (``triton_utils.dot`` takes no precision
argument); fp64 inputs always use the reference.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from r1fast.kernels.dispatch import use_triton
from r1fast.kernels.triton_utils import dot

from . import ref_paged_attention as ref

LOG2E = 1.4426950408889634
NUM_SMS_HOPPER = 132  # used when the device is not CUDA (interpreter runs, tests)
PROGRAMS_PER_SM = 3  # resident decode programs per SM: 144 registers x 128 threads each (sm_90a compile)
SPLIT_OVERHEAD_TOKENS = 128  # prologue + partial write/merge of one program, in KV-token equivalents
MIN_TOKENS_PER_SPLIT = 512
MAX_SPLITS = 64
LOG2E_CONST = tl.constexpr(LOG2E)  # constexpr global: readable inside @triton.jit


# ---------------------------------------------------------------------------------------------
# Triton kernels (argument lists kept grouped by tensor, one line each: fmt off)
# ---------------------------------------------------------------------------------------------
# fmt: off


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, cu_seqlens_q_ptr, q_index_ptr,
    out_ptr, lse_ptr,
    num_kv_heads, tokens_per_split, split_offset, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt_row, stride_bt_col,
    stride_ot, stride_oh, stride_os, stride_od,
    stride_lt, stride_lh, stride_ls,
    GROUP: tl.constexpr,        # query heads per KV head (Hq / Hkv)
    PAGE_SIZE: tl.constexpr,    # cache block_size
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,      # query rows per program (tokens x GROUP heads), >= 16
    BLOCK_N: tl.constexpr,      # KV tokens per inner iteration, >= 16
    VARLEN: tl.constexpr,       # queries per row given by cu_seqlens_q (else one query, token = row)
    INDIRECT_Q: tl.constexpr,   # query token = q_index[cu_seqlens_q[row] + j] (cascade prefix pass)
    CAUSAL: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    pid_row_head = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_split = tl.program_id(2)
    row = pid_row_head // num_kv_heads  # a sequence, or a group in the cascade prefix pass
    kv_head = pid_row_head % num_kv_heads

    if VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + row)
        q_len = tl.load(cu_seqlens_q_ptr + row + 1) - q_start
    else:
        q_start = row
        q_len = 1
    if pid_m * BLOCK_M >= q_len * GROUP:
        return  # the grid is sized for the longest chunk; this row has no queries here
    seq_len = tl.load(seq_lens_ptr + row)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok_local = offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = tok_local < q_len
    if INDIRECT_Q:
        tok = tl.load(q_index_ptr + q_start + tok_local, mask=row_valid, other=0).to(tl.int64)
    else:
        tok = (q_start + tok_local).to(tl.int64)
    q_offs = tok[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)

    # KV range of this split; causal rows also stop at the last query position of the tile.
    kv_start = pid_split * tokens_per_split
    kv_end = tl.minimum(kv_start + tokens_per_split, seq_len)
    q_pos = seq_len - q_len + tok_local  # queries sit at the end of their sequence
    if CAUSAL:
        last_tok = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        kv_end = tl.minimum(kv_end, seq_len - q_len + last_tok + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_row = block_table_ptr + row.to(tl.int64) * stride_bt_row
    k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_end
        page = tl.load(table_row + (offs_n // PAGE_SIZE) * stride_bt_col, mask=n_valid, other=0).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        k = tl.load(k_head + (page * stride_kb + slot * stride_ks)[:, None] + offs_d[None, :] * stride_kd,
                    mask=n_valid[:, None], other=0.0)
        scores = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)) * qk_scale
        visible = n_valid[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid -inf - -inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + (page * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :] * stride_vd,
                    mask=n_valid[:, None], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    split = (split_offset + pid_split).to(tl.int64)
    o_offs = tok[:, None] * stride_ot + head[:, None].to(tl.int64) * stride_oh + split * stride_os + offs_d[None, :] * stride_od
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    if STORE_LSE:
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E_CONST, float("-inf"))
        l_offs = tok * stride_lt + head.to(tl.int64) * stride_lh + split * stride_ls
        tl.store(lse_ptr + l_offs, lse, mask=row_valid)



@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
    num_heads, num_splits,
    stride_pt, stride_ph, stride_ps, stride_pd,
    stride_plt, stride_plh, stride_pls,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """out[t, h] = sum_s w_s * out_s / sum_s w_s with w_s = exp(lse_s - max lse); lse = log sum exp."""
    pid = tl.program_id(0)
    tok = (pid // num_heads).to(tl.int64)
    head = (pid % num_heads).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < num_splits
    lse = tl.load(part_lse_ptr + tok * stride_plt + head * stride_plh + offs_s * stride_pls, mask=s_valid,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # exactly 0 for empty splits
    denom = tl.sum(w, 0)
    parts = tl.load(part_out_ptr + tok * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
                    + offs_d[None, :] * stride_pd, mask=s_valid[:, None], other=0.0)
    merged = tl.sum(parts * w[:, None], 0)
    merged = tl.where(denom > 0.0, merged / tl.where(denom > 0.0, denom, 1.0), 0.0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d * stride_od, merged.to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        lse_out = tl.where(denom > 0.0, m_safe + tl.log(tl.where(denom > 0.0, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + tok * stride_lt + head * stride_lh, lse_out)


@triton.jit
def _append_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_kv_heads,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok)
    if slot < 0:
        return  # padding token (vLLM's convention)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_kv_heads)[:, None]
    hd_k = offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd
    hd_v = offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd
    k = tl.load(k_ptr + tok * stride_kt + hd_k, mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + hd_v, mask=mask)
    kc = page * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd
    vc = page * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd
    tl.store(k_cache_ptr + kc, k, mask=mask)
    tl.store(v_cache_ptr + vc, v, mask=mask)


# fmt: on
# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _tile_sizes(head_dim: int, group: int, rows_per_program: int):
    """(BLOCK_M, BLOCK_N, num_warps): rows padded to a power of two >= 16 (tl.dot's minimum)."""
    block_m = max(16, triton.next_power_of_2(rows_per_program))
    block_m = min(block_m, 128 if head_dim <= 128 else 64)
    block_n = 64 if head_dim <= 128 else 32
    num_warps = 4 if block_m <= 64 else 8
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=8)
def num_sms(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_HOPPER


def choose_num_splits(programs: int, max_kv_tokens: int, sms: int = NUM_SMS_HOPPER, block_n: int = 64) -> int:
    """KV splits per (row, KV head) for ``programs`` = rows * Hkv programs (shapes only: no host sync).

    A wave model of a bandwidth-bound kernel: with ``slots`` = PROGRAMS_PER_SM * sms programs resident at
    once, a call takes about waves(splits) * (tokens per split + SPLIT_OVERHEAD_TOKENS), the overhead
    standing for the program prologue and the fp32 partial written and merged. The cheapest split count
    wins (smallest on ties); a split keeps at least MIN_TOKENS_PER_SPLIT tokens.
    """
    slots = PROGRAMS_PER_SM * sms
    programs = max(programs, 1)
    cap = max(1, min(MAX_SPLITS, triton.cdiv(max_kv_tokens, MIN_TOKENS_PER_SPLIT)))
    best, best_cost = 1, None
    for splits in range(1, cap + 1):
        tokens = triton.cdiv(triton.cdiv(max_kv_tokens, splits), block_n) * block_n
        cost = triton.cdiv(programs * splits, slots) * (tokens + SPLIT_OVERHEAD_TOKENS)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def _launch_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    dest,
    dest_lse,
    *,
    cu_seqlens_q,
    q_index,
    max_q_per_row,
    num_splits,
    split_offset,
    scale,
    causal,
):
    """Run the attention kernel for every block_table row; ``dest`` is [T, Hq, D] (final) or
    [T, Hq, S, D] (partials, then this pass writes splits split_offset .. split_offset + num_splits)."""
    num_rows = block_table.shape[0]
    num_kv_heads, page_size, head_dim = k_cache.shape[2], k_cache.shape[1], q.shape[2]
    group = q.shape[1] // num_kv_heads
    block_m, block_n, num_warps = _tile_sizes(head_dim, group, max_q_per_row * group)
    max_kv_tokens = block_table.shape[1] * page_size
    tokens_per_split = triton.cdiv(triton.cdiv(max_kv_tokens, num_splits), block_n) * block_n
    partial = dest.dim() == 4
    so = dest.stride(2) if partial else 0
    od = dest.stride(3) if partial else dest.stride(2)
    if dest_lse is not None:
        lt, lh = dest_lse.stride(0), dest_lse.stride(1)
        ls = dest_lse.stride(2) if partial else 0
    else:
        lt = lh = ls = 0
    grid = (num_rows * num_kv_heads, triton.cdiv(max_q_per_row * group, block_m), num_splits)
    placeholder = seq_lens  # for pointer arguments a constexpr flag disables
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        cu_seqlens_q if cu_seqlens_q is not None else placeholder,
        q_index if q_index is not None else placeholder,
        dest,
        dest_lse if dest_lse is not None else dest,
        num_kv_heads,
        tokens_per_split,
        split_offset,
        scale * LOG2E,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_table.stride(),
        dest.stride(0),
        dest.stride(1),
        so,
        od,
        lt,
        lh,
        ls,
        GROUP=group,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        VARLEN=cu_seqlens_q is not None,
        INDIRECT_Q=q_index is not None,
        CAUSAL=causal,
        STORE_LSE=dest_lse is not None,
        num_warps=num_warps,
        num_stages=2,
    )


def _launch_merge(part_out, part_lse, out, lse):
    tokens, num_heads, num_splits, head_dim = part_out.shape
    _merge_splits_kernel[(tokens * num_heads,)](
        part_out,
        part_lse,
        out,
        lse if lse is not None else part_lse,
        num_heads,
        num_splits,
        *part_out.stride(),
        *part_lse.stride(),
        *out.stride(),
        *(lse.stride() if lse is not None else (0, 0)),
        HEAD_DIM=head_dim,
        SPLITS_P2=max(2, triton.next_power_of_2(num_splits)),
        STORE_LSE=lse is not None,
        num_warps=4,
    )


def _partials(q, num_splits):
    tokens, num_heads, head_dim = q.shape
    part_out = torch.empty(tokens, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(tokens, num_heads, num_splits, device=q.device, dtype=torch.float32)
    return part_out, part_lse


def _uses_kernel(q) -> bool:
    return q.dtype in ref.KERNEL_DTYPES and use_triton(q.device)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


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
    """Attention of q [T, Hq, D] over a paged KV cache; returns out [T, Hq, D] (and lse [T, Hq] fp32).

    Decode (``cu_seqlens_q=None``): T = B, one query per sequence, at position seq_lens[b] - 1.
    Varlen/prefill: queries ``cu_seqlens_q[b] .. cu_seqlens_q[b+1]`` belong to sequence b and sit at its
    last positions; ``max_seqlen_q`` (a host int, so there is no sync) is the longest chunk.
    ``causal=False`` lets every query see all ``seq_lens[b]`` keys. ``num_splits`` overrides the split-KV
    heuristic (``choose_num_splits``). Values are not checked on the device (no host sync): table entries
    must index existing blocks and seq_lens[b] must fit its table row. Raises ValueError on bad shapes,
    dtypes, head dims, block sizes or head counts.
    """
    ref.check_paged_attention_args(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, out)
    if not _uses_kernel(q):
        return ref.paged_attention(
            q,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q,
            softmax_scale=softmax_scale,
            causal=causal,
            out=out,
            return_lse=return_lse,
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32) if return_lse else None
    if q.shape[0] == 0:
        return (out, lse) if return_lse else out
    num_kv_heads = k_cache.shape[2]
    max_q = 1 if cu_seqlens_q is None else max_seqlen_q
    if num_splits is None:
        # Prefill chunks already give many programs; split only decode.
        num_splits = (
            1
            if cu_seqlens_q is not None
            else choose_num_splits(
                block_table.shape[0] * num_kv_heads, block_table.shape[1] * k_cache.shape[1], num_sms(q.device)
            )
        )
    common = dict(
        cu_seqlens_q=cu_seqlens_q,
        q_index=None,
        max_q_per_row=max_q,
        num_splits=num_splits,
        split_offset=0,
        scale=scale,
        causal=causal,
    )
    if num_splits == 1:
        _launch_attention(q, k_cache, v_cache, block_table, seq_lens, out, lse, **common)
    else:
        part_out, part_lse = _partials(q, num_splits)
        _launch_attention(q, k_cache, v_cache, block_table, seq_lens, part_out, part_lse, **common)
        _launch_merge(part_out, part_lse, out, lse)
    return (out, lse) if return_lse else out


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
    """Decode attention where groups of sequences share a prefix (GRPO: G samples of one prompt).

    q [B, Hq, D]: one decode query per sequence. Query b attends to the ``prefix_lens[g]`` tokens held in
    ``prefix_block_table[g]`` (int32 [num_groups, P]) with g = ``group_of_seq[b]`` (int32/int64 [B]),
    followed by its own ``suffix_lens[b]`` tokens in ``suffix_block_table[b]`` (int32 [B, S]). The prefix
    need not end on a block boundary: samples write their tokens into blocks of their own. Each shared
    prefix block is read once per (group, KV head) for all the group's samples together.
    ``max_group_size`` (host int, at least the largest group's sample count: it sizes the grid) avoids the
    one host sync this function otherwise makes; with it the call is CUDA-graph capturable.
    ``num_splits`` = (prefix splits, suffix splits) overrides the heuristic.
    Returns out [B, Hq, D] (and lse [B, Hq] fp32).
    """
    ref.check_cascade_args(
        q, k_cache, v_cache, prefix_block_table, prefix_lens, group_of_seq, suffix_block_table, suffix_lens, out
    )
    if not _uses_kernel(q):
        return ref.paged_attention_cascade(
            q,
            k_cache,
            v_cache,
            prefix_block_table,
            prefix_lens,
            group_of_seq,
            suffix_block_table,
            suffix_lens,
            softmax_scale=softmax_scale,
            out=out,
            return_lse=return_lse,
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32) if return_lse else None
    batch, num_groups = q.shape[0], prefix_block_table.shape[0]
    if batch == 0:
        return (out, lse) if return_lse else out
    # Samples of a group become one contiguous query list: q_index[cu_group[g] : cu_group[g+1]].
    group_of_seq = group_of_seq.long()
    q_index = torch.argsort(group_of_seq, stable=True).to(torch.int32)
    # scatter_add rather than bincount: CUDA bincount syncs with the host, which breaks graph capture.
    counts = torch.zeros(num_groups, dtype=torch.int64, device=q.device)
    counts.scatter_add_(0, group_of_seq, torch.ones_like(group_of_seq))
    cu_group = torch.zeros(num_groups + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(counts, 0, out=cu_group[1:])
    if max_group_size is None:
        max_group_size = int(counts.max())
    max_group_size = max(1, max_group_size)
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    if num_splits is None:
        sms = num_sms(q.device)
        prefix_splits = choose_num_splits(num_groups * num_kv_heads, prefix_block_table.shape[1] * page_size, sms)
        suffix_splits = choose_num_splits(batch * num_kv_heads, suffix_block_table.shape[1] * page_size, sms)
    else:
        prefix_splits, suffix_splits = num_splits
    part_out, part_lse = _partials(q, prefix_splits + suffix_splits)
    _launch_attention(
        q,
        k_cache,
        v_cache,
        prefix_block_table,
        prefix_lens,
        part_out,
        part_lse,
        cu_seqlens_q=cu_group,
        q_index=q_index,
        max_q_per_row=max_group_size,
        num_splits=prefix_splits,
        split_offset=0,
        scale=scale,
        causal=False,
    )
    _launch_attention(
        q,
        k_cache,
        v_cache,
        suffix_block_table,
        suffix_lens,
        part_out,
        part_lse,
        cu_seqlens_q=None,
        q_index=None,
        max_q_per_row=1,
        num_splits=suffix_splits,
        split_offset=prefix_splits,
        scale=scale,
        causal=False,
    )
    _launch_merge(part_out, part_lse, out, lse)
    return (out, lse) if return_lse else out


def append_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [T, Hkv, D] into the caches at ``slot_mapping`` (int64 [T], block * block_size + offset).

    A negative slot skips that token (padding, as in vLLM). Slots beyond the cache are not checked on the
    device (that would need a host sync); the reference raises ValueError for them. Returns None.
    """
    ref.check_append_kv_args(k, v, k_cache, v_cache, slot_mapping)
    if not _uses_kernel(k):
        ref.append_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    if k.shape[0] == 0:
        return
    num_kv_heads = k.shape[1]
    _append_kv_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        num_kv_heads,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        PAGE_SIZE=k_cache.shape[1],
        HEAD_DIM=k.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
