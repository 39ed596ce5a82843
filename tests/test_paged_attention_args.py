"""paged_attention's arguments on the kernel and the reference path (R1FAST_KERNELS=torch), against fp64
softmaxes over gathered keys written here: a column-strided block table (the kernel reads it through its
strides), table entries past a sequence's last used block holding garbage (documented as never read), and the
cascade's explicit softmax_scale (the suite had only run the default 1/sqrt(D))."""

import math

import numpy as np
import pytest
import torch

from r1fast.kernels import paged_attention, paged_attention_cascade

BS, D, HQ, HKV = 16, 64, 4, 2


def _cache(g, blocks=10):
    return (torch.randn(blocks, BS, HKV, D, generator=g), torch.randn(blocks, BS, HKV, D, generator=g))


def _oracle(q_rows, k_cache, v_cache, table_row, length):
    """Causal attention of the len(q_rows) last positions of one sequence (fp64)."""
    k = torch.stack([k_cache[int(table_row[t // BS]), t % BS] for t in range(length)]).double()
    v = torch.stack([v_cache[int(table_row[t // BS]), t % BS] for t in range(length)]).double()
    kk, vv = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    nq = q_rows.shape[0]
    s = torch.einsum("qhd,lhd->hql", q_rows.double(), kk) / math.sqrt(D)
    pos = torch.arange(nq)[:, None] + (length - nq)
    s = s.masked_fill(torch.arange(length)[None, :] > pos, float("-inf"))
    return torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_decode_with_column_strided_block_table(monkeypatch, kernels):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    g = torch.Generator().manual_seed(7)
    k_cache, v_cache = _cache(g)
    # the used entries sit at even columns of a wider table; odd columns point at other (wrong) blocks
    wide = torch.tensor([[3, 9, 1, 8, 6, 7], [2, 0, 5, 4, 0, 0]], dtype=torch.int32)
    table = wide[:, ::2]
    assert table.stride(1) == 2
    lens = torch.tensor([40, 20], dtype=torch.int32)
    q = torch.randn(2, HQ, D, generator=g)
    got = paged_attention(q, k_cache, v_cache, table, lens)
    for b in range(2):
        want = _oracle(q[b:b + 1], k_cache, v_cache, table[b], int(lens[b]))[0]
        assert torch.allclose(got[b].double(), want, atol=2e-5, rtol=1e-5), b


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_prefill_block_aligned_lengths_ignore_garbage_past_the_last_block(monkeypatch, kernels):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    g = torch.Generator().manual_seed(8)
    k_cache, v_cache = _cache(g)
    garbage = 2**30
    table = torch.tensor([[4, 1, garbage, garbage], [7, garbage, garbage, garbage]], dtype=torch.int32)
    lens = torch.tensor([32, 16], dtype=torch.int32)  # whole blocks: the next entry is garbage
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    q = torch.randn(8, HQ, D, generator=g)
    got = paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=5)
    for b in range(2):
        s, e = int(cu[b]), int(cu[b + 1])
        want = _oracle(q[s:e], k_cache, v_cache, table[b], int(lens[b]))
        assert torch.allclose(got[s:e].double(), want, atol=2e-5, rtol=1e-5), b
    # numpy integers (np.int64(5) was refused; True was taken as 1); a bool is no length
    for longest in (np.int64(5), np.int32(5)):
        assert torch.equal(paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=longest),
                           got)
    with pytest.raises(ValueError, match="max_seqlen_q must be a positive int"):
        paged_attention(q, k_cache, v_cache, table, lens, cu_seqlens_q=cu, max_seqlen_q=True)


def _cascade_case():
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(12, BS, HKV, D, generator=g)
    v_cache = torch.randn(12, BS, HKV, D, generator=g)
    prefix_table = torch.tensor([[0, 1, 2], [3, 4, 0]], dtype=torch.int32)
    prefix_lens = torch.tensor([37, 20], dtype=torch.int32)
    group_of_seq = torch.tensor([1, 0, 0], dtype=torch.int32)
    suffix_table = torch.tensor([[5, 6], [7, 0], [8, 9]], dtype=torch.int32)
    suffix_lens = torch.tensor([19, 3, 30], dtype=torch.int32)
    q = torch.randn(3, HQ, D, generator=g)
    return q, k_cache, v_cache, prefix_table, prefix_lens, group_of_seq, suffix_table, suffix_lens


def _cascade_oracle(q, k_cache, v_cache, prefix_table, prefix_lens, group_of_seq, suffix_table, suffix_lens, scale):
    outs = []
    for b in range(q.shape[0]):
        gr = int(group_of_seq[b])
        pos_k, pos_v = [], []
        for table, n in ((prefix_table[gr], int(prefix_lens[gr])), (suffix_table[b], int(suffix_lens[b]))):
            for t in range(n):
                pos_k.append(k_cache[int(table[t // BS]), t % BS])
                pos_v.append(v_cache[int(table[t // BS]), t % BS])
        k = torch.stack(pos_k).double()  # [L, Hkv, D]
        v = torch.stack(pos_v).double()
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("hd,lhd->hl", q[b].double(), kk) * scale
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vv))
    return torch.stack(outs)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("scale", [None, 0.05, 0.4])
def test_cascade_softmax_scale(monkeypatch, kernels, scale):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    args = _cascade_case()
    got = paged_attention_cascade(*args, softmax_scale=scale)
    want = _cascade_oracle(*args, scale if scale is not None else 1.0 / math.sqrt(D))
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5)
