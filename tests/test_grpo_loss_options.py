"""GRPO loss options the shared oracle matrix does not reach: asymmetric clipping (DAPO clip-higher), the
delta cap actually binding, and poisoned padding on the reference and on the kernel's sequence-level path.

Inputs are built so the options bind: old log-probs are set from the true log-probs to put each token's
ratio where we want it (far below 1 - eps_low, between the two bounds of an asymmetric range, above delta).
The oracle is test_grpo_loss.dense_oracle (TRL's loss on materialized logits) in fp64.
"""

import pytest
import torch
from test_grpo_loss import dense_oracle

from r1fast.kernels import grpo_loss as fused
from r1fast.kernels import ref_grpo_loss as ref

B, T, H, V = 2, 8, 16, 33


def _inputs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -3:] = False
    adv = torch.tensor([-1.0, 0.7], dtype=torch.float64)
    lp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, ids[..., None])[..., 0]
    # target log-ratios: each kind of token, on both advantage signs
    target = torch.tensor([[-0.5, -0.1, 0.1, 0.22, 0.5, 0.9, -0.3, 0.15],
                           [-0.5, -0.1, 0.1, 0.22, 0.5, 0.9, 0.0, 0.0]], dtype=torch.float64)
    old = lp - target
    return hidden, weight, ids, mask, adv, old


@pytest.mark.parametrize("impl", ["ref", "kernel"])
@pytest.mark.parametrize("eps_low,eps_high,delta", [(0.2, 0.28, None), (0.05, 0.4, None), (0.2, 0.28, 1.5)])
def test_asymmetric_clip_and_delta_match_oracle(impl, eps_low, eps_high, delta):
    hidden, weight, ids, mask, adv, old = _inputs()
    dtype = torch.float64 if impl == "ref" else torch.float32
    fn = ref.fused_linear_grpo_loss if impl == "ref" else fused.fused_linear_grpo_loss
    h = hidden.detach().to(dtype).clone().requires_grad_(True)
    w = weight.to(dtype)
    loss, metrics = fn(h, w, ids, mask, adv.to(dtype), old_logps=old.to(dtype), eps_low=eps_low,
                       eps_high=eps_high, delta=delta, loss_type="bnpo")
    loss.backward()
    h64 = hidden.detach().clone().requires_grad_(True)
    want_loss, want_metrics, _, _ = dense_oracle(h64, weight, None, ids, mask, adv, old=old, eps_low=eps_low,
                                                 eps_high=eps_high, delta=delta, temperature=1.0, loss_type="bnpo")
    want_clip = want_metrics["clip_frac"]
    want_loss.backward()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert abs(loss.item() - want_loss.item()) <= tol * max(1.0, abs(want_loss.item()))
    assert torch.allclose(h.grad.double(), h64.grad, atol=tol, rtol=tol)
    assert metrics["clip_frac"].item() == pytest.approx(want_clip.item(), abs=1e-6)


def test_delta_cap_binds_on_negative_advantage():
    """r = e^0.9 = 2.46 > delta = 1.5 on a negative-advantage token: the loss uses delta, and its gradient is 0."""
    hidden, weight, ids, mask, adv, old = _inputs()
    one = torch.zeros(B, T, dtype=torch.bool)
    one[0, 5] = True
    h = hidden.detach().clone().requires_grad_(True)
    loss, _ = ref.fused_linear_grpo_loss(h, weight, ids, one, adv, old_logps=old, delta=1.5, loss_type="bnpo")
    loss.backward()
    assert loss.item() == pytest.approx(1.5 * 1.0, abs=1e-12)  # -min(1.5 * -1, 1.2 * -1) = 1.5
    assert torch.count_nonzero(h.grad) == 0


@pytest.mark.parametrize("impl", ["ref", "kernel"])
def test_clip_frac_counts_no_clip_where_delta_binds_first(impl):
    """delta = 1.1 < 1 + eps_high: a positive-advantage token with r = e^0.22 or e^0.5 takes the delta branch
    (1.1·A < 1.2·A), not the clipped one, so clip_frac is 0 (the spec's "clipped branch taken", and TRL's
    is_high_clipped on the delta-capped ratio). It used to count them: 0.4."""
    hidden, weight, ids, mask, adv, old = _inputs()
    dtype = torch.float64 if impl == "ref" else torch.float32
    fn = ref.fused_linear_grpo_loss if impl == "ref" else fused.fused_linear_grpo_loss
    only_positive = mask.clone()
    only_positive[0] = False  # row 1 (A = 0.7): log-ratios -0.5, -0.1, 0.1, 0.22, 0.5
    args = (hidden.to(dtype), weight.to(dtype), ids, only_positive, adv.to(dtype))
    _, uncapped = fn(*args, old_logps=old.to(dtype), loss_type="bnpo")
    assert uncapped["clip_frac"].item() == pytest.approx(2 / 5)  # the inputs do clip without delta
    _, capped = fn(*args, old_logps=old.to(dtype), delta=1.1, loss_type="bnpo")
    assert capped["clip_frac"].item() == 0.0


@pytest.mark.parametrize("impl,level", [("ref", "token"), ("ref", "sequence"), ("kernel", "sequence")])
def test_poisoned_padding_in_old_ref_and_ratio_changes_nothing(impl, level):
    """NaN old log-probs / rollout ratios and inf ref log-probs on padded tokens are never used (documented)."""
    hidden, weight, ids, mask, adv, old = _inputs()
    dtype = torch.float64 if impl == "ref" else torch.float32
    fn = ref.fused_linear_grpo_loss if impl == "ref" else fused.fused_linear_grpo_loss
    g = torch.Generator().manual_seed(2)
    ref_lp = (old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    ratio = (0.8 + 0.4 * torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype)
    pad = ~mask

    def run(old_, ref_, ratio_):
        h = hidden.detach().to(dtype).clone().requires_grad_(True)
        loss, metrics = fn(h, weight.to(dtype), ids, mask, adv.to(dtype), old_logps=old_, ref_logps=ref_,
                           rollout_is_ratio=ratio_, beta=0.04, importance_level=level, loss_type="grpo")
        loss.backward()
        return loss.detach(), metrics, h.grad

    clean = run(old.to(dtype), ref_lp, ratio)
    dirty = run(old.to(dtype).masked_fill(pad, float("nan")), ref_lp.masked_fill(pad, float("inf")),
                ratio.masked_fill(pad, float("nan")))
    assert torch.isfinite(clean[0]) and torch.equal(dirty[0], clean[0])
    for key in clean[1]:
        assert torch.equal(dirty[1][key], clean[1][key]), key
    assert torch.equal(dirty[2], clean[2])


@pytest.mark.parametrize("impl", ["ref", "kernel"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_fully_masked_batch_is_zero_for_every_loss_type(impl, loss_type):
    """dapo without a normalizer divides by max(sum m, 1): an all-padding micro-batch is 0, not 0/0 = NaN."""
    hidden, weight, ids, _, adv, old = _inputs()
    dtype = torch.float64 if impl == "ref" else torch.float32
    fn = ref.fused_linear_grpo_loss if impl == "ref" else fused.fused_linear_grpo_loss
    h = hidden.detach().to(dtype).clone().requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    extra = dict(max_completion_length=T) if loss_type == "dr_grpo" else {}
    loss, metrics = fn(h, weight.to(dtype), ids, mask, adv.to(dtype), old_logps=old.to(dtype), loss_type=loss_type,
                       **extra)
    loss.backward()
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in metrics.values())
    assert torch.equal(h.grad, torch.zeros_like(h.grad))
