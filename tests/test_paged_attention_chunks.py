"""Varlen query chunks that disagree with the other arguments: paged_attention refuses them on CPU (both
backends) instead of returning rows it never wrote or attended from positions that do not exist; and a
``causal`` flag that is not a bool, which silently ran the chunks non-causally."""

import math

import pytest
import torch

from r1fast.kernels import paged_attention

BS, D, HQ, HKV = 16, 64, 2, 2


def _inputs(seed, q_len, seq_len):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(8, BS, HKV, D, generator=g)
    v_cache = torch.randn(8, BS, HKV, D, generator=g)
    q = torch.randn(q_len, HQ, D, generator=g)
    table = torch.arange(8, dtype=torch.int32)[None]
    return q, k_cache, v_cache, table, torch.tensor([seq_len], dtype=torch.int32)


def _oracle(q, k_cache, v_cache, length):
    """fp64 causal attention of q's rows as the last positions of a sequence held in blocks 0, 1, ..."""
    k = k_cache.reshape(-1, HKV, D)[:length].double()
    v = v_cache.reshape(-1, HKV, D)[:length].double()
    s = torch.einsum("qhd,lhd->hql", q.double(), k) / math.sqrt(D)
    pos = torch.arange(q.shape[0])[:, None] + (length - q.shape[0])
    s = s.masked_fill(torch.arange(length)[None, :] > pos, float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_max_seqlen_q_below_the_longest_chunk_is_refused(monkeypatch, kernels):
    # 20 queries with one head per KV head: the kernel's grid covered 16 rows for max_seqlen_q = 1, and rows
    # 16..19 of the poisoned out came back NaN without an error
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    q, k_cache, v_cache, table, lens = _inputs(0, 20, 40)
    cu = torch.tensor([0, 20], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    with pytest.raises(ValueError, match="max_seqlen_q=1 is smaller than the longest query chunk"):
        paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=1, out=out)
    for max_q in (20, 33):  # the longest chunk exactly, or more, is valid
        got = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=max_q, out=out)
        assert (got.double() - _oracle(q, k_cache, v_cache, 40)).abs().max() < 1e-5


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_chunk_longer_than_its_sequence_is_refused(monkeypatch, kernels):
    # seq_lens counts the chunk's own tokens, so 20 queries over 5 keys put 15 queries before position 0;
    # both paths returned those rows as zeros without an error
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    q, k_cache, v_cache, table, _ = _inputs(1, 20, 5)
    cu = torch.tensor([0, 0, 20], dtype=torch.int32)
    table = table.expand(2, -1).contiguous()
    with pytest.raises(ValueError, match=r"query chunk 1 has 20 queries .* seq_lens\[1\] = 5"):
        paged_attention(q, k_cache, v_cache, table, torch.tensor([3, 5], dtype=torch.int32), cu_seqlens_q=cu,
                        max_seqlen_q=20)
    # a chunk as long as its sequence (a whole prompt) and an empty chunk over an empty sequence are valid
    got = paged_attention(q, k_cache, v_cache, table, torch.tensor([0, 20], dtype=torch.int32), cu_seqlens_q=cu,
                          max_seqlen_q=20)
    assert (got.double() - _oracle(q, k_cache, v_cache, 20)).abs().max() < 1e-5


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("flag", [None, "no"])
def test_causal_must_be_a_bool(monkeypatch, kernels, flag):
    # causal=None gave every query of a 5-token chunk the later keys too (0.37 from the causal result) on both
    # paths; "no" failed inside the op schema with a RuntimeError
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    q, k_cache, v_cache, table, lens = _inputs(2, 5, 30)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="causal must be True or False"):
        paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=5, causal=flag)
