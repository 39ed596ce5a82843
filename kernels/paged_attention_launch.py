"""Launchers of the paged-attention kernels, the split-KV heuristic, and the op implementations.

``run_paged_attention``, ``run_paged_attention_cascade`` and ``run_append_kv`` are the bodies of the
``torch.ops.r1fast.*`` ops that ``paged_attention.py`` registers. Each keeps the dispatch rule inside
(Triton kernel, Triton interpreter, or the PyTorch reference in ``ref_paged_attention.py``), writes
into caller-allocated tensors and returns None. They never read device values on the host on the
kernel path, so a CUDA graph can capture them; their allocations (split partials, the cascade's query
order, contiguous copies of strided length / slot vectors, which the kernels read without a stride)
come from the caching allocator, i.e. from the graph's pool while capturing. Arguments are assumed
checked by the public functions.

Splits (``choose_num_splits``): a wave model, cost = waves x (tokens per split + a fixed overhead),
with 3 x 132 = 396 resident slots: B = 64, L = 8192 -> 3 splits (768 programs, 1.94 waves);
B = 256, L = 4096 -> 3; B = 16, L = 32768 -> 6 (384 programs, one wave). A split keeps >= 512 tokens.
"""

from __future__ import annotations

import functools

import torch

from r1fast.kernels.dispatch import use_triton

from . import ref_paged_attention as ref
from .launch_math import cdiv, next_power_of_2

NUM_SMS_HOPPER = 132  # used when the device is not CUDA (interpreter runs, tests)
PROGRAMS_PER_SM = 3  # resident decode programs per SM: 144 registers x 128 threads each (sm_90a compile)
SPLIT_OVERHEAD_TOKENS = 128  # prologue + partial write/merge of one program, in KV-token equivalents
MIN_TOKENS_PER_SPLIT = 512
MAX_SPLITS = 64


# ---------------------------------------------------------------------------------------------
# tiling and the split-KV heuristic (shapes only: no host sync)
# ---------------------------------------------------------------------------------------------


def _tile_sizes(head_dim: int, group: int, rows_per_program: int, dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_M, BLOCK_N, num_warps): rows padded to a power of two >= 16 (tl.dot's minimum).

    fp32 (the default model dtype, and the tiny recipe's) gets its own smaller tiles: IEEE fp32 dots run
    on FMAs with fp32 operands in registers, and the 16-bit tiles spilled on sm_90a (D=128, 32 rows: 2.7 KB
    per thread; D=64, 64 rows: 3.6 KB; D=256 even at 16 rows). Every fp32 tile below compiles without a
    spill under Triton 3.6 and 3.9 (tests/test_kernels_compile_sm90.py). D=128 decode takes (16, 32, 8):
    (16, 64, 4) spilled 1.4 KB per thread under Triton 3.6 (the GPU machine's) at GROUP 2 and 4."""
    block_m = max(16, next_power_of_2(rows_per_program))
    if dtype == torch.float32:
        block_m = min(block_m, 32)
        if block_m == 16:
            return (16, 64, 4) if head_dim <= 64 else (16, 32, 8)
        return (32, 64, 8) if head_dim <= 128 else (32, 16, 8)
    block_m = min(block_m, 128 if head_dim <= 128 else 64)
    block_n = 64 if head_dim <= 128 else 32
    num_warps = 4 if block_m <= 64 else 8
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=8)
def num_sms(device) -> int:
    """Streaming multiprocessors of ``device``; Hopper's 132 for non-CUDA devices."""
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
    cap = max(1, min(MAX_SPLITS, cdiv(max_kv_tokens, MIN_TOKENS_PER_SPLIT)))
    best, best_cost = 1, None
    for splits in range(1, cap + 1):
        tokens = cdiv(cdiv(max_kv_tokens, splits), block_n) * block_n
        cost = cdiv(programs * splits, slots) * (tokens + SPLIT_OVERHEAD_TOKENS)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


def group_sizes(group_of_seq: torch.Tensor, num_groups: int) -> torch.Tensor:
    """int64 [num_groups]: samples per group, on the device (no host sync).

    scatter_add rather than bincount: CUDA bincount syncs with the host, which breaks graph capture.
    """
    group_of_seq = group_of_seq.long()
    counts = torch.zeros(num_groups, dtype=torch.int64, device=group_of_seq.device)
    return counts.scatter_add_(0, group_of_seq, torch.ones_like(group_of_seq))


def uses_kernel(q: torch.Tensor) -> bool:
    """The dispatch rule for these ops: Triton (compiled or interpreted) for kernel dtypes, else reference."""
    return q.dtype in ref.KERNEL_DTYPES and use_triton(q.device)


# ---------------------------------------------------------------------------------------------
# kernel launchers
# ---------------------------------------------------------------------------------------------


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
    from .paged_attention_triton import LOG2E, _paged_attention_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    num_rows = block_table.shape[0]
    num_kv_heads, page_size, head_dim = k_cache.shape[2], k_cache.shape[1], q.shape[2]
    group = q.shape[1] // num_kv_heads
    block_m, block_n, num_warps = _tile_sizes(head_dim, group, max_q_per_row * group, q.dtype)
    max_kv_tokens = block_table.shape[1] * page_size
    tokens_per_split = cdiv(cdiv(max_kv_tokens, num_splits), block_n) * block_n
    partial = dest.dim() == 4
    so = dest.stride(2) if partial else 0
    od = dest.stride(3) if partial else dest.stride(2)
    if dest_lse is not None:
        lt, lh = dest_lse.stride(0), dest_lse.stride(1)
        ls = dest_lse.stride(2) if partial else 0
    else:
        lt = lh = ls = 0
    grid = (num_rows * num_kv_heads, cdiv(max_q_per_row * group, block_m), num_splits)
    # The kernel reads the 1-D int vectors as ptr + row (no stride argument); a strided view such as
    # meta[:, 0] would silently give wrong lengths. Copying B + 1 ints costs nothing next to the KV reads.
    seq_lens = seq_lens.contiguous()
    if cu_seqlens_q is not None:
        cu_seqlens_q = cu_seqlens_q.contiguous()
    if q_index is not None:
        q_index = q_index.contiguous()
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
    from .paged_attention_triton import _merge_splits_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

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
        SPLITS_P2=max(2, next_power_of_2(num_splits)),
        STORE_LSE=lse is not None,
        num_warps=4,
    )


def _partials(q, num_splits):
    tokens, num_heads, head_dim = q.shape
    part_out = torch.empty(tokens, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(tokens, num_heads, num_splits, device=q.device, dtype=torch.float32)
    return part_out, part_lse


# ---------------------------------------------------------------------------------------------
# op implementations (registered as torch.ops.r1fast.* in paged_attention.py)
# ---------------------------------------------------------------------------------------------


def run_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    max_seqlen_q: int,
    scale: float,
    causal: bool,
    num_splits: int | None,
) -> None:
    """Decode (``cu_seqlens_q`` None) or varlen attention into ``out`` (and ``lse`` when given)."""
    if not uses_kernel(q):
        _, ref_lse = ref.paged_attention(
            q,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q,
            softmax_scale=scale,
            causal=causal,
            out=out,
            return_lse=True,
        )
        if lse is not None:
            lse.copy_(ref_lse)
        return
    if q.shape[0] == 0:
        return
    if num_splits is None:
        # Prefill chunks already give many programs; split only decode.
        num_splits = (
            1
            if cu_seqlens_q is not None
            else choose_num_splits(
                block_table.shape[0] * k_cache.shape[2], block_table.shape[1] * k_cache.shape[1], num_sms(q.device)
            )
        )
    common = dict(
        cu_seqlens_q=cu_seqlens_q,
        q_index=None,
        max_q_per_row=1 if cu_seqlens_q is None else max_seqlen_q,
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


def run_paged_attention_cascade(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    group_of_seq: torch.Tensor,
    suffix_block_table: torch.Tensor,
    suffix_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    scale: float,
    max_group_size: int,
    prefix_splits: int | None,
    suffix_splits: int | None,
) -> None:
    """Shared-prefix decode into ``out`` (and ``lse``); ``max_group_size`` (>= 1) sizes the prefix grid."""
    if not uses_kernel(q):
        _, ref_lse = ref.paged_attention_cascade(
            q,
            k_cache,
            v_cache,
            prefix_block_table,
            prefix_lens,
            group_of_seq,
            suffix_block_table,
            suffix_lens,
            softmax_scale=scale,
            out=out,
            return_lse=True,
        )
        if lse is not None:
            lse.copy_(ref_lse)
        return
    batch, num_groups = q.shape[0], prefix_block_table.shape[0]
    if batch == 0:
        return
    # Samples of a group become one contiguous query list: q_index[cu_group[g] : cu_group[g+1]].
    q_index = torch.argsort(group_of_seq.long(), stable=True).to(torch.int32)
    cu_group = torch.zeros(num_groups + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(group_sizes(group_of_seq, num_groups), 0, out=cu_group[1:])
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    sms = num_sms(q.device)
    if prefix_splits is None:
        prefix_splits = choose_num_splits(num_groups * num_kv_heads, prefix_block_table.shape[1] * page_size, sms)
    if suffix_splits is None:
        suffix_splits = choose_num_splits(batch * num_kv_heads, suffix_block_table.shape[1] * page_size, sms)
    part_out, part_lse = _partials(q, prefix_splits + suffix_splits)
    common = dict(scale=scale, causal=False)
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
        max_q_per_row=max(1, max_group_size),
        num_splits=prefix_splits,
        split_offset=0,
        **common,
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
        **common,
    )
    _launch_merge(part_out, part_lse, out, lse)


def run_append_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, Hkv, D] into the caches at ``slot_mapping``; negative slots are skipped."""
    if not uses_kernel(k):
        ref.append_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    if k.shape[0] == 0:
        return
    if slot_mapping.device.type == "cpu":
        # Triton's interpreter writes out of bounds ("corrupted size vs. prev_size" heap aborts). On the CPU
        # this check is free; on CUDA it would be a host sync per layer, so device slots stay unchecked.
        ref.check_slot_range(slot_mapping, k_cache)
    from .paged_attention_triton import _append_kv_kernel  # noqa: PLC0415  (needs Triton: dispatch.py)

    num_kv_heads = k.shape[1]
    _append_kv_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),  # read as ptr + token (no stride): a strided view would pick wrong slots
        num_kv_heads,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        PAGE_SIZE=k_cache.shape[1],
        HEAD_DIM=k.shape[2],
        BLOCK_H=next_power_of_2(num_kv_heads),
        num_warps=4,
    )
