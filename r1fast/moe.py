"""Mixture of experts: the DeepSeek router, the default grouped expert computation, the MoE FFN module.

Routed experts are stored stacked: ``w_gate_up`` [E, 2*I, H] (gate rows first, then up) and ``w_down``
[E, H, I]. The expert math is an injected function with the signature

    experts_fn(x [T, H], topk_weights [T, k] fp32, topk_ids [T, k] int, w_gate_up, w_down) -> [T, H]

``grouped_experts`` is the default (bf16/fp32, PyTorch). FP8 runs install their function from outside
with ``set_fp8_experts_fn`` (the model never imports kernels); models whose args have ``fp8=True`` use it.

Load balancing is not trained: no auxiliary loss is computed (config.json's ``aux_loss_alpha`` / ``seq_aux`` are
ignored; loading a checkpoint with aux_loss_alpha > 0 warns) and DeepSeek-V3's ``e_score_correction_bias`` is a
buffer that no step updates. RL fine-tuning keeps the router's balance as loaded; a run that drifts far from it
would need one of those mechanisms added. The routing itself follows the code each architecture was trained
with (see ``Router``; ``ModelArgs.transformers_divergence`` names the one config transformers computes otherwise).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_FP8_EXPERTS_FN = None


def set_fp8_experts_fn(fn) -> None:
    """Install the FP8 expert function used by models with ``args.fp8`` (e.g. ``r1fast.kernels.moe_ffn_fp8``)."""
    global _FP8_EXPERTS_FN
    _FP8_EXPERTS_FN = fn


def get_fp8_experts_fn():
    return _FP8_EXPERTS_FN


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    # torch._grouped_mm runs bf16 on Hopper+ only; elsewhere the per-expert loop is the portable path.
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


def grouped_experts(x, topk_weights, topk_ids, w_gate_up, w_down):
    """SwiGLU experts on tokens sorted by expert; weighted sum over each token's k choices in fp32 or wider.

    The sum runs in ``promote_types(x.dtype, float32)``: fp32 for bf16/fp16/fp32 models, fp64 for fp64
    oracle runs (rounding those through fp32 left a ~4e-8 relative error where dense layers are bit-exact).

    On Hopper with bf16 the two GEMMs are single ``torch._grouped_mm`` calls (no host sync); otherwise
    a loop over experts reads the per-expert counts once on the host.
    """
    num_tokens, k = topk_ids.shape
    num_experts, two_i, _ = w_gate_up.shape
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    token_of = order // k
    # scatter_add, not bincount: CUDA's bincount reads max() back to the host, which breaks decode graph capture
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(
        0, flat_ids, torch.ones_like(flat_ids))
    xs = x[token_of]
    if _grouped_mm_usable(x):
        offs = counts.cumsum(0).to(torch.int32)
        gate_up = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs)
        gate, up = gate_up.split(two_i // 2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)
    else:
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = F.linear(xs[start : start + n], w_gate_up[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, w_down[e]))
            start += n
        ys = torch.cat(outs) if outs else xs.new_zeros(0, w_down.shape[1])
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    weighted = ys.to(acc_dtype) * topk_weights.reshape(-1)[order, None].to(acc_dtype)
    out = torch.zeros(num_tokens, w_down.shape[1], dtype=acc_dtype, device=x.device)
    return out.index_add_(0, token_of, weighted).to(x.dtype)


class Router(nn.Module):
    """DeepSeek gate: scores in fp32, optional group-limited choice, bias-corrected choice for V3.

    ``e_score_correction_bias`` only decides which experts are chosen; gate values come from the
    unbiased scores. Returns (topk_weights [T, k] fp32, topk_ids [T, k] int64).
    """

    def __init__(self, args):
        super().__init__()
        self.top_k, self.num_experts = args.num_experts_per_tok, args.n_routed_experts
        self.scoring_func, self.topk_method = args.scoring_func, args.topk_method
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # The selection bias stays fp32 under model.to(bf16) (HF keeps it fp32 too): rounding it would
        # change which experts are chosen. Device moves still apply.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None and self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device, torch.float32)
        return self

    def _group_mask(self, choice: torch.Tensor, group_score: str) -> torch.Tensor:
        """Keep the experts of the topk_group best groups (score of a group: max, or sum of its top-2)."""
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        per_group = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1)[0].sum(-1)
        best = per_group.topk(self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, best, True)
        return mask[:, :, None].expand_as(grouped).reshape(-1, self.num_experts)

    def forward(self, x: torch.Tensor):
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
            if self.n_group > 1:
                choice = choice.masked_fill(~self._group_mask(choice, "top2sum"), float("-inf"))
            ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, ids)
        else:
            masked = scores
            if self.topk_method == "group_limited_greedy" and self.n_group > 1:
                masked = scores.masked_fill(~self._group_mask(scores, "max"), 0.0)
            weights, ids = masked.topk(self.top_k, dim=-1, sorted=False)
        if self.scoring_func == "softmax" and self.norm_topk_prob and self.top_k > 1:
            # DeepSeek-V2's own code renormalizes *instead of* scaling (real V2 configs set norm_topk_prob=False);
            # transformers 5 ignores norm_topk_prob here, so load and save warn (ModelArgs.transformers_divergence)
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids
        if self.scoring_func == "sigmoid" and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)); HF parameter names."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """The routed experts' weights, stacked (see module docstring for the layout)."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, inter))


class MoE(nn.Module):
    """Router + routed experts (through ``experts_fn``) + always-on shared experts."""

    def __init__(self, args):
        super().__init__()
        self.fp8 = args.fp8
        self.gate = Router(args)
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        shared = args.moe_intermediate_size * args.n_shared_experts
        self.shared_experts = SwiGLU(args.hidden_size, shared) if shared else None
        self.experts_fn = None
        """Injected expert function; None: the FP8 hook when args.fp8, else ``grouped_experts``."""

    def _experts_fn(self):
        if self.experts_fn is not None:
            return self.experts_fn
        if self.fp8:
            if _FP8_EXPERTS_FN is None:
                raise RuntimeError("args.fp8=True but no FP8 expert function is installed: call r1fast.moe.set_fp8_experts_fn")
            return _FP8_EXPERTS_FN
        return grouped_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self._experts_fn()(x, weights, ids, self.experts.w_gate_up, self.experts.w_down)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
