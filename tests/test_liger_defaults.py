"""r1fast.integrations.liger.FusedLinearGRPOLoss: the constructor defaults Liger 0.8's LigerFusedLinearGRPOLoss has,
and the DAPO normalizer over several processes (Liger: num_items_in_batch / world size, at least 1), against an
fp64 oracle written here."""

import inspect

import pytest
import torch
from test_grpo_loss import dense_oracle

import r1fast.integrations.liger as liger_mod
from r1fast.integrations.liger import FusedLinearGRPOLoss

B, T, H, V = 2, 5, 16, 11

LIGER_DEFAULTS = dict(beta=0.04, compiled=True, use_ref_model=True, chunk_size=1, epsilon_low=0.2, epsilon_high=0.2,
                      loss_type="dapo", max_completion_length=None, importance_sampling_level="token",
                      sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=1.0, delta=None,
                      use_bias_correction_kl=False, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                      vespo_lambda_neg=2.0)


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def test_constructor_defaults_are_liger_08s():
    assert _defaults(FusedLinearGRPOLoss) == LIGER_DEFAULTS


def test_constructor_defaults_agree_with_the_installed_liger():
    """Every argument both constructors take has the same default, for the Liger 0.8 line the drop-in follows (CI
    installs the newest liger-kernel: a later line is compared when the drop-in moves to it)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    from importlib.metadata import version

    if not version("liger-kernel").startswith("0.8."):
        pytest.skip(f"the drop-in follows liger-kernel 0.8; {version('liger-kernel')} is installed")
    ours, theirs = _defaults(FusedLinearGRPOLoss), _defaults(liger.LigerFusedLinearGRPOLoss)
    shared = ours.keys() & theirs.keys()
    assert "beta" in shared and "loss_type" in shared
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.3])
    return hidden, weight, ids, mask, adv


def _logps64(hidden, weight, ids):
    logits = hidden.double() @ weight.double().T
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]


def _oracle(hidden, weight, ids, mask, adv, old, ref, *, beta, normalizer):
    """Token-level dapo in fp64 (test_grpo_loss.dense_oracle, TRL's formula), temperature 1."""
    loss, _, _, _ = dense_oracle(hidden.double(), weight.double(), None, ids, mask, adv.double(),
                                 old=None if old is None else old.double(), ref_lp=None if ref is None else ref.double(),
                                 beta=beta, temperature=1.0, loss_type="dapo", normalizer=normalizer)
    return loss


def _call(module, hidden, weight, ids, mask, adv, old, ref, **kw):
    with torch.no_grad():
        loss, metrics = module(hidden, weight, ids, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref, **kw)
    return loss.double(), metrics


def test_default_module_is_dapo_with_beta_004_and_symmetric_clip_0_2():
    hidden, weight, ids, mask, adv = _inputs()
    logp = _logps64(hidden, weight, ids).float()
    # old log-probs away from the current ones by up to +-0.5: ratios from ~0.6 to ~1.6 clip at 0.8 / 1.2 (not 1.28)
    old = logp + torch.linspace(-0.5, 0.5, B * T).reshape(B, T)
    ref = logp + 0.3
    loss, metrics = _call(FusedLinearGRPOLoss(), hidden, weight, ids, mask, adv, old, ref)
    assert len(metrics) == 2  # (kl, clip_ratio): beta != 0 by default
    expect = _oracle(hidden, weight, ids, mask, adv, old, ref, beta=0.04, normalizer=float(mask.sum()))
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world,num_items,expect_norm", [
    (2, 12, 6.0),  # num_items_in_batch / world
    (4, 2, 1.0),  # 0.5, clamped at 1
    (3, None, None),  # no num_items: the mask's count summed over the ranks / world
])
def test_dapo_normalizer_over_several_processes(monkeypatch, world, num_items, expect_norm):
    hidden, weight, ids, mask, adv = _inputs(1)
    monkeypatch.setattr(liger_mod, "_world_size", lambda: world)
    if num_items is None:  # the mask's count is summed over ranks: every rank holds this mask here
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.mul_(world))
        expect_norm = float(mask.sum())  # world * count / world
    loss, _ = _call(FusedLinearGRPOLoss(beta=0.0), hidden, weight, ids, mask, adv, None, None,
                    num_items_in_batch=num_items)
    expect = _oracle(hidden, weight, ids, mask, adv, None, None, beta=0.0, normalizer=expect_norm)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(B, T + 1), (B, T, 1), (B + 1,), (B, 2)])
def test_vllm_is_ratio_of_another_shape_is_a_value_error_naming_it(shape):
    hidden, weight, ids, mask, adv = _inputs()
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        FusedLinearGRPOLoss(beta=0.0)(hidden, weight, ids, mask, adv, vllm_is_ratio=torch.ones(shape))
