"""``FusedLinearGRPOLoss``: a drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (0.8.x).

Same constructor arguments, same ``forward`` signature and the same return value
``(loss, metrics)`` with ``metrics`` a tuple ``(kl, clip_ratio)`` when ``beta != 0`` else
``(clip_ratio,)`` -- the shape TRL's GRPOTrainer indexes (``metrics[0]`` is the KL when beta != 0,
``metrics[-1]`` the clip ratio). The work is done by ``r1fast.kernels.fused_linear_grpo_loss``; the
masked-mean entropy it also computes is kept in ``last_metrics`` (a dict) after each call.

Mapped: beta, use_ref_model, epsilon_low/high, loss_type in {grpo, bnpo, dr_grpo, dapo},
max_completion_length, importance_sampling_level, temperature, delta, vllm_is_ratio
((B, T), (B, 1) or (B,)), num_items_in_batch (dapo normalizer, divided by the world size like Liger).
Accepted and ignored (they tune Liger's own implementation): compiled, chunk_size.
Rejected with ValueError: loss types cispo/sapo/vespo/luspo and use_bias_correction_kl=True
(r1fast's objective does not implement them), and beta or epsilon_low/high below 0 (Liger computes with
them; r1fast's objective refuses them, here in the constructor rather than at the first forward); the
SAPO/VESPO shape parameters are stored for signature compatibility and only validated. As in Liger,
lin_weight / bias / ref_weight may be fp32 masters under bf16 activations (cast to the activations' dtype;
the weight gradient comes back in the master's dtype), and advantages and the given log-probs are constants
(detached) even when they require grad.
"""

from __future__ import annotations

import torch

from r1fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _dapo_normalizer(mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """Liger's per-process DAPO normalizer: the global active-token count / world size, at least 1."""
    world = _world_size()
    if num_items_in_batch is not None:
        total = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
    else:
        total = mask.to(torch.float32).sum()
        if world > 1:
            total = total.clone()
            torch.distributed.all_reduce(total)
    return (total / world).clamp(min=1.0)


def _expand_is_ratio(ratio, batch: int, seq: int):
    if ratio is None:
        return None
    if ratio.dim() == 1 and ratio.shape[0] == batch:
        ratio = ratio.unsqueeze(-1)
    if ratio.dim() != 2 or ratio.shape[0] != batch or ratio.shape[1] not in (1, seq):
        raise ValueError(
            f"vllm_is_ratio must be ({batch},), ({batch}, 1) or ({batch}, {seq}), got {tuple(ratio.shape)}")
    return ratio.float().expand(batch, seq)


class FusedLinearGRPOLoss(torch.nn.Module):
    """Fused lm_head + GRPO loss with ``LigerFusedLinearGRPOLoss``'s interface (see module docstring)."""

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: int | None = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: float | None = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0):
        super().__init__()
        if loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type {loss_type!r} is not supported by r1fast; use one of {SUPPORTED_LOSS_TYPES}")
        if use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl=True is not supported by r1fast")
        if sapo_temperature_pos <= 0 or sapo_temperature_neg <= 0:
            raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be positive")
        if beta < 0 or epsilon_low < 0 or epsilon_high < 0:
            raise ValueError(f"r1fast needs beta, epsilon_low and epsilon_high >= 0, got {beta}, {epsilon_low}, "
                             f"{epsilon_high}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.last_metrics: dict = {}

    def _reference_logps(self, selected_token_ids, attention_mask, ref_per_token_logps, ref_input, ref_weight,
                         ref_bias):
        if not self.use_ref_model:
            return None  # Liger then uses the policy's own detached log-probs: k3 = 0
        if ref_per_token_logps is not None:
            return ref_per_token_logps.detach().float()
        if ref_input is None or ref_weight is None:
            raise ValueError("use_ref_model=True needs ref_per_token_logps, or ref_input and ref_weight")
        # fused_linear_logprobs range-checks every id, masked or not: padding may hold -100 (any id will
        # do there, the loss never reads a masked position's reference log-prob)
        ids = torch.where(attention_mask.bool(), selected_token_ids, torch.zeros_like(selected_token_ids))
        with torch.no_grad():
            dtype = ref_input.dtype  # an fp32 reference head under bf16 activations, as Liger takes it
            return fused_linear_logprobs(ref_input.detach(), ref_weight.detach().to(dtype), ids,
                                         bias=None if ref_bias is None else ref_bias.detach().to(dtype),
                                         temperature=self.temperature)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        """(loss, metrics): metrics = (kl, clip_ratio) when beta != 0, else (clip_ratio,)."""
        if _input.dim() != 3:
            raise ValueError(f"_input must be [B, T, H], got shape {tuple(_input.shape)}")
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(selected_token_ids.shape):
            raise ValueError(f"attention_mask must be [B, T] like selected_token_ids {tuple(selected_token_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        batch, seq = attention_mask.shape
        ref_logps = None
        if self.beta != 0.0:
            ref_logps = self._reference_logps(selected_token_ids, attention_mask, ref_per_token_logps, ref_input,
                                              ref_weight, ref_bias)
        normalizer = _dapo_normalizer(attention_mask, num_items_in_batch) if self.loss_type == "dapo" else None
        # fp32 masters under bf16 activations are cast as Liger casts them (autograd returns their grads in fp32)
        lin_weight = lin_weight.to(_input.dtype)
        bias = None if bias is None else bias.to(_input.dtype)
        loss, metrics = fused_linear_grpo_loss(
            _input, lin_weight, selected_token_ids, attention_mask, advantages.detach().float(),
            old_logps=None if old_per_token_logps is None else old_per_token_logps.detach().float(), ref_logps=ref_logps,
            bias=bias, beta=self.beta if ref_logps is not None else 0.0, eps_low=self.epsilon_low,
            eps_high=self.epsilon_high, delta=self.delta, temperature=self.temperature, loss_type=self.loss_type,
            importance_level=self.importance_sampling_level, max_completion_length=self.max_completion_length,
            normalizer=normalizer, rollout_is_ratio=_expand_is_ratio(vllm_is_ratio, batch, seq))
        self.last_metrics = metrics
        if self.beta == 0.0:
            return loss, (metrics["clip_frac"],)
        kl = metrics.get("kl", torch.zeros_like(metrics["clip_frac"]))
        return loss, (kl, metrics["clip_frac"])
