"""r1fast.integrations.liger.FusedLinearGRPOLoss: Liger's interface on r1fast's fused loss.

The equality test runs Liger-Kernel's own ``LigerFusedLinearGRPOLoss`` (compiled=False, its torch
path works on CPU) when liger_kernel is importable, and is skipped otherwise. Both are checked against
the dense fp64 oracle of test_grpo_loss, each bounded by twice the other's error, so the test fails
if either implementation's semantics drift.
"""

import pytest
import torch
from conftest import assert_close_to_ref
from test_grpo_loss import TEMPERATURE, dense_oracle, make_inputs

from r1fast.integrations.liger import FusedLinearGRPOLoss
from r1fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs

B, T = 3, 37


def _call(module, inp, dtype=torch.float32, **kw):
    h = inp["hidden"].to(dtype).detach().clone().requires_grad_(True)
    w = inp["weight"].to(dtype).detach().clone().requires_grad_(True)
    b = None if inp["bias"] is None else inp["bias"].to(dtype).detach().clone().requires_grad_(True)
    loss, metrics = module(h, w, inp["ids"], inp["mask"].long(), inp["adv"].to(dtype), bias=b, **kw)
    loss.backward()
    return loss, metrics, [h.grad, w.grad, None if b is None else b.grad]


def _oracle(inp, *, loss_type, level, beta, delta, old, ref_lp, is_ratio, normalizer=None, max_len=None):
    h64, w64 = inp["hidden"].double().requires_grad_(True), inp["weight"].double().requires_grad_(True)
    b64 = None if inp["bias"] is None else inp["bias"].double().requires_grad_(True)
    loss, metrics, _, _ = dense_oracle(
        h64, w64, b64, inp["ids"], inp["mask"], inp["adv"].double(), old=None if old is None else old.double(),
        ref_lp=None if ref_lp is None else ref_lp.double(), is_ratio=None if is_ratio is None else is_ratio.double(),
        beta=beta, delta=delta, loss_type=loss_type, level=level, normalizer=normalizer,
        max_len=max_len or 40)
    loss.backward()
    return loss, metrics, [h64.grad, w64.grad, None if b64 is None else b64.grad]


LIGER_CASES = [
    # loss_type, level, beta, delta, vllm_is_ratio layout, ref from ref_input, num_items_in_batch
    ("dapo", "token", 0.04, None, "BT", False, None),
    ("dapo", "sequence", 0.0, 1.5, None, False, 150),
    ("grpo", "token", 0.04, 1.5, "B", True, None),
    ("bnpo", "sequence", 0.04, None, "B1", False, None),
    ("dr_grpo", "token", 0.0, None, None, False, None),
]


@pytest.mark.parametrize("loss_type,level,beta,delta,ratio_layout,ref_from_input,num_items", LIGER_CASES)
def test_matches_liger_kernel(loss_type, level, beta, delta, ratio_layout, ref_from_input, num_items):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel not installed")
    inp = make_inputs()
    ratio = {"BT": inp["is_ratio"], "B": inp["is_ratio"][:, 0], "B1": inp["is_ratio"][:, :1], None: None}[ratio_layout]
    ref_kw = {"ref_per_token_logps": inp["ref"]}
    ref_lp = inp["ref"]
    if ref_from_input:  # the reference model's hidden states and head: r1fast computes its log-probs
        ref_hidden, ref_weight = inp["hidden"] + 0.05 * torch.randn_like(inp["hidden"]), inp["weight"] * 0.9
        ref_kw = {"ref_input": ref_hidden, "ref_weight": ref_weight, "ref_bias": inp["bias"]}
        ref_lp = dense_oracle(ref_hidden.double(), ref_weight.double(), inp["bias"].double(), inp["ids"],
                              inp["mask"], inp["adv"].double())[2].float()
    args = dict(beta=beta, loss_type=loss_type, importance_sampling_level=level, delta=delta, temperature=TEMPERATURE,
                max_completion_length=40 if loss_type == "dr_grpo" else None)
    kw = dict(old_per_token_logps=inp["old"], vllm_is_ratio=ratio, num_items_in_batch=num_items, **ref_kw)
    ours = _call(FusedLinearGRPOLoss(**args), inp, **kw)
    theirs = _call(liger.LigerFusedLinearGRPOLoss(compiled=False, **args), inp, **kw)
    is_ratio = None if ratio is None else (ratio if ratio.dim() == 2 else ratio[:, None]).expand(B, T)
    oracle = _oracle(inp, loss_type=loss_type, level=level, beta=beta, delta=delta, old=inp["old"], ref_lp=ref_lp,
                     is_ratio=is_ratio, normalizer=num_items)
    assert len(ours[1]) == len(theirs[1]) == (2 if beta else 1)
    pairs = [("loss", ours[0], theirs[0], oracle[0]), ("clip_ratio", ours[1][-1], theirs[1][-1],
                                                       oracle[1]["clip_frac"])]
    if beta:
        pairs.append(("kl", ours[1][0], theirs[1][0], oracle[1]["kl"]))
    pairs += [(n, a, b, c) for n, a, b, c in zip(("hidden.grad", "weight.grad", "bias.grad"), ours[2], theirs[2],
                                                  oracle[2])]
    for name, a, b, c in pairs:
        assert_close_to_ref(a, c, b, name=f"r1fast {name} (bound: Liger's error)")
        assert_close_to_ref(b, c, a, name=f"liger {name} (bound: r1fast's error)")


def test_metrics_tuple_and_ref_from_input_without_liger():
    """TRL reads metrics[0] as KL when beta != 0 and metrics[-1] as the clip ratio."""
    inp = make_inputs()
    ref_hidden = inp["hidden"] * 0.9
    module = FusedLinearGRPOLoss(beta=0.04, loss_type="bnpo", temperature=TEMPERATURE)
    loss, metrics = _call(module, inp, old_per_token_logps=inp["old"], ref_input=ref_hidden,
                          ref_weight=inp["weight"], ref_bias=inp["bias"])[:2]
    ref_lp = fused_linear_logprobs(ref_hidden, inp["weight"], inp["ids"], bias=inp["bias"], temperature=TEMPERATURE)
    direct, direct_metrics = fused_linear_grpo_loss(
        inp["hidden"], inp["weight"], inp["ids"], inp["mask"], inp["adv"], old_logps=inp["old"], ref_logps=ref_lp,
        bias=inp["bias"], beta=0.04, temperature=TEMPERATURE, loss_type="bnpo")
    assert len(metrics) == 2
    assert torch.equal(loss.detach(), direct) and torch.equal(metrics[0], direct_metrics["kl"])
    assert torch.equal(metrics[1], direct_metrics["clip_frac"])
    assert "entropy" in module.last_metrics
    no_kl = FusedLinearGRPOLoss(beta=0.0, loss_type="grpo", temperature=TEMPERATURE)
    assert len(_call(no_kl, inp)[1]) == 1


def test_padding_ids_with_ref_from_input():
    """-100 in masked positions (TRL's padding) with beta > 0 and ref_input/ref_weight: accepted, and
    the same result as with any valid id there (the ref log-probs used to be range-checked unmasked)."""
    inp = make_inputs(t=9, v=33, h=8)
    module = FusedLinearGRPOLoss(beta=0.04, loss_type="bnpo", temperature=TEMPERATURE)
    kw = dict(old_per_token_logps=inp["old"], ref_input=inp["hidden"] * 0.9, ref_weight=inp["weight"],
              ref_bias=inp["bias"])
    clean = _call(module, inp, **kw)
    padded = _call(module, dict(inp, ids=inp["ids"].masked_fill(~inp["mask"], -100)), **kw)
    assert torch.equal(padded[0], clean[0]) and torch.equal(padded[1][0], clean[1][0])
    for g_padded, g_clean in zip(padded[2], clean[2], strict=True):
        assert torch.equal(g_padded, g_clean)


def test_use_ref_model_false_means_zero_kl():
    inp = make_inputs()
    module = FusedLinearGRPOLoss(beta=0.04, use_ref_model=False, loss_type="dapo", temperature=TEMPERATURE)
    loss, metrics, _ = _call(module, inp, old_per_token_logps=inp["old"])
    plain = FusedLinearGRPOLoss(beta=0.0, loss_type="dapo", temperature=TEMPERATURE)
    loss0, metrics0, _ = _call(plain, inp, old_per_token_logps=inp["old"])
    assert metrics[0].item() == 0.0 and torch.equal(loss, loss0) and torch.equal(metrics[1], metrics0[0])


@pytest.mark.parametrize("kwargs,argument", [
    ({"loss_type": "cispo"}, "loss_type"),
    ({"use_bias_correction_kl": True}, "use_bias_correction_kl"),
    ({"delta": 0.0}, "delta"),
    ({"importance_sampling_level": "sentence"}, "importance_sampling_level"),
])
def test_rejects_unsupported_options(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        FusedLinearGRPOLoss(**kwargs)


def test_missing_reference_and_bad_ratio_shape():
    inp = make_inputs(with_bias=False, t=5, v=17, h=8)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        _call(FusedLinearGRPOLoss(beta=0.04), inp)
    with pytest.raises(ValueError, match="vllm_is_ratio"):
        _call(FusedLinearGRPOLoss(beta=0.0), inp, vllm_is_ratio=torch.ones(B, 3))


def test_fp32_masters_under_bf16_activations_and_constants_that_require_grad_are_taken_as_liger_takes_them():
    """Liger computes with weight.to(hidden.dtype) and treats advantages / given log-probs as constants; the
    drop-in refused an fp32 lm_head under bf16 hidden states and tensors that require grad (ValueError)."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 8), torch.randn(11, 8) * 0.5
    ids, mask = torch.randint(0, 11, (2, 4)), torch.ones(2, 4, dtype=torch.long)
    adv, ref = torch.randn(2).requires_grad_(True), (torch.randn(2, 4) - 2).requires_grad_(True)
    w32 = w.clone().requires_grad_(True)
    loss, _ = FusedLinearGRPOLoss(beta=0.04)(x.bfloat16().requires_grad_(True), w32, ids, mask, adv,
                                             ref_per_token_logps=ref, old_per_token_logps=ref.detach() + 0.1)
    loss.backward()
    same, _ = FusedLinearGRPOLoss(beta=0.04)(x.bfloat16(), w.bfloat16(), ids, mask, adv.detach(),
                                             ref_per_token_logps=ref.detach(), old_per_token_logps=ref.detach() + 0.1)
    assert torch.equal(loss, same) and w32.grad.dtype == torch.float32 and torch.isfinite(w32.grad).all()
    assert adv.grad is None and ref.grad is None  # constants, as in Liger
    ref_head, _ = FusedLinearGRPOLoss(beta=0.04)(x, w, ids, mask, adv, ref_input=x.bfloat16(), ref_weight=w + 0.01)
    assert torch.isfinite(ref_head)
    with pytest.raises(ValueError, match="beta, epsilon_low and epsilon_high >= 0"):
        FusedLinearGRPOLoss(epsilon_high=-0.1)
