"""The PyTorch reference of paged decode (the CPU rollout's attention) against a per-row computation written
here, and the invariances the rollout relies on: a row's result does not depend on the other rows of the batch,
and cascade and plain tables of one sequence give the same bits."""

import pytest
import torch
from test_paged_attention import _cascade_case, make_paged_kv

from r1fast.kernels import ref_paged_attention as R
from r1fast.kernels.ref_paged_attention import gather_kv


def _row_by_row(q, rows_kv):
    """fp64 softmax attention of q[b] over the [L, Hkv, D] keys/values rows_kv[b] (out 0 when L = 0)."""
    outs = []
    for b, (k, v) in enumerate(rows_kv):
        group = q.shape[1] // k.shape[1]
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), k) / q.shape[2] ** 0.5
        outs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v) if k.shape[0] else torch.zeros_like(q[b]).double())
    return torch.stack(outs)


@pytest.mark.parametrize("lens", [[1, 63, 64, 65, 130, 0, 7], [200]])
def test_decode_reference_matches_row_by_row_and_ignores_other_rows(lens):
    k_cache, v_cache, table, seq_lens = make_paged_kv(lens, 2, 64, 16, torch.float32, "cpu")  # NaN past lengths
    q = torch.randn(len(lens), 4, 64)
    out, lse = R.paged_attention(q, k_cache, v_cache, table, seq_lens, return_lse=True)
    rows = [(gather_kv(k_cache, table[b], n), gather_kv(v_cache, table[b], n)) for b, n in enumerate(lens)]
    torch.testing.assert_close(out.double(), _row_by_row(q, rows), rtol=1e-5, atol=1e-5)
    assert torch.isinf(lse[seq_lens == 0]).all() and (out[seq_lens == 0] == 0).all()
    for b in range(len(lens)):  # alone, and padded with empty rows (the CUDA-graph buckets)
        alone = R.paged_attention(q[b:b + 1], k_cache, v_cache, table[b:b + 1], seq_lens[b:b + 1])
        assert torch.equal(alone, out[b:b + 1])
    empty_table, empty_lens = torch.zeros(3, table.shape[1], dtype=table.dtype), torch.zeros(3, dtype=seq_lens.dtype)
    pad = torch.cat([q, torch.randn(3, 4, 64)]), torch.cat([table, empty_table]), torch.cat([seq_lens, empty_lens])
    assert torch.equal(R.paged_attention(pad[0], k_cache, v_cache, pad[1], pad[2])[: len(lens)], out)


def test_cascade_reference_equals_plain_tables_bit_for_bit():
    """The engine decodes through cascade or plain tables (a failed cascade capture falls back): the same
    sequence must give the same bits either way, or the tokens sampled depend on the path."""
    q, k_cache, v_cache, prefix_table, prefix, group_of_seq, suffix_table, suffix = _cascade_case(
        [3, 1, 2], [64, 0, 16], [1, 20, 63, 0, 5, 17], 4, 2, 16)  # block-aligned prefixes, as the engine makes them
    out = R.paged_attention_cascade(q, k_cache, v_cache, prefix_table, prefix, group_of_seq, suffix_table, suffix)
    plain = torch.full((len(q), 8), 10**6, dtype=torch.int32)  # unused entries: never read
    for b, g in enumerate(group_of_seq.tolist()):
        blocks = prefix_table[g, : int(prefix[g]) // 16].tolist() + suffix_table[b, : -(-int(suffix[b]) // 16)].tolist()
        plain[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    lengths = prefix[group_of_seq.long()] + suffix
    assert torch.equal(R.paged_attention(q, k_cache, v_cache, plain, lengths), out)
    rows = [(torch.cat([gather_kv(k_cache, prefix_table[g], int(prefix[g])), gather_kv(k_cache, suffix_table[b], int(suffix[b]))]),
             torch.cat([gather_kv(v_cache, prefix_table[g], int(prefix[g])), gather_kv(v_cache, suffix_table[b], int(suffix[b]))]))
            for b, g in enumerate(group_of_seq.tolist())]
    torch.testing.assert_close(out.double(), _row_by_row(q, rows), rtol=1e-5, atol=1e-5)
