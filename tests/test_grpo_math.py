"""Advantages, masks, overlong penalty and the dapo normalizer (single process and 2 gloo ranks)."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import r1fast.grpo
import r1fast.kernels as K
from r1fast.grpo import (
    dapo_normalizer,
    dynamic_sampling_mask,
    equal_reward_groups,
    global_active_tokens,
    group_advantages,
    grpo_loss,
    overlong_filter_mask,
    soft_overlong_penalty,
)


def _loop_advantages(rewards, G, scale, eps=1e-4):
    """fp64 reference with Python loops over groups (unbiased stds)."""
    r = [float(x) for x in rewards.flatten()]
    out = []
    n = len(r)
    batch_mean = sum(r) / n
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in r) / (n - 1))
    for g in range(0, n, G):
        grp = r[g:g + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for x in grp:
            out.append({"group": (x - mean) / (std + eps), "batch": (x - mean) / (batch_std + eps), "none": x - mean}[scale])
    return torch.tensor(out, dtype=torch.float64).reshape(rewards.shape)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("P,G", [(5, 3), (1, 2), (3, 7)])
def test_group_advantages_match_loop_reference(scale, P, G):
    rewards = torch.randn(P * G, dtype=torch.float32)
    rewards[:G] = 1.0  # one constant group: zero advantage, never NaN
    adv = group_advantages(rewards, G, scale_rewards=scale)
    ref = _loop_advantages(rewards.double(), G, scale)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), ref, rtol=1e-6, atol=1e-6)
    assert (adv[:G] == 0).all()
    # [P, G] input keeps its shape and values.
    adv2 = group_advantages(rewards.reshape(P, G), G, scale_rewards=scale)
    assert adv2.shape == (P, G) and torch.equal(adv2.flatten(), adv)


def test_group_advantage_exact_formula():
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0])  # mean 0.75, unbiased std 0.5
    adv = group_advantages(rewards, 4)
    expected = torch.tensor([-0.75, 0.25, 0.25, 0.25], dtype=torch.float64) / (0.5 + 1e-4)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-7, atol=0)
    torch.testing.assert_close(group_advantages(rewards, 4, scale_rewards="none"), torch.tensor([-0.75, 0.25, 0.25, 0.25]))


def test_advantage_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="global")


def test_dynamic_sampling_and_overlong_masks():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert equal_reward_groups(rewards, 3).tolist() == [True, False, True]
    assert dynamic_sampling_mask(rewards, 3).tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert dynamic_sampling_mask(rewards.reshape(3, 3), 3).shape == (3, 3)
    truncated = torch.tensor([False, True, False])
    assert overlong_filter_mask(truncated).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter_mask(torch.tensor([0, 1]))


def test_soft_overlong_penalty():
    lengths = torch.tensor([0, 10, 12, 13, 14, 16, 20])
    got = soft_overlong_penalty(lengths, max_len=16, cache_len=4)  # ramp over 12 < L <= 16
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_penalty(lengths, max_len=16, cache_len=0)


def test_active_tokens_and_normalizer_single_process():
    micro = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(0, 3)]
    assert float(global_active_tokens(micro)) == 6.0
    assert dapo_normalizer(micro) == 6.0
    assert dapo_normalizer([torch.zeros(2, 3)]) == 1.0  # all masked: a finite, zero loss
    with pytest.raises(ValueError, match="masks"):
        global_active_tokens([])


def _two_rank_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)
        rewards = torch.randn(4 * 3)
        masks = [(torch.rand(2, 5 + rank) > 0.4).float(), (torch.rand(3, 5 + rank) > 0.4).float()]
        adv = group_advantages(rewards, 3, scale_rewards="batch")
        normalizer = dapo_normalizer(masks)
        normalizer_sum = dapo_normalizer(masks, grads_averaged_over_ranks=False)
        # A toy dapo objective: per-token loss w * x; each rank sums micro-batch losses over the
        # normalizer, gradients are averaged over ranks as FSDP/DDP do.
        w = torch.ones((), requires_grad=True)
        xs = [torch.rand(m.shape) for m in masks]
        loss = sum((w * x * m).sum() / normalizer for x, m in zip(xs, masks, strict=True))
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= world
        results[rank] = {"rewards": rewards, "masks": masks, "xs": xs, "adv": adv, "normalizer": normalizer,
                         "normalizer_sum": normalizer_sum, "grad": grad.item()}
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_rank_batch_std_and_dapo_normalizer_equal_one_rank(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = mp.Manager().dict()
    mp.start_processes(_two_rank_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, start_method="spawn")
    r0, r1 = results[0], results[1]
    # Batch-scaled advantages on 2 ranks equal the one-process computation on the whole batch.
    full = group_advantages(torch.cat([r0["rewards"], r1["rewards"]]), 3, scale_rewards="batch")
    torch.testing.assert_close(torch.cat([r0["adv"], r1["adv"]]), full, rtol=1e-6, atol=1e-6)
    total = sum(float(m.sum()) for r in (r0, r1) for m in r["masks"])
    assert r0["normalizer_sum"] == r1["normalizer_sum"] == total
    assert r0["normalizer"] == r1["normalizer"] == total / 2
    # The averaged gradient equals d/dw of sum over all tokens of both ranks / global token count.
    expected = sum(float((x * m).sum()) for r in (r0, r1) for x, m in zip(r["xs"], r["masks"], strict=True)) / total
    assert r0["grad"] == pytest.approx(expected, rel=1e-6)


def test_grpo_loss_folds_sample_mask_and_forwards_kwargs(monkeypatch):
    calls = []

    def fake(hidden, weight, token_ids, mask, advantages, **kwargs):
        calls.append((mask.clone(), kwargs))
        return torch.zeros(()), {}

    monkeypatch.setattr(K, "fused_linear_grpo_loss", fake, raising=False)
    h, w = torch.randn(3, 4, 8), torch.randn(11, 8)
    ids, adv = torch.randint(0, 11, (3, 4)), torch.randn(3)
    keep = torch.tensor([True, False, True])
    grpo_loss(h, w, ids, torch.ones(3, 4), adv, sample_mask=keep, beta=0.04, loss_type="dapo", normalizer=7.0)
    grpo_loss(h, w, ids, torch.ones(3, 4, dtype=torch.bool), adv, sample_mask=keep.float())
    grpo_loss(h, w, ids, torch.ones(3, 4), adv)
    assert calls[0][0].tolist() == [[1.0] * 4, [0.0] * 4, [1.0] * 4]
    assert calls[0][1] == {"beta": 0.04, "loss_type": "dapo", "normalizer": 7.0}
    assert calls[1][0].dtype == torch.bool and calls[1][0].tolist() == [[True] * 4, [False] * 4, [True] * 4]
    assert calls[2][0].tolist() == [[1.0] * 4] * 3 and calls[2][1] == {}
    with pytest.raises(ValueError, match="sample_mask"):
        grpo_loss(h, w, ids, torch.ones(3, 4), adv, sample_mask=torch.ones(4))


def test_grpo_loss_with_sample_mask_equals_masked_call():
    pytest.importorskip("r1fast.kernels.ref_grpo_loss", reason="GRPO loss reference not written yet")
    from r1fast.kernels.reference import fused_linear_grpo_loss as ref_loss

    h = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 16, dtype=torch.float64)
    ids, adv = torch.randint(0, 13, (3, 5)), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 5)
    keep = torch.tensor([True, False, True])
    loss, _ = grpo_loss(h, w, ids, mask, adv, sample_mask=keep, loss_type="bnpo")
    expected, _ = ref_loss(h, w, ids, mask * keep[:, None], adv, loss_type="bnpo")
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_skipped_samples_enter_no_statistic_and_get_zero_advantage(scale):
    """A reward that skipped a sample (unparsable gold answer) scores it a stand-in 0: with ``valid`` the
    means and stds are those of the valid samples alone (a skipped prompt in the batch moved the others'
    batch-scaled advantages from +-0.707 to +-0.9998)."""
    G = 4
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0,  0.0, 0.5, 0.0, 1.0,  0.0, 0.0, 0.0, 0.0,  3.0, 1.0, 2.0, 0.0])
    valid = torch.tensor([True] * 4 + [True, False, True, True] + [False] * 4 + [True, False, False, False])
    adv = group_advantages(rewards, G, scale_rewards=scale, valid=valid)
    r = [float(x) for x in rewards]
    kept = [x for x, ok in zip(r, valid.tolist(), strict=True) if ok]
    batch_mean = sum(kept) / len(kept)
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in kept) / (len(kept) - 1))
    want = []
    for g in range(0, len(r), G):
        grp = [x for x, ok in zip(r[g:g + G], valid[g:g + G].tolist(), strict=True) if ok]
        mean = sum(grp) / max(len(grp), 1)
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (len(grp) - 1)) if len(grp) > 1 else 0.0
        for x, ok in zip(r[g:g + G], valid[g:g + G].tolist(), strict=True):
            centered = x - mean if ok else 0.0
            want.append({"group": centered / (std + 1e-4), "batch": centered / (batch_std + 1e-4),
                         "none": centered}[scale])
    torch.testing.assert_close(adv.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # all valid: the same bits as without the mask
    assert torch.equal(group_advantages(rewards, G, scale_rewards=scale, valid=torch.ones(16, dtype=torch.bool)),
                       group_advantages(rewards, G, scale_rewards=scale))
    with pytest.raises(ValueError, match="valid"):
        group_advantages(rewards, G, valid=valid[:4])


def test_soft_overlong_cache_longer_than_max_len_is_refused():
    """cache_len > max_len puts the ramp's start below 0 tokens: even an empty completion was penalized."""
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_penalty(torch.tensor([0, 4]), max_len=4, cache_len=8)
    torch.testing.assert_close(soft_overlong_penalty(torch.tensor([0, 2, 4]), max_len=4, cache_len=4),
                               torch.tensor([0.0, -0.5, -1.0]))


def test_dapo_loss_on_several_ranks_needs_the_global_normalizer(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "fused_linear_grpo_loss", lambda *a, **kw: calls.append(kw) or (torch.zeros(()), {}))
    monkeypatch.setattr(r1fast.grpo, "_distributed", lambda process_group: True)
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    ids, mask, adv = torch.randint(0, 5, (2, 3)), torch.ones(2, 3), torch.randn(2)
    with pytest.raises(ValueError, match="normalizer"):
        grpo_loss(h, w, ids, mask, adv, loss_type="dapo")
    assert not calls
    grpo_loss(h, w, ids, mask, adv, loss_type="dapo", normalizer=3.0)
    grpo_loss(h, w, ids, mask, adv, loss_type="bnpo")  # a per-rank mean needs no global count
    assert [c.get("normalizer") for c in calls] == [3.0, None]
    monkeypatch.setattr(r1fast.grpo, "_distributed", lambda process_group: False)
    grpo_loss(h, w, ids, mask, adv, loss_type="dapo")  # one rank: the local count is the global one
    assert len(calls) == 3
