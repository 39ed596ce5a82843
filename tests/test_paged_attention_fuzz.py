"""Seeded random configurations of paged_attention, paged_attention_cascade and append_kv against an fp64
oracle written here from the contract (not the repo's reference, which is checked against it too).

Each case draws B 1..9, Hkv in {1, 2, 4}, Hq/Hkv in {1, 2, 3, 4, 7}, D in {64, 128, 256}, block_size 8..128,
lengths of 0, 1, block multiples and anything up to 300 (decode) or 120, varlen chunks (empty ones included,
up to the whole sequence), shuffled block ids with a shared block and garbage (-1, 10**6) past each row's last used block,
caches that are slices / permuted / D-strided views, strided q and out=, causal on and off, explicit scales,
split overrides, fp32 and fp16. Every cache slot no sequence owns holds NaN and out= starts as NaN, so a
read of the wrong slot or a row left unwritten shows. 48 cases, ~20 s under the interpreter (CPU shared with other jobs).
"""

import math
import random

import pytest
import torch
from conftest import assert_close_to_ref

from r1fast.kernels import ref_paged_attention as repo_ref
from r1fast.kernels.paged_attention import append_kv, paged_attention, paged_attention_cascade

NAN = float("nan")


def oracle(q, k_cache, v_cache, table, lens, cu, scale, causal, prefix=None, compute=torch.float64):
    """out [T, Hq, D] and natural-log lse [T, Hq] (0 and -inf for a query that sees no key), computed in
    ``compute`` (fp64: the truth; q's dtype: PyTorch's own same-dtype error, the yardstick of the bound).

    Sequence b is its group's prefix (``prefix`` = (table, lens, group_of_seq)) then lens[b] tokens through
    table[b]; its queries cu[b]..cu[b+1] (one, row b, when cu is None) are its last positions."""
    q, k_cache, v_cache = q.to(compute), k_cache.to(compute), v_cache.to(compute)
    num_q, num_heads, _ = q.shape
    group, block_size = num_heads // k_cache.shape[2], k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=compute)
    lse = torch.full((num_q, num_heads), -math.inf, dtype=compute)
    for b in range(table.shape[0]):
        slots = []
        if prefix is not None:
            g = int(prefix[2][b])
            slots += [(int(prefix[0][g, p // block_size]), p % block_size) for p in range(int(prefix[1][g]))]
        slots += [(int(table[b, p // block_size]), p % block_size) for p in range(int(lens[b]))]
        start, end = (b, b + 1) if cu is None else (int(cu[b]), int(cu[b + 1]))
        if not slots or end == start:
            continue
        blocks, offsets = torch.tensor(slots).T
        k = k_cache[blocks, offsets].repeat_interleave(group, 1)  # [L, Hq, D]
        v = v_cache[blocks, offsets].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,lhd->hql", q[start:end], k) * scale
        if causal:
            pos = torch.arange(end - start)[:, None] + len(slots) - (end - start)
            scores = scores.masked_fill(torch.arange(len(slots))[None, :] > pos, -math.inf)
        row_lse = torch.logsumexp(scores, -1)
        seen = torch.isfinite(row_lse)
        weights = torch.where(seen[..., None], torch.exp(scores - torch.where(seen, row_lse, 0)[..., None]), 0)
        out[start:end] = torch.einsum("hql,lhd->qhd", weights, v)
        lse[start:end] = row_lse.T
    return out, lse


def _view(shape, dtype, style):
    """A random tensor of ``shape`` as one of the layouts a caller may pass (the contract allows any strides);
    drawn in ``dtype`` directly, since ``.to(dtype)`` of a sliced view returns a contiguous copy."""
    if style == 0:
        return torch.randn(shape, dtype=dtype)
    if style == 1:  # a slice of a larger tensor, offset in the last two dims
        big = torch.randn(*shape[:-2], shape[-2] + 1, shape[-1] + 8, dtype=dtype)
        return big[..., 1:, 4 : shape[-1] + 4]
    if style == 2:  # last two leading dims swapped in memory
        return torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1], dtype=dtype).transpose(-3, -2)
    return torch.randn(*shape, 2, dtype=dtype)[..., 0]  # stride 2 along D


def _length(rng, block_size, longest):
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.2:
        return 1
    if r < 0.35:
        return block_size * rng.randint(1, max(1, longest // block_size))
    return rng.randint(1, longest)


def _case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = dict(dtype=rng.choice([torch.float32, torch.float16]), hkv=rng.choice([1, 2, 4]),
             d=rng.choices([64, 128, 256], [6, 2, 1])[0], bs=rng.choice([8, 16, 32, 64, 128]),
             kind=rng.choice(["decode", "varlen", "cascade"]),
             scale=rng.choice([None, 0.3, 1.7]), causal=rng.random() < 0.7, lse=rng.random() < 0.6)
    c["hq"] = c["hkv"] * rng.choice([1, 2, 3, 4, 7])
    batch = rng.randint(1, 9 if c["d"] == 64 else 4)
    # varlen tiles stack chunk tokens x heads, and the interpreter's time grows with them: shorter sequences
    longest = 120 if c["d"] > 64 or c["kind"] == "varlen" else 300
    lens = [_length(rng, c["bs"], longest) for _ in range(batch)]
    prefix_lens = []
    if c["kind"] == "cascade":
        prefix_lens = [_length(rng, c["bs"], longest) for _ in range(rng.randint(1, min(3, batch)))]
        lens = [rng.randint(0, 40) for _ in range(batch)]
    c["cu"] = None
    if c["kind"] == "varlen":
        # whole sequences (a prompt's prefill) only up to 64 tokens: 178 queries x 7 heads took 16 s interpreted
        chunks = [0 if rng.random() < 0.1 else n if rng.random() < 0.25 and n <= 64
                  else rng.randint(min(n, 1), min(n, 40)) for n in lens]
        c["cu"] = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
        c["max_q"] = max(1, *chunks)
    # shuffled block ids; past each row's last used block: garbage the kernels must never read
    needs = [-(-n // c["bs"]) for n in lens]
    prefix_needs = [-(-n // c["bs"]) for n in prefix_lens]
    num_blocks = sum(needs) + sum(prefix_needs) + rng.randint(1, 3)
    ids = iter(rng.sample(range(num_blocks), num_blocks))

    def table(rows, width):
        t = torch.tensor([[next(ids) if j < n else rng.choice([-1, 10**6, 0]) for j in range(width)] for n in rows],
                         dtype=torch.int32).reshape(len(rows), width)
        return t if rng.random() < 0.5 else t.T.contiguous().T  # column-major: the kernel reads through strides

    c["table"] = table(needs, max(needs) + rng.randint(0, 2))
    if batch > 1 and needs[0] and needs[1] and rng.random() < 0.3:
        c["table"][1, 0] = c["table"][0, 0]  # two sequences reading one block
    c["lens"] = torch.tensor(lens, dtype=torch.int32)
    if prefix_lens:
        group_dtype = rng.choice([torch.int32, torch.int64])
        groups = torch.tensor([rng.randrange(len(prefix_lens)) for _ in range(batch)], dtype=group_dtype)
        c["prefix"] = (table(prefix_needs, max(1, *prefix_needs)), torch.tensor(prefix_lens, dtype=torch.int32), groups)
    shape = (num_blocks, c["bs"], c["hkv"], c["d"])
    c["k"], c["v"] = _view(shape, c["dtype"], rng.randint(0, 3)), _view(shape, c["dtype"], rng.randint(0, 3))
    owned = torch.zeros(num_blocks, c["bs"], dtype=torch.bool)
    for t, n in [(c["table"][b], lens[b]) for b in range(batch)] + (
            [(c["prefix"][0][g], n) for g, n in enumerate(prefix_lens)] if prefix_lens else []):
        for p in range(n):
            owned[int(t[p // c["bs"]]), p % c["bs"]] = True
    c["k"][~owned], c["v"][~owned] = NAN, NAN
    tokens = batch if c["cu"] is None else int(c["cu"][-1])
    c["q"] = _view((tokens, c["hq"], c["d"]), c["dtype"], rng.choice([0, 2, 3]))
    c["out"] = None if rng.random() < 0.4 else torch.full((tokens, c["hq"], 2 * c["d"]), NAN, dtype=c["dtype"])[..., 1::2]
    c["splits"] = rng.choice([None, None, 1, 2, 5] if c["cu"] is None else [None, 1, 2])
    if c["kind"] == "cascade" and c["splits"] is not None:
        c["splits"] = (c["splits"], rng.choice([1, 3]))
    return c


@pytest.mark.parametrize("first", range(0, 48, 12))
def test_random_configurations_match_the_fp64_oracle(first):
    for seed in range(first, first + 12):
        c = _case(seed)
        scale = c["scale"] if c["scale"] is not None else 1 / math.sqrt(c["d"])
        common = dict(softmax_scale=c["scale"], out=c["out"], return_lse=c["lse"], num_splits=c["splits"])
        if c["kind"] == "cascade":
            got = paged_attention_cascade(c["q"], c["k"], c["v"], *c["prefix"], c["table"], c["lens"], **common)
            args = (c["q"], c["k"], c["v"], c["table"], c["lens"], None, scale, True, c["prefix"])
            repo = repo_ref.paged_attention_cascade(c["q"].double(), c["k"].double(), c["v"].double(), *c["prefix"],
                                                    c["table"], c["lens"], softmax_scale=c["scale"], return_lse=True)
        else:
            kw = dict(cu_seqlens_q=c["cu"], max_seqlen_q=c.get("max_q", 1), causal=c["causal"])
            got = paged_attention(c["q"], c["k"], c["v"], c["table"], c["lens"], **kw, **common)
            args = (c["q"], c["k"], c["v"], c["table"], c["lens"], c["cu"], scale, c["causal"], None)
            repo = repo_ref.paged_attention(c["q"].double(), c["k"].double(), c["v"].double(), c["table"], c["lens"],
                                            softmax_scale=c["scale"], return_lse=True, **kw)
        want, same_dtype = oracle(*args), oracle(*args, compute=c["dtype"])
        out, lse = got if c["lse"] else (got, None)
        if c["out"] is not None:
            assert out is c["out"], seed
        # NaN (a row left unwritten, a poisoned slot read) fails here too
        assert_close_to_ref(out, want[0], same_dtype[0], name=f"seed {seed} out")
        seen = torch.isfinite(want[1])
        assert torch.equal(torch.isfinite(repo[1]), seen) and (repo[0] - want[0]).abs().max().item() < 1e-10, seed
        if lse is not None:
            assert lse.dtype == torch.float32 and torch.equal(lse == -math.inf, ~seen), seed
            assert_close_to_ref(lse.masked_fill(~seen, 0), want[1].masked_fill(~seen, 0),
                                same_dtype[1].masked_fill(~seen, 0), dtype=c["dtype"], name=f"seed {seed} lse")


@pytest.mark.parametrize("seed", range(10))
def test_random_append_kv_writes_exactly_its_slots(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype, hkv, d, bs = rng.choice([torch.float32, torch.float16]), rng.choice([1, 2, 3, 4]), 64, rng.choice([8, 32])
    blocks = rng.randint(2, 10)
    k_cache, v_cache = _view((blocks, bs, hkv, d), dtype, rng.randint(0, 3)), _view((blocks, bs, hkv, d), dtype, 3)
    tokens = rng.randint(0, 24)
    # distinct slots, the cache's first and last among them (the boundaries of the slot range)
    edges = [0, blocks * bs - 1][: min(tokens, 2)]
    picked = edges + rng.sample(range(1, blocks * bs - 1), tokens - len(edges))
    rng.shuffle(picked)
    slots = torch.tensor(picked, dtype=torch.int64)
    slots[torch.rand(tokens) < 0.25] = -rng.randint(1, 5)  # padding: any negative slot is skipped
    k, v = _view((tokens, hkv, d), dtype, rng.randint(0, 3)), _view((tokens, hkv, d), dtype, 2)
    want_k = k_cache.clone(memory_format=torch.contiguous_format)  # contiguous copies: views may be strided
    want_v = v_cache.clone(memory_format=torch.contiguous_format)
    keep = slots >= 0
    want_k.view(-1, hkv, d)[slots[keep]] = k[keep]
    want_v.view(-1, hkv, d)[slots[keep]] = v[keep]
    append_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
