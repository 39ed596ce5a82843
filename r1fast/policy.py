"""The training-side view of the policy: packing (prompt, completion) pairs and the loss head.

``PolicyHead`` wraps the transformer so that the loss (or the log-probs) is computed *inside* a
module's forward. Under FSDP2 that module is the root, which keeps the head weight gathered exactly
while the fused loss kernel reads it; calling the kernel on ``model.lm_head_weight`` from outside a
forward would see a sharded parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import r1fast.kernels as K


@dataclass
class PackedBatch:
    """A micro-batch of (prompt, completion) sequences packed without padding."""

    input_ids: torch.Tensor
    """[T] all tokens of all sequences, back to back."""
    cu_seqlens: torch.Tensor
    """[B + 1] int32 sequence boundaries in input_ids."""
    max_seqlen: int
    """Longest sequence."""
    gather_index: torch.Tensor
    """[B, C] index into the T hidden states: the position whose output predicts completion token c."""
    completion_ids: torch.Tensor
    """[B, C] completion tokens, right-padded with 0."""
    mask: torch.Tensor
    """[B, C] 1.0 for real completion tokens, 0.0 for padding."""

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f).to(device) if isinstance(getattr(self, f), torch.Tensor)
                             else getattr(self, f) for f in self.__dataclass_fields__))


def pack(prompts: list[list[int]], completions: list[list[int]], device=None) -> PackedBatch:
    """Pack sequences prompt + completion; completion token j is predicted by position len(prompt)+j-1."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot pack an empty micro-batch")
    lens = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first completion token is predicted from it)")
    width = max(1, max(len(c) for c in completions))
    ids, index, comp, mask = [], [], [], []
    start = 0
    for p, c, n in zip(prompts, completions, lens, strict=True):
        ids.extend(p)
        ids.extend(c)
        pad = width - len(c)
        index.append([start + len(p) - 1 + j for j in range(len(c))] + [start] * pad)
        comp.append(list(c) + [0] * pad)
        mask.append([1.0] * len(c) + [0.0] * pad)
        start += n
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = PackedBatch(torch.tensor(ids, dtype=torch.long), cu, max(lens), torch.tensor(index, dtype=torch.long),
                        torch.tensor(comp, dtype=torch.long), torch.tensor(mask, dtype=torch.float32))
    return batch.to(device) if device is not None else batch


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """[B, width] float32 from ragged rows (right-padded with 0)."""
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)


class PolicyHead(nn.Module):
    """Transformer + output head: GRPO loss or per-token log-probs of completions from hidden states."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, *, mode: str = "loss", temperature: float = 1.0, **loss_kwargs):
        hidden = self.model(batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        h = hidden[batch.gather_index]  # [B, C, H]; only completion positions reach the head
        weight = self.model.lm_head_weight
        if mode == "logps":
            return K.fused_linear_logprobs(h, weight, batch.completion_ids, temperature=temperature)
        if mode == "nll":
            return self._nll(h, weight, batch, loss_kwargs.get("normalizer"))
        if mode != "loss":
            raise ValueError(f"mode must be 'loss', 'logps' or 'nll', got {mode!r}")
        return K.fused_linear_grpo_loss(h, weight, batch.completion_ids, batch.mask, temperature=temperature,
                                        **loss_kwargs)

    @staticmethod
    def _nll(h, weight, batch: PackedBatch, normalizer):
        """Token-level negative log-likelihood of the completions (SFT), without [N, V] logits.

        The fused GRPO loss with advantage 1, no clipping in play (ratio exactly 1) and no KL has the
        gradient of sum(-logp) / normalizer: d/dlogp of -exp(logp - stop_grad(logp)) is -1. Its value
        is -sum(mask) / normalizer, so the NLL value from the log-prob kernel replaces it (same
        gradient, true value). ``normalizer``: the token count to divide by (default: this batch's).
        """
        count = batch.mask.sum()
        norm = count if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=count.device)
        ones = torch.ones(batch.mask.shape[0], dtype=torch.float32, device=h.device)
        surrogate, _ = K.fused_linear_grpo_loss(h, weight, batch.completion_ids, batch.mask, ones, beta=0.0,
                                                loss_type="dapo", normalizer=norm)
        with torch.no_grad():
            logp = K.fused_linear_logprobs(h.detach(), weight.detach(), batch.completion_ids)
            nll = -(logp * batch.mask).sum() / norm.clamp_min(1)
        return surrogate - surrogate.detach() + nll
