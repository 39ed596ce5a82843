"""SDPAAttention's three paths (equal lengths, padded, per-sequence loop) against an fp64 causal reference,
with a non-default softmax scale (MLA's YaRN mscale^2 one) and GQA, and its index caches under reuse."""

import math

import pytest
import torch

from r1fast.attention import SDPAAttention

HQ, HKV, D, DV = 4, 2, 8, 6
SCALE = 0.61  # not D ** -0.5: a path that dropped the scale would still pass with the default


def _reference(q, k, v, cu, scale):
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        n = b - a
        kk = k[a:b].repeat_interleave(HQ // HKV, dim=1)  # query head h reads kv head h // (HQ / HKV)
        vv = v[a:b].repeat_interleave(HQ // HKV, dim=1)
        s = torch.einsum("ihd,jhd->hij", q[a:b], kk) * scale
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
        out[a:b] = torch.einsum("hij,jhd->ihd", s.softmax(-1), vv)
    return out


def _inputs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k = torch.randn(t, HQ, D, generator=gen), torch.randn(t, HKV, D, generator=gen)
    v = torch.randn(t, HKV, DV, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _attn(call_cost):
    attn = SDPAAttention()
    attn.CALL_COST = {"cpu": call_cost, "cuda": call_cost}  # 0: always the loop; inf: always padded
    return attn


@pytest.mark.parametrize("call_cost", [0.0, math.inf], ids=["loop", "padded"])
@pytest.mark.parametrize("lengths", [[5, 1, 9, 4], [3, 3, 3]], ids=["ragged", "equal"])
def test_sdpa_paths_match_fp64_reference(call_cost, lengths):
    q, k, v, cu = _inputs(lengths)
    out = _attn(call_cost)(q, k, v, layer=0, cu_seqlens=cu, max_seqlen=max(lengths), softmax_scale=SCALE)
    assert out.shape == (sum(lengths), HQ, DV)
    torch.testing.assert_close(out.double(), _reference(q, k, v, cu, SCALE), atol=1e-5, rtol=0)


@pytest.mark.parametrize("call_cost", [0.0, math.inf], ids=["loop", "padded"])
def test_sdpa_cache_follows_in_place_changes_of_cu_seqlens(call_cost):
    """The engine reuses one cu_seqlens buffer: new boundaries written in place must not hit a stale index."""
    q, k, v, cu = _inputs([5, 1, 9, 4])
    attn = _attn(call_cost)
    attn(q, k, v, layer=0, cu_seqlens=cu, max_seqlen=9, softmax_scale=SCALE)
    cu.copy_(torch.tensor([0, 2, 11, 13, 19], dtype=torch.int32))  # lengths 2, 9, 2, 6: the same max_seqlen
    out = attn(q, k, v, layer=1, cu_seqlens=cu, max_seqlen=9, softmax_scale=SCALE)
    torch.testing.assert_close(out.double(), _reference(q, k, v, cu, SCALE), atol=1e-5, rtol=0)


def test_sdpa_padded_index_follows_max_seqlen():
    """The same cu_seqlens with another max_seqlen (an upper bound, as flash-attn accepts) must re-index."""
    q, k, v, cu = _inputs([5, 1, 9, 4])
    attn = _attn(math.inf)
    first = attn(q, k, v, layer=0, cu_seqlens=cu, max_seqlen=9, softmax_scale=SCALE)
    second = attn(q, k, v, layer=1, cu_seqlens=cu, max_seqlen=12, softmax_scale=SCALE)
    ref = _reference(q, k, v, cu, SCALE)
    torch.testing.assert_close(first.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(second.double(), ref, atol=1e-5, rtol=0)
