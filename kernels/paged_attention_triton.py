"""Triton kernels of paged attention: the attention kernel, the split merge and the KV append.

Launched by ``paged_attention_launch.py``; semantics and layouts are documented in ``paged_attention.py``.

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
tests/test_kernels_compile_sm90.py): the 16-row decode tile with 4 warps uses 144 registers
and 38 KB of shared memory, no spills, so registers allow 3 programs per SM (65,536 / (144 x 128)),
keeping ~100 KB of loads in flight per SM, above latency x per-SM bandwidth (~1 us x 25 GB/s).
The 128-row cascade/prefill tile uses 8 warps (189-240 registers, 96 KB shared memory, no spills).
fp32 inputs multiply in IEEE fp32 (``triton_utils.dot`` passes input_precision="ieee" rather than
tl.dot's TF32 default, so rollout log-probs match the trainer's fp32 recomputation); fp64 inputs always
use the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from r1fast.kernels.triton_utils import dot

LOG2E = 1.4426950408889634
LOG2E_CONST = tl.constexpr(LOG2E)  # constexpr global: readable inside @triton.jit

# Argument lists are kept grouped by tensor, one line each: fmt off.
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
    """Attention of one query-row tile over one KV split of one (row, KV head); writes out (and lse)."""
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
    """One program per token: all its KV heads go to slot ``slot_mapping[tok]`` of both caches."""
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
