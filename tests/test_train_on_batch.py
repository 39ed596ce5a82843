"""``train_on_batch``: micro-batching, keep masks, pi_old / reference log-probs and logged metrics equal one
full-batch call of the loss (the module docstring's promise), for every loss type, on one rank."""

import pytest
import torch

from r1fast.config import load_config
from r1fast.grpo_step import RolloutBatch, train_on_batch
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.policy import PolicyHead, pack, pad_rows

LENS = [3, 1, 7, 2, 5, 4, 1, 6]
KEEP = [True, False, True, True, False, True, True, True]
TEMPERATURE = 0.7
MAX_NEW = 9


def _setup(beta):
    args = ModelArgs(vocab_size=37, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=8)
    root = PolicyHead(Transformer.from_config(args, seed=1, dtype=torch.float64))
    ref_root = PolicyHead(Transformer.from_config(args, seed=2, dtype=torch.float64)) if beta > 0 else None
    gen = torch.Generator().manual_seed(0)
    prompts = [[1 + i % 3, 2] for i in range(len(LENS))]
    completions = [torch.randint(3, 37, (n,), generator=gen).tolist() for n in LENS]
    packed = pack(prompts, completions)
    with torch.no_grad():
        true_logps = root(packed, mode="logps", temperature=TEMPERATURE)
    # the rollout engine's log-probs: off the trainer's by up to +-0.4, so some ratios leave the clip range
    noise = (torch.rand(true_logps.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    rollout = [(true_logps[i, :n] + noise[i, :n]).tolist() for i, n in enumerate(LENS)]
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, 0.3, -2.0, 1.2])
    batch = RolloutBatch(prompts=prompts, completions=completions, rollout_logps=rollout, advantages=advantages,
                         keep=list(KEEP))
    return root, ref_root, batch, packed


def _run(root, ref_root, batch, *, loss_type, beta, micro, updates=1):
    cfg = load_config(None, ["--grpo.micro_batch_size", str(micro), "--grpo.prompts_per_step", "1",
                             "--grpo.samples_per_prompt", str(len(LENS)), "--grpo.beta", str(beta),
                             "--grpo.loss_type", loss_type, "--grpo.updates_per_rollout", str(updates),
                             "--rollout.temperature", str(TEMPERATURE), "--rollout.max_new_tokens", str(MAX_NEW)])
    grads = []

    def clip_and_step():
        grads.append([p.grad.clone() for p in root.parameters()])
        return 0.0

    metrics = train_on_batch(cfg, root, ref_root, batch, clip_and_step, torch.optim.SGD(root.parameters(), lr=0.0), 1)
    return metrics, grads


def _expected(root, ref_root, batch, packed, *, loss_type, beta, old_logps):
    """One full-batch call: dropped samples masked out, dapo/bnpo divided by the kept tokens."""
    keep = torch.tensor(KEEP, dtype=torch.float64)
    mask = packed.mask * keep[:, None].to(packed.mask.dtype)
    kept_tokens = float(sum(n for n, k in zip(LENS, KEEP, strict=True) if k))
    ref = None
    if ref_root is not None:
        with torch.no_grad():
            ref = ref_root(packed, mode="logps", temperature=TEMPERATURE)
    root.zero_grad(set_to_none=True)
    full = type(packed)(packed.input_ids, packed.cu_seqlens, packed.max_seqlen, packed.gather_index,
                        packed.completion_ids, mask)
    loss, m = root(full, mode="loss", advantages=batch.advantages, old_logps=old_logps, ref_logps=ref, beta=beta,
                   eps_low=0.2, eps_high=0.2, delta=None, temperature=TEMPERATURE,
                   loss_type="dapo" if loss_type == "bnpo" else loss_type,
                   max_completion_length=MAX_NEW, normalizer=kept_tokens if loss_type in ("dapo", "bnpo") else None)
    loss.backward()
    grads = [p.grad.clone() for p in root.parameters()]
    root.zero_grad(set_to_none=True)
    return loss.item(), {k: v.item() for k, v in m.items()}, grads


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("micro", [3, 8])
def test_micro_batched_update_equals_one_full_batch_call(loss_type, micro, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    beta = 0.04
    root, ref_root, batch, packed = _setup(beta)
    metrics, grads = _run(root, ref_root, batch, loss_type=loss_type, beta=beta, micro=micro)
    old = pad_rows(batch.rollout_logps, packed.completion_ids.shape[1])  # one update: the rollout's log-probs
    loss, m, want = _expected(root, ref_root, batch, packed, loss_type=loss_type, beta=beta, old_logps=old)
    assert len(grads) == 1
    assert any(g.abs().max() > 0 for g in want)
    for got, exp in zip(grads[0], want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-9, abs=1e-12)
    assert metrics["active_tokens"] == sum(n for n, k in zip(LENS, KEEP, strict=True) if k)
    assert m["clip_frac"] > 0  # the test exercises the clipped branch
    for key in ("kl", "clip_frac", "entropy"):
        assert metrics[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key


def test_two_updates_freeze_pi_old_from_the_policy_not_the_rollout(monkeypatch):
    """updates_per_rollout > 1: pi_old is the policy's own log-probs at this temperature, computed once."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    root, _, batch, packed = _setup(0.0)
    metrics, grads = _run(root, None, batch, loss_type="dapo", beta=0.0, micro=3, updates=2)
    with torch.no_grad():
        old = root(packed, mode="logps", temperature=TEMPERATURE)
    loss, m, want = _expected(root, None, batch, packed, loss_type="dapo", beta=0.0, old_logps=old)
    assert len(grads) == 2 and "kl" not in metrics
    for update in grads:  # lr 0: both updates see the same weights
        for got, exp in zip(update, want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-9, abs=1e-12)
    assert m["clip_frac"] == 0.0 and metrics["clip_frac"] == 0.0  # ratio exactly 1


class _NanFirstUpdate(torch.nn.Module):
    """The policy, whose loss is NaN for the first ``n`` loss calls (one update's micro-batches)."""

    def __init__(self, inner, n):
        super().__init__()
        self.inner, self.left = inner, n

    def forward(self, batch, *, mode="loss", **kw):
        out = self.inner(batch, mode=mode, **kw)
        if mode == "loss" and self.left > 0:
            self.left -= 1
            return out[0] * float("nan"), out[1]
        return out


def test_a_skipped_non_finite_update_leaves_no_gradient_behind(monkeypatch):
    """The NaN gradients of a skipped update must not leak into the next update of the same rollout batch."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    inner, _, batch, packed = _setup(0.0)
    flaky = _NanFirstUpdate(inner, n=3)  # micro-batch size 3 over 8 samples: 3 micro-batches
    metrics, grads = _run(flaky, None, batch, loss_type="dapo", beta=0.0, micro=3, updates=2)
    assert metrics["skipped_nonfinite"] == 1 and len(grads) == 1
    with torch.no_grad():
        old = inner(packed, mode="logps", temperature=TEMPERATURE)
    _, _, want = _expected(inner, None, batch, packed, loss_type="dapo", beta=0.0, old_logps=old)
    for got, exp in zip(grads[0], want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-12)


def test_an_update_whose_gradient_overflows_counts_as_skipped(monkeypatch):
    """A finite loss whose backward overflows: clip_and_step keeps the weights (non-finite norm), and that update
    was not counted, so the trainer stepped the LR schedule for it and never aborted (grad_norm NaN every step)."""
    from r1fast.parallelize import clip_and_step
    from r1fast.train import _updated

    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    root, _, batch, _ = _setup(0.0)
    first = next(root.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # the loss itself stays finite
    cfg = load_config(None, ["--grpo.micro_batch_size", "3", "--grpo.prompts_per_step", "1", "--grpo.samples_per_prompt",
                             str(len(LENS)), "--grpo.beta", "0", "--grpo.loss_type", "dapo", "--grpo.updates_per_rollout",
                             "2", "--rollout.temperature", str(TEMPERATURE), "--rollout.max_new_tokens", str(MAX_NEW)])
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in root.parameters()]
    metrics = train_on_batch(cfg, root, None, batch, lambda: clip_and_step(root, optimizer, 1.0, False), optimizer, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, root.parameters(), strict=True))
    assert metrics["skipped_nonfinite"] == 2 and metrics["grad_norm"] != metrics["grad_norm"]  # NaN: no update
    assert not _updated(metrics, 2)  # so the trainer leaves the LR schedule where it was
