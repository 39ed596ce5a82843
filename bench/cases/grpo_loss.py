"""Benchmark cases for kernels/grpo_loss.py: GRPO loss from hidden states and log-probs only.

Shapes from ANCHORS.md ("GRPO loss from hidden states"): A = 16 x 1024 tokens, H 3584, V 152,064;
B = 8 x 4096 tokens, H 1536, V 151,936; bf16, bnpo, k3 KL on (beta 0.04), temperature 1, every
token active. "fwd_bwd" times loss + gradients of hidden and weight (``torch.autograd.grad``, so no
``.grad`` buffer outlives a call; the weight gradient is part of the extra memory), floor 6·N·H·V;
"logprobs" times log-probs only, floor 2·N·H·V. Nothing touches CUDA before ``make_inputs`` runs.

Peers: PyTorch eager (fp32 log_softmax on materialized logits), TRL-style selective log-softmax
(logits in bf16, log_softmax one sequence at a time), Liger-Kernel's chunked
``LigerFusedLinearGRPOLoss`` (compiled=False: compiled=True crashed at shape B, see ANCHORS.md) and
Liger's Triton ``triton_grpo_loss`` / ``fused_selective_log_softmax`` on materialized logits.
"""

from __future__ import annotations

import importlib.util

import torch

from bench.registry import Case, Impl, register

SHAPES = {
    "A": dict(B=16, T=1024, H=3584, V=152064),
    "B": dict(B=8, T=4096, H=1536, V=151936),
}
BETA = 0.04
LOSS_TYPE = "bnpo"
# ANCHORS.md's H100 times (s) per shape, for the run's time plan; r1fast is estimated from its floor.
ANCHOR_FWD_BWD_S = {
    "A": {"torch-eager": 0.1276, "trl-selective": 0.1452, "liger-fused-linear": 1.094, "liger-triton": 0.0952},
    "B": {"torch-eager": 0.1758, "trl-selective": 0.2128, "liger-fused-linear": 0.954, "liger-triton": 0.0916},
}


def _liger_available():
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    return None


def _make_inputs(B, T, H, V, requires_grad):
    """Fresh bf16 inputs on CUDA; log-probs near -log V like an untrained head's."""
    dev = "cuda"
    hidden = torch.randn(B, T, H, device=dev, dtype=torch.bfloat16).requires_grad_(requires_grad)
    weight = (torch.randn(V, H, device=dev, dtype=torch.bfloat16) * H**-0.5).requires_grad_(requires_grad)
    ids = torch.randint(0, V, (B, T), device=dev)
    mask = torch.ones(B, T, device=dev, dtype=torch.int64)
    adv = torch.randn(B, device=dev, dtype=torch.float32)
    base = -torch.log(torch.tensor(float(V)))
    old = (base + 0.1 * torch.randn(B, T, device=dev)).float()
    ref = (base + 0.1 * torch.randn(B, T, device=dev)).float()
    return hidden, weight, ids, mask, adv, old, ref


def _trl_loss(logp, mask, adv, old, ref):
    """TRL GRPOTrainer's bnpo loss with k3 KL, on per-token log-probs."""
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    per_token = -torch.min(ratio * adv[:, None], clipped * adv[:, None])
    per_token = per_token + BETA * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


# -- log-prob implementations: (hidden, weight, ids) -> [B, T] fp32 ---------------------------


def _logprobs_r1fast(hidden, weight, ids):
    from r1fast.kernels import fused_linear_logprobs

    return fused_linear_logprobs(hidden, weight, ids)


def _logprobs_eager(hidden, weight, ids):
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _logprobs_trl_selective(hidden, weight, ids):
    logits = hidden @ weight.t()  # bf16, like a model's lm_head output
    rows = []
    for row_logits, row_ids in zip(logits, ids, strict=False):  # TRL's bf16 path: one sequence at a time
        row_lp = torch.log_softmax(row_logits.float(), -1)
        rows.append(row_lp.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def _logprobs_liger_triton(hidden, weight, ids):
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

    padded = torch.cat([hidden, hidden[:, :1]], 1)  # Liger expects logits for T + 1 positions
    return fused_selective_log_softmax(padded @ weight.t(), ids, temperature=1.0)


# -- fwd + bwd implementations: (hidden, weight, ids, mask, adv, old, ref) -> grads ------------


def _fwd_bwd_r1fast(hidden, weight, ids, mask, adv, old, ref):
    from r1fast.kernels import fused_linear_grpo_loss

    loss, _ = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=ref, beta=BETA,
                                     loss_type=LOSS_TYPE)
    return torch.autograd.grad(loss, (hidden, weight))


def _fwd_bwd_from_logprobs(logprob_fn):
    def run(hidden, weight, ids, mask, adv, old, ref):
        loss = _trl_loss(logprob_fn(hidden, weight, ids), mask, adv, old, ref)
        return torch.autograd.grad(loss, (hidden, weight))

    return run


def _fwd_bwd_liger_fused(hidden, weight, ids, mask, adv, old, ref):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, loss_type=LOSS_TYPE)
    loss, _ = module(hidden, weight, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    return torch.autograd.grad(loss, (hidden, weight))


def _fwd_bwd_liger_triton(hidden, weight, ids, mask, adv, old, ref):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    padded = torch.cat([hidden, hidden[:, :1]], 1)  # Liger expects logits for T + 1 positions
    loss, _ = triton_grpo_loss(padded @ weight.t(), old, ref, ids, adv, mask, temperature=1.0, beta=BETA,
                               eps_low=0.2, eps_high=0.2, loss_type=LOSS_TYPE, reduce=True)
    return torch.autograd.grad(loss, (hidden, weight))


@register("grpo_loss")
def cases(quick):
    for tag, s in SHAPES.items():
        n, h, v = s["B"] * s["T"], s["H"], s["V"]
        shape = {"N": n, "H": h, "V": v, "B": s["B"], "T": s["T"], "dtype": "bf16"}
        input_bytes = 2 * (n * h + v * h) + 8 * n * 4
        yield Case(
            name=f"grpo_loss.fwd_bwd.{tag}",
            shape={**shape, "loss_type": LOSS_TYPE, "beta": BETA},
            make_inputs=lambda s=s: _make_inputs(**s, requires_grad=True),
            impls=[
                Impl("r1fast", _fwd_bwd_r1fast, ours=True),
                Impl("torch-eager", _fwd_bwd_from_logprobs(_logprobs_eager)),
                Impl("trl-selective", _fwd_bwd_from_logprobs(_logprobs_trl_selective)),
                Impl("liger-fused-linear", _fwd_bwd_liger_fused, available=_liger_available),
                Impl("liger-triton", _fwd_bwd_liger_triton, available=_liger_available),
            ],
            flops=6 * n * h * v,
            ceiling="bf16_matmul",
            quick=tag == "A",
            input_bytes=input_bytes,
            notes="extra peak includes the weight gradient (V·H bf16) and the hidden gradient",
            est_call_s=ANCHOR_FWD_BWD_S[tag],
        )
        yield Case(
            name=f"grpo_loss.logprobs.{tag}",
            shape=shape,
            make_inputs=lambda s=s: _make_inputs(**s, requires_grad=False)[:3],
            impls=[
                Impl("r1fast", _logprobs_r1fast, ours=True),
                Impl("torch-eager", _logprobs_eager),
                Impl("trl-selective", _logprobs_trl_selective),
                Impl("liger-triton", _logprobs_liger_triton, available=_liger_available),
            ],
            flops=2 * n * h * v,
            ceiling="bf16_matmul",
            quick=tag == "A",
            input_bytes=2 * (n * h + v * h) + 8 * n,
            notes="no autograd; output fp32 [B, T]",
        )
