"""The paged-attention ops as ``torch.ops.r1fast.*``: opcheck, torch.compile and the host-sync rule.

``opcheck`` runs each registered op on tiny shapes (a few blocks, head_dim 16/32, GQA) through the
Triton interpreter, plus once on the reference path (fp64). Compiling the public functions with
``backend="aot_eager", fullgraph=True`` must give bitwise the eager results: the op is opaque, so the
same kernel runs on the same inputs. The GPU test captures the ops in a CUDA graph.
"""

import importlib

import pytest
import torch

from r1fast.kernels.paged_attention import append_kv, paged_attention, paged_attention_cascade
from r1fast.kernels.registration import registered_ops

pa = importlib.import_module("r1fast.kernels.paged_attention")  # the package attribute is the op, not the module


def _cache(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def _table(rows, width, num_blocks, device="cpu"):
    """int32 [rows, width] of distinct blocks in random order."""
    return torch.randperm(num_blocks, device=device)[: rows * width].reshape(rows, width).to(torch.int32)


def _lens(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def test_ops_are_registered():
    ops = registered_ops()
    for name in ("paged_attention", "paged_attention_cascade", "append_kv"):
        assert ops[name] is getattr(torch.ops.r1fast, name)
    assert pa.paged_attention_op is torch.ops.r1fast.paged_attention


# ---------------------------------------------------------------------------------------------
# opcheck (schema, fake, autograd registration, aot dispatch) on tiny shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_dim,num_heads,num_kv_heads,dtype,num_splits",
    [(16, 6, 2, torch.float32, 2), (32, 4, 1, torch.float32, None), (64, 4, 2, torch.float64, None)],
)
def test_opcheck_paged_attention_decode(head_dim, num_heads, num_kv_heads, dtype, num_splits):
    # fp64 takes the reference path inside the op (which supports D >= 64 only); num_splits=2 runs the merge kernel
    k_cache, v_cache = _cache(6, 8, num_kv_heads, head_dim, dtype)
    table, seq_lens = _table(3, 2, 6), _lens([5, 16, 9])
    q = torch.randn(3, num_heads, head_dim, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((3, num_heads), float("nan"), dtype=dtype if dtype == torch.float64 else torch.float32)
    args = (q, k_cache, v_cache, table, seq_lens, None, out, lse, 1, 0.25, True, num_splits)
    torch.library.opcheck(torch.ops.r1fast.paged_attention, args)


def test_opcheck_paged_attention_varlen():
    k_cache, v_cache = _cache(8, 8, 2, 32)
    table, seq_lens = _table(3, 2, 8), _lens([12, 16, 3])
    cu = _lens([0, 5, 6, 9])  # a 5-token chunk, a 1-token extension, a full 3-token prefill
    q = torch.randn(9, 4, 32)
    out = torch.full_like(q, float("nan"))
    args = (q, k_cache, v_cache, table, seq_lens, cu, out, None, 5, 0.2, True, None)
    torch.library.opcheck(torch.ops.r1fast.paged_attention, args)


def test_opcheck_paged_attention_cascade():
    k_cache, v_cache = _cache(10, 8, 2, 16)
    blocks = _table(5, 2, 10)
    prefix_table, suffix_table = blocks[:2].contiguous(), blocks[2:].contiguous()
    group_of_seq = torch.tensor([1, 0, 1], dtype=torch.int32)
    q = torch.randn(3, 6, 16)
    out, lse = torch.full_like(q, float("nan")), torch.full((3, 6), float("nan"))
    args = (q, k_cache, v_cache, prefix_table, _lens([13, 8]), group_of_seq, suffix_table, _lens([4, 0, 16]),
            out, lse, 0.25, 2, 2, 1)  # fmt: skip
    torch.library.opcheck(torch.ops.r1fast.paged_attention_cascade, args)


def test_opcheck_append_kv():
    k_cache, v_cache = _cache(4, 8, 2, 32)
    k, v = torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    slots = torch.tensor([3, 17, -1, 30, 8])  # -1: a padding token, skipped
    torch.library.opcheck(torch.ops.r1fast.append_kv, (k, v, k_cache, v_cache, slots))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public functions == eager, bitwise
# ---------------------------------------------------------------------------------------------


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def _decode_case(head_dim=64, num_heads=6, num_kv_heads=2):
    k_cache, v_cache = _cache(9, 8, num_kv_heads, head_dim)
    table, seq_lens = _table(3, 3, 9), _lens([20, 1, 24])
    return torch.randn(3, num_heads, head_dim), k_cache, v_cache, table, seq_lens


def test_compile_paged_attention_decode_and_varlen_match_eager():
    q, k_cache, v_cache, table, seq_lens = _decode_case()

    def decode(q, k_cache, v_cache, table, seq_lens):
        return paged_attention(q, k_cache, v_cache, table, seq_lens, return_lse=True, num_splits=2)

    for got, want in zip(_compiled(decode)(q, k_cache, v_cache, table, seq_lens), decode(q, k_cache, v_cache, table, seq_lens), strict=True):  # fmt: skip
        assert torch.equal(got, want)

    cu = _lens([0, 7, 8, 12])
    qv = torch.randn(12, 6, 64)

    def varlen(q, k_cache, v_cache, table, seq_lens, cu, out):
        paged_attention(q, k_cache, v_cache, table, seq_lens, cu_seqlens_q=cu, max_seqlen_q=7, out=out)
        return out * 2  # the caller's out is filled in place, and later code sees the written values

    out_eager, out_compiled = torch.full_like(qv, float("nan")), torch.full_like(qv, float("nan"))
    want = varlen(qv, k_cache, v_cache, table, seq_lens, cu, out_eager)
    got = _compiled(varlen)(qv, k_cache, v_cache, table, seq_lens, cu, out_compiled)
    assert torch.equal(got, want) and torch.equal(out_compiled, out_eager)
    assert not torch.isnan(out_compiled).any()


def test_compile_paged_attention_cascade_matches_eager():
    k_cache, v_cache = _cache(12, 8, 2, 64)
    blocks = _table(6, 2, 12)
    prefix_table, prefix_lens = blocks[:2].contiguous(), _lens([11, 16])
    suffix_table, suffix_lens = blocks[2:].contiguous(), _lens([3, 16, 0, 9])
    group_of_seq = torch.tensor([1, 0, 1, 1], dtype=torch.int32)
    q = torch.randn(4, 4, 64)

    def cascade(q, k_cache, v_cache):
        return paged_attention_cascade(
            q, k_cache, v_cache, prefix_table, prefix_lens, group_of_seq, suffix_table, suffix_lens,
            return_lse=True, max_group_size=3,
        )  # fmt: skip

    for got, want in zip(_compiled(cascade)(q, k_cache, v_cache), cascade(q, k_cache, v_cache), strict=True):
        assert torch.equal(got, want)
    # the eager call without max_group_size syncs once and gives the same answer
    eager_sync = paged_attention_cascade(
        q, k_cache, v_cache, prefix_table, prefix_lens, group_of_seq, suffix_table, suffix_lens
    )
    assert torch.equal(eager_sync, cascade(q, k_cache, v_cache)[0])


def test_compile_append_kv_then_attend_matches_eager():
    """A rollout step: append the step's K/V, then attend; the compiled graph keeps that order."""
    q, k_cache, v_cache, table, seq_lens = _decode_case(num_heads=4)
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    pos = (seq_lens - 1).long()
    slots = table[torch.arange(3), pos // 8].long() * 8 + pos % 8

    def step(q, k, v, k_cache, v_cache):
        append_kv(k, v, k_cache, v_cache, slots)
        return paged_attention(q, k_cache, v_cache, table, seq_lens)

    caches_eager = (k_cache.clone(), v_cache.clone())
    want = step(q, k, v, *caches_eager)
    got = _compiled(step)(q, k, v, k_cache, v_cache)
    assert torch.equal(got, want)
    assert torch.equal(k_cache, caches_eager[0]) and torch.equal(v_cache, caches_eager[1])
    assert torch.equal(k_cache.reshape(-1, 2, 64)[slots], k)  # the append really happened


def test_ops_and_compiled_calls_read_strided_lengths_and_slots():
    """The op bodies (not only the public functions) copy strided int vectors before the kernels read them
    without a stride; compiled, a view such as meta[:, 0] gives the eager contiguous answer."""
    q, k_cache, v_cache, table, seq_lens = _decode_case(num_heads=4)
    meta = torch.stack([seq_lens, torch.full_like(seq_lens, -5)], dim=1)  # [B, 2] per-sequence metadata
    want, got = torch.empty_like(q), torch.empty_like(q)
    torch.ops.r1fast.paged_attention(q, k_cache, v_cache, table, seq_lens, None, want, None, 1, 0.125, True, 2)
    torch.ops.r1fast.paged_attention(q, k_cache, v_cache, table, meta[:, 0], None, got, None, 1, 0.125, True, 2)
    assert torch.equal(got, want)
    compiled = _compiled(lambda q, k_cache, v_cache, meta: paged_attention(q, k_cache, v_cache, table, meta[:, 0]))
    assert torch.equal(compiled(q, k_cache, v_cache, meta), paged_attention(q, k_cache, v_cache, table, seq_lens))
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    slots = torch.tensor([[4, -1], [17, -1], [70, -1]])[:, 0]
    torch.ops.r1fast.append_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.reshape(-1, 2, 64)[[4, 17, 70]], k)


def test_cascade_without_max_group_size_refuses_to_sync_when_compiling(monkeypatch):
    k_cache, v_cache = _cache(6, 8, 1, 64)
    table = _table(3, 2, 6)
    args = (table[:1].contiguous(), _lens([9]), torch.zeros(2, dtype=torch.int32), table[1:].contiguous(), _lens([2, 5]))  # fmt: skip
    q = torch.randn(2, 2, 64)

    def cascade(q, k_cache, v_cache):
        return paged_attention_cascade(q, k_cache, v_cache, *args)

    with pytest.raises(torch._dynamo.exc.Unsupported, match="max_group_size is required"):
        _compiled(cascade)(q, k_cache, v_cache)
    # the same rule in eager code whenever host checks are off (CUDA graph capture on a GPU)
    monkeypatch.setattr(pa, "host_checks_enabled", lambda t=None: False)
    with pytest.raises(ValueError, match="max_group_size is required"):
        cascade(q, k_cache, v_cache)
    assert paged_attention_cascade(q, k_cache, v_cache, *args, max_group_size=2).shape == q.shape


@pytest.mark.parametrize("kernels", ["triton-interpret", "torch"])
def test_cascade_refuses_a_max_group_size_below_the_largest_group(monkeypatch, kernels):
    """One too small sized the kernel's grid short: the largest group's later samples came back as uninitialised
    memory (errors of 8e19) while the reference ignored the argument. Both backends now refuse it."""
    from r1fast.kernels import backend

    if kernels == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    assert backend(torch.device("cpu")) == kernels
    k_cache, v_cache = _cache(6, 8, 1, 64)
    table = _table(3, 2, 6)
    group_of_seq = torch.tensor([0, 1, 0, 0], dtype=torch.int32)  # groups of 3 and 1
    args = (table[:2].contiguous(), _lens([9, 4]), group_of_seq, table[2:].repeat(4, 1), _lens([2, 5, 1, 3]))
    q = torch.randn(4, 2, 64)
    want = paged_attention_cascade(q, k_cache, v_cache, *args)
    for too_small in (1, 2):
        with pytest.raises(ValueError, match=rf"max_group_size={too_small} is smaller than the largest group \(3"):
            paged_attention_cascade(q, k_cache, v_cache, *args, max_group_size=too_small)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_group_size must be None or an int >= 1"):
            paged_attention_cascade(q, k_cache, v_cache, *args, max_group_size=bad)
    for enough in (3, 5):
        assert torch.equal(paged_attention_cascade(q, k_cache, v_cache, *args, max_group_size=enough), want)


# ---------------------------------------------------------------------------------------------
# GPU: the ops inside a captured CUDA graph
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_ops_capture_in_a_cuda_graph_and_replay():
    dev, dtype = "cuda", torch.bfloat16
    k_cache, v_cache = _cache(64, 16, 4, 128, dtype, dev)
    table, seq_lens = _table(4, 8, 64, dev), _lens([100, 1, 128, 37], dev)
    prefix_table, prefix_lens = table[:2, :4].contiguous(), _lens([64, 50], dev)
    group_of_seq = torch.tensor([0, 1, 0, 1], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(4, n, 128, device=dev, dtype=dtype) for n in (28, 4, 4))
    pos = (seq_lens - 1).long()
    slots = table[torch.arange(4, device=dev), pos // 16].long() * 16 + pos % 16

    def step():
        append_kv(k, v, k_cache, v_cache, slots)
        plain = paged_attention(q, k_cache, v_cache, table, seq_lens)
        shared = paged_attention_cascade(
            q, k_cache, v_cache, prefix_table, prefix_lens, group_of_seq, table, seq_lens, max_group_size=2
        )
        return plain, shared

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        want = step()  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
        with pytest.raises(ValueError, match="max_group_size is required"):  # its sync is refused, not attempted
            paged_attention_cascade(q, k_cache, v_cache, prefix_table, prefix_lens, group_of_seq, table, seq_lens)
    q.copy_(torch.randn_like(q))
    want = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
