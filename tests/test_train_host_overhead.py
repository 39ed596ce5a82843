"""Host overhead of the training step: batched ragged attention, vectorized packing, few host reads.

Probe (p4 hostov): SDPAAttention looped over sequences (164 us per sequence per layer), pack() built
lists token by token (~512 ns/token) and one GRPO update read device values ~14 times per micro-batch.
These tests pin the semantics of the faster paths against the slow ones and count the reads.
"""

import collections

import pytest
import torch
import torch.nn.functional as F

import r1fast.kernels as K
from r1fast.attention import SDPAAttention
from r1fast.config import load_config
from r1fast.grpo_step import RolloutBatch, train_on_batch
from r1fast.kernels.registration import trusted_inputs
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.policy import PolicyHead, pack, pad_rows


def _per_sequence(q, k, v, lens, scale):
    """The oracle: one causal SDPA per sequence (the previous implementation)."""
    outs, a = [], 0
    for n in lens:
        qs, ks, vs = (t[a:a + n].transpose(0, 1) for t in (q, k, v))
        ks, vs = (t.repeat_interleave(qs.shape[0] // t.shape[0], dim=0) for t in (ks, vs))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        a += n
    return torch.cat(outs)


@pytest.mark.parametrize("path", ["padded", "loop"])
def test_ragged_attention_matches_per_sequence_forward_and_backward(path):
    """Lengths 1..13 (a length-1 sequence included), GQA 4:2, MLA-like narrower v; fp64 so 1e-12 is tight."""
    lens = [5, 1, 13, 2, 9]
    total, hq, hkv = sum(lens), 4, 2
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, hq, 8, dtype=torch.float64, generator=g)
    k = torch.randn(total, hkv, 8, dtype=torch.float64, generator=g)
    v = torch.randn(total, hkv, 6, dtype=torch.float64, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    attn = SDPAAttention()
    cost = float("inf") if path == "padded" else 0.0
    attn.CALL_COST = {"cpu": cost, "cuda": cost}
    grads = []
    for fn in (lambda *t: attn(*t, layer=0, cu_seqlens=cu, max_seqlen=max(lens), softmax_scale=0.3),
               lambda *t: _per_sequence(*t, lens, 0.3)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_padding_cost_model_pads_short_batches_and_loops_long_ragged_ones():
    attn, q = SDPAAttention(), torch.zeros(1, 2, 16)
    assert attn._padding_pays(q, q, 64, 32, 64 * 20)  # B = 64 short sequences: one call instead of 64
    assert not attn._padding_pays(q, q, 16, 4000, 16 * 2500)  # long ragged: the padding's work dominates


def _reference_pack(prompts, completions):
    """The per-token construction pack() replaced (its semantics, kept as the oracle)."""
    width = max(1, max(len(c) for c in completions))
    ids, index, comp, mask, start, cu = [], [], [], [], 0, [0]
    for p, c in zip(prompts, completions, strict=True):
        ids += p + c
        pad = width - len(c)
        index.append([start + len(p) - 1 + j for j in range(len(c))] + [start] * pad)
        comp.append(c + [0] * pad)
        mask.append([1.0] * len(c) + [0.0] * pad)
        start += len(p) + len(c)
        cu.append(start)
    return (torch.tensor(ids), torch.tensor(cu, dtype=torch.int32), torch.tensor(index), torch.tensor(comp),
            torch.tensor(mask))


def test_pack_and_pad_rows_equal_the_per_token_construction():
    """Empty completions, a single-token sequence last (its padded slots must not index past T)."""
    prompts = [[3, 4], [5], [6, 7, 8], [9]]
    completions = [[10, 11, 12], [], [13], []]
    batch = pack(prompts, completions)
    ref = _reference_pack(prompts, completions)
    for got, want in zip((batch.input_ids, batch.cu_seqlens, batch.gather_index, batch.completion_ids, batch.mask),
                         ref, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert batch.max_seqlen == 5
    rows = [[-0.5, -1.25, -2.0], [], [-3.0], []]
    want = torch.tensor([[-0.5, -1.25, -2.0], [0.0] * 3, [-3.0, 0.0, 0.0], [0.0] * 3])
    assert torch.equal(pad_rows(rows, 3), want)


def test_trusted_inputs_skips_only_the_value_checks_and_only_inside():
    h, w = torch.randn(1, 3, 8), torch.randn(11, 8)
    ids, adv = torch.tensor([[1, 2, 3]]), torch.ones(1)
    half_mask = torch.tensor([[1.0, 0.5, 1.0]])
    with pytest.raises(ValueError, match="only 0 and 1"):
        K.fused_linear_grpo_loss(h, w, ids, half_mask, adv)
    with trusted_inputs():
        with pytest.raises(ValueError, match="advantages"):  # shapes are still checked
            K.fused_linear_grpo_loss(h, w, ids, torch.ones(1, 3), torch.ones(2))
        K.fused_linear_grpo_loss(h, w, ids, torch.ones(1, 3), adv)
    with pytest.raises(ValueError, match="token_ids"):  # outside again: full validation
        K.fused_linear_grpo_loss(h, w, torch.tensor([[1, 2, 99]]), torch.ones(1, 3), adv)


def test_one_update_reads_the_device_once_per_update_not_per_micro_batch(monkeypatch):
    """4 micro-batches, one update: reads from the trainer's own code are 2 (global tokens, the flag + metrics
    all-reduce); the probe counted 5.75 per micro-batch in grpo_step.py alone (23 here)."""
    cfg = load_config(None, ["--grpo.micro_batch_size", "2", "--grpo.prompts_per_step", "1",
                             "--grpo.samples_per_prompt", "8", "--grpo.beta", "0.0", "--grpo.loss_type", "dapo"])
    args = ModelArgs(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=8)
    root = PolicyHead(Transformer.from_config(args, seed=1))
    lens = [3, 1, 7, 2, 5, 4, 1, 6]
    batch = RolloutBatch(prompts=[[1, 2]] * 8, completions=[[5 + i] * n for i, n in enumerate(lens)],
                         rollout_logps=[[-1.0] * n for n in lens], advantages=torch.linspace(-1, 1, 8),
                         keep=[True] * 8)
    reads = collections.Counter()
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            import traceback  # noqa: PLC0415

            frames = [f.filename for f in traceback.extract_stack()[:-1]]
            if any(f.endswith(("grpo_step.py", "ref_grpo_checks.py", "attention.py", "policy.py")) for f in frames[-3:]):
                reads[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    metrics = train_on_batch(cfg, root, None, batch, lambda: 0.0,
                             torch.optim.SGD(root.parameters(), lr=0.0), 1)
    monkeypatch.undo()
    assert sum(reads.values()) == 2, reads
    assert metrics["active_tokens"] == sum(lens) and all(map(torch.isfinite, map(torch.tensor, (
        metrics["loss"], metrics["entropy"], metrics["clip_frac"]))))
