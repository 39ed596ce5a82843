"""The training-side view of the policy: packing (prompt, completion) pairs and the loss head.

``PolicyHead`` wraps the transformer so that the loss (or the log-probs) is computed *inside* a
module's forward. Under FSDP2 that module is the root, which keeps the head weight gathered exactly
while the fused loss kernel reads it; calling the kernel on ``model.lm_head_weight`` from outside a
forward would see a sharded parameter.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from operator import add

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


def _host_tensor(values: list, typecode: str, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor from a flat list through ``array.array``: 10 ms for 390k ints against 47 ms for
    ``torch.tensor`` (which inspects every element). ``frombuffer`` keeps the array alive."""
    return torch.frombuffer(array(typecode, values), dtype=dtype) if values else torch.zeros(0, dtype=dtype)


def pack(prompts: list[list[int]], completions: list[list[int]], device=None) -> PackedBatch:
    """Pack sequences prompt + completion; completion token j is predicted by position len(prompt)+j-1.

    Built from the lengths with whole-tensor ops: one flat list of the tokens (``list.extend`` runs in C)
    converted once, and the [B, C] index/ids/mask from broadcasts. The per-token Python loop it replaces
    cost ~512 ns/token (173 ms per micro-batch at B = 64, completions up to 8k tokens); this ~60 ns.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("cannot pack an empty micro-batch")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the first completion token is predicted from it)")
    flat: list[int] = []
    for p, c in zip(prompts, completions, strict=True):
        flat.extend(p)
        flat.extend(c)
    prompt_sizes, comp_sizes = [len(p) for p in prompts], [len(c) for c in completions]  # host ints: max() reads no tensor
    prompt_lens = torch.tensor(prompt_sizes, dtype=torch.long)
    comp_lens = torch.tensor(comp_sizes, dtype=torch.long)
    lens = prompt_lens + comp_lens
    ends = lens.cumsum(0)
    starts = ends - lens
    ids = _host_tensor(flat, "q", torch.long)
    width = max(1, *comp_sizes)
    offsets = torch.arange(width)
    real = offsets[None, :] < comp_lens[:, None]
    predicting = (starts + prompt_lens - 1)[:, None] + offsets  # padded slots run past the sequence
    comp = ids[(predicting + 1).clamp_(max=ids.numel() - 1)].masked_fill_(~real, 0)  # the token predicted
    index = torch.where(real, predicting, starts[:, None])
    cu = torch.zeros(len(prompts) + 1, dtype=torch.int32)
    cu[1:] = ends
    batch = PackedBatch(ids, cu, max(map(add, prompt_sizes, comp_sizes)), index, comp, real.float())
    return batch.to(device) if device is not None else batch


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """[B, width] float32 from ragged rows (right-padded with 0)."""
    flat: list[float] = []
    for r in rows:
        flat.extend(r)
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    out[torch.arange(width)[None, :] < lens[:, None]] = _host_tensor(flat, "f", torch.float32)
    return out


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
