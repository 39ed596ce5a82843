"""Paged attention for rollout: decode (split-KV), varlen prefill, group-shared-prefix decode, KV append.

Public ops
    paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None, max_seqlen_q=1,
                    softmax_scale=None, causal=True, out=None, return_lse=False, num_splits=None)
    paged_attention_cascade(q, k_cache, v_cache, prefix_block_table, prefix_lens, group_of_seq,
                            suffix_block_table, suffix_lens, *, softmax_scale=None, out=None,
                            return_lse=False, max_group_size=None, num_splits=None)
    append_kv(k, v, k_cache, v_cache, slot_mapping)

Layout: caches are [num_blocks, block_size, Hkv, D] with any strides (block_size a power of two,
8..128); block tables are int32 [rows, max_blocks]; lengths are int32, slots int64, any strides (the
launchers make these 1-D vectors contiguous: the kernels index them without a stride). Semantics
(masking, queries aligned to the end of their sequence, out = 0 / lse = -inf for a query that sees no
key) are those of ``ref_paged_attention.py``, which is also the fallback and the test oracle.

Files: ``paged_attention_triton.py`` holds the Triton kernels (and their design and Hopper tuning
notes), ``paged_attention_launch.py`` the launchers, the split-KV heuristic and the op bodies (with
the dispatch rule inside); this file registers the ops and holds the public functions.

Registered ops (``torch.ops.r1fast.*``, opaque to torch.compile, with fakes): ``paged_attention`` and
``paged_attention_cascade`` fill a caller-allocated ``out`` (and ``lse``) and return nothing;
``append_kv`` writes into ``k_cache``/``v_cache``. The public functions check arguments (shapes and
dtypes only), allocate what the caller did not pass, and call the op. The one host sync,
``paged_attention_cascade`` finding the largest group when ``max_group_size`` is not given, stays in
the public function; while torch.compile traces, a CUDA graph is captured or the inputs are meta/fake
tensors (``host_checks_enabled`` False) that read is impossible, so ``max_group_size`` is then required
(ValueError without it).

Not differentiable: these are rollout (inference) ops. With grad mode on, an input that requires grad
is a ValueError naming it, on every backend: the reference path used to return a differentiable
output and the Triton path a silently detached one, so a trainer that worked on CPU would have lost
its attention gradients on GPU without a word. Call them under ``torch.no_grad()`` /
``torch.inference_mode()`` (as the rollout engine does) or pass detached tensors.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from . import ref_paged_attention as ref
from .paged_attention_launch import MAX_SPLITS as MAX_SPLITS
from .paged_attention_launch import MIN_TOKENS_PER_SPLIT as MIN_TOKENS_PER_SPLIT
from .paged_attention_launch import NUM_SMS_HOPPER as NUM_SMS_HOPPER
from .paged_attention_launch import PROGRAMS_PER_SM as PROGRAMS_PER_SM
from .paged_attention_launch import SPLIT_OVERHEAD_TOKENS as SPLIT_OVERHEAD_TOKENS
from .paged_attention_launch import choose_num_splits as choose_num_splits
from .paged_attention_launch import group_sizes, run_append_kv, run_paged_attention, run_paged_attention_cascade
from .paged_attention_launch import num_sms as num_sms
from .paged_attention_values import check_cu_seqlens_values, check_groups_values, check_table_values, values_checkable
from .registration import host_checks_enabled, register_op

# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def _fake_mutation_only(*args, **kwargs) -> None:
    """Fake of an op that only writes into its arguments: no outputs, so nothing to describe."""
    return None


paged_attention_op = register_op(
    "paged_attention", run_paged_attention, fake=_fake_mutation_only, mutates_args=("out", "lse")
)
paged_attention_cascade_op = register_op(
    "paged_attention_cascade", run_paged_attention_cascade, fake=_fake_mutation_only, mutates_args=("out", "lse")
)
append_kv_op = register_op("append_kv", run_append_kv, fake=_fake_mutation_only, mutates_args=("k_cache", "v_cache"))


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def _scale(softmax_scale, head_dim: int) -> float:
    """The softmax scale as a float: 1/sqrt(D) by default, else a positive finite number (ValueError)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    scale = float(softmax_scale)
    if not (0.0 < scale < math.inf):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    return scale


def _splits(value, name: str) -> int | None:
    """A split-count override: None (the heuristic) or an int >= 1 (ValueError otherwise)."""
    if value is None:
        return None
    try:
        splits = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        splits = None
    if splits is None or splits < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return splits


def _refuse_grad(op: str, **tensors) -> None:
    """ValueError naming the first input that requires grad while grad mode is on (see the module docstring)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but {op} is an inference op with no backward on any "
                             f"backend; call it under torch.no_grad() / torch.inference_mode() or pass "
                             f"{name}.detach()")


def _check_max_group_size(max_group_size, group_of_seq, num_groups: int, batch: int) -> None:
    """ValueError unless ``max_group_size`` is an int covering the largest group.

    It sizes the kernel's query-tile grid: one too small left the largest group's later samples unwritten
    (uninitialised memory, errors of 8e19) while the reference ignored it. The count is compared where
    reading it costs no device sync: on CPU tensors with host checks on, for both backends. On CUDA the
    read would sync once per layer, which is the sync the argument exists to avoid, so there it stays the
    caller's promise (as append_kv's slots are).
    """
    try:
        size = operator.index(max_group_size) if not isinstance(max_group_size, bool) else None
    except TypeError:
        size = None
    if size is None or size < (1 if batch else 0):
        raise ValueError(f"max_group_size must be None or an int >= 1, got {max_group_size!r}")
    if batch and group_of_seq.device.type == "cpu" and host_checks_enabled(group_of_seq):
        largest = int(group_sizes(group_of_seq, num_groups).max())
        if size < largest:
            raise ValueError(f"max_group_size={size} is smaller than the largest group ({largest} samples share one "
                             "prefix in group_of_seq); pass at least that, or None to count the groups")


def _outputs(q, out, return_lse):
    """``out`` (allocated when the caller passed none) and ``lse`` (fp32; fp64 for fp64 inputs) or None."""
    if out is None:
        out = torch.empty_like(q)
    lse = None
    if return_lse:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        lse = torch.empty(q.shape[:2], device=q.device, dtype=lse_dtype)
    return out, lse


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
    heuristic (``choose_num_splits``). Values are checked for CPU tensors only (``paged_attention_values``; on
    CUDA it would be a host sync per layer): table entries must index existing blocks, seq_lens[b] must fit
    its table row, cu_seqlens_q must run from 0 to T and chunk b may exceed neither ``max_seqlen_q`` nor
    seq_lens[b]. Raises
    ValueError on bad shapes, dtypes, head dims, block sizes, head counts, ``num_splits`` < 1, a ``causal``
    that is not a bool or a ``softmax_scale`` that is not a positive finite number, or when grad mode is on and q, a cache or ``out`` requires grad (not
    differentiable, see the module docstring). fp64 inputs take the reference and get an fp64 lse.
    """
    _refuse_grad("paged_attention", q=q, k_cache=k_cache, v_cache=v_cache, out=out)
    if not isinstance(causal, bool):
        # the flag reaches the kernel as a constexpr and the reference as ``if causal``: None ran a prefill
        # chunk non-causally on both paths (every query saw the later keys), a string failed in the op schema
        raise ValueError(f"causal must be True or False, got {causal!r}")
    ref.check_paged_attention_args(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, max_seqlen_q, out)
    if cu_seqlens_q is not None:
        max_seqlen_q = int(max_seqlen_q)  # the op's schema takes a Python int
    if values_checkable(q):
        check_table_values("block_table", block_table, "seq_lens", seq_lens, k_cache)
        if cu_seqlens_q is not None:
            check_cu_seqlens_values(cu_seqlens_q, q.shape[0], max_seqlen_q, seq_lens)
    scale = _scale(softmax_scale, q.shape[2])
    num_splits = _splits(num_splits, "num_splits")
    out, lse = _outputs(q, out, return_lse)
    paged_attention_op(
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out, lse, max_seqlen_q, scale, causal, num_splits
    )
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
    one host sync this function otherwise makes; with it the call is CUDA-graph capturable and traceable
    by torch.compile, and without it those raise ValueError (the sync cannot run there). A value below the
    largest group is a ValueError where counting costs no sync (CPU tensors, both backends); on CUDA it is
    not checked (it would sync once per layer) and must hold.
    ``num_splits`` = (prefix splits, suffix splits) overrides the heuristic.
    Returns out [B, Hq, D] (and lse [B, Hq] fp32). Not differentiable: ValueError when grad mode is on
    and q, a cache or ``out`` requires grad.
    """
    _refuse_grad("paged_attention_cascade", q=q, k_cache=k_cache, v_cache=v_cache, out=out)
    ref.check_cascade_args(
        q, k_cache, v_cache, prefix_block_table, prefix_lens, group_of_seq, suffix_block_table, suffix_lens, out
    )
    if values_checkable(q):
        check_table_values("prefix_block_table", prefix_block_table, "prefix_lens", prefix_lens, k_cache)
        check_table_values("suffix_block_table", suffix_block_table, "suffix_lens", suffix_lens, k_cache)
        check_groups_values(group_of_seq, prefix_block_table.shape[0])
    if max_group_size is None:
        if not host_checks_enabled(q):
            raise ValueError(
                "paged_attention_cascade: max_group_size is required under torch.compile, CUDA graph capture and "
                "for meta/fake tensors (finding the largest group reads group_of_seq's counts back to the host)"
            )
        max_group_size = int(group_sizes(group_of_seq, prefix_block_table.shape[0]).max()) if q.shape[0] else 1
    else:
        _check_max_group_size(max_group_size, group_of_seq, prefix_block_table.shape[0], q.shape[0])
    scale = _scale(softmax_scale, q.shape[2])
    if num_splits is None:
        num_splits = (None, None)
    elif not isinstance(num_splits, (tuple, list)) or len(num_splits) != 2:
        raise ValueError(f"num_splits must be None or a pair (prefix splits, suffix splits), got {num_splits!r}")
    prefix_splits, suffix_splits = (_splits(x, f"num_splits[{i}]") for i, x in enumerate(num_splits))
    out, lse = _outputs(q, out, return_lse)
    paged_attention_cascade_op(
        q,
        k_cache,
        v_cache,
        prefix_block_table,
        prefix_lens,
        group_of_seq,
        suffix_block_table,
        suffix_lens,
        out,
        lse,
        scale,
        max(1, max_group_size),
        prefix_splits,
        suffix_splits,
    )
    return (out, lse) if return_lse else out


def append_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [T, Hkv, D] into the caches at ``slot_mapping`` (int64 [T], block * block_size + offset).

    A negative slot skips that token (padding, as in vLLM). Slots beyond the cache raise ValueError when
    ``slot_mapping`` is on the CPU (reference and Triton interpreter); on CUDA they are not checked (that would
    need a host sync per layer). Two tokens with the same slot leave an unspecified mix of their k and v there
    (the writes race; not checked, as vLLM does not check its slot mapping). The cache's block_size
    must be one ``paged_attention`` reads (a power of two, 8..128; ValueError otherwise). Returns None.
    Not differentiable: ValueError when grad mode is on and k, v or a cache requires grad.
    """
    _refuse_grad("append_kv", k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    ref.check_append_kv_args(k, v, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    if block_size < 8 or block_size > 128 or block_size & (block_size - 1):
        # the layout paged_attention accepts: a cache it cannot read is a bug at the writer
        raise ValueError(f"k_cache block_size={block_size} must be a power of two from 8 to 128")
    append_kv_op(k, v, k_cache, v_cache, slot_mapping)
