"""Default attention backends for training and evaluation (causal, packed variable-length batches).

Every backend is a callable with the signature the model uses for all of them (the rollout engine passes
its paged-KV backend the same way):

    attn(q, k, v, *, layer, cu_seqlens, max_seqlen, softmax_scale, positions) -> out

q [T, Hq, Dqk], k [T, Hkv, Dqk], v [T, Hkv, Dv] packed along T (sequence i occupies rows
cu_seqlens[i]:cu_seqlens[i+1]); out [T, Hq, Dv]. ``positions`` [T] are the token positions (unused by
these stateless backends, needed by cached ones). ``default_attention(device)`` picks flash-attn's varlen
kernel when it is installed and the device is CUDA, else PyTorch SDPA.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


class SDPAAttention:
    """Causal attention per sequence through ``F.scaled_dot_product_attention``.

    Equal-length batches (T == B * max_seqlen, which forces every length to be max_seqlen) run as one
    batched call without reading cu_seqlens on the host; ragged batches loop over the sequences (one
    host read of cu_seqlens per forward, cached across layers).
    """

    def __init__(self):
        self._bounds_of = (None, -1)  # (the cu_seqlens tensor itself, its version): a strong reference,
        self._bounds = None  # so a freed tensor's id can never be mistaken for a new one

    def _sequence_bounds(self, cu_seqlens: torch.Tensor) -> list[int]:
        tensor, version = self._bounds_of
        if tensor is not cu_seqlens or version != cu_seqlens._version:
            self._bounds, self._bounds_of = cu_seqlens.tolist(), (cu_seqlens, cu_seqlens._version)
        return self._bounds

    @staticmethod
    def _sdpa(q, k, v, scale):
        # [B, S, H, D] -> [B, H, S, D]; GQA repeats k/v heads (enable_gqa does it without a copy on new torch)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)

    def __call__(self, q, k, v, *, layer, cu_seqlens, max_seqlen, softmax_scale, positions=None):
        num_seqs = cu_seqlens.numel() - 1
        if num_seqs * max_seqlen == q.shape[0]:
            shape = (num_seqs, max_seqlen)
            out = self._sdpa(*(t.reshape(*shape, *t.shape[1:]) for t in (q, k, v)), softmax_scale)
            return out.reshape(q.shape[0], q.shape[1], v.shape[-1])
        bounds = self._sequence_bounds(cu_seqlens)
        outs = [
            self._sdpa(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale)[0]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(outs, dim=0)


class FlashAttnVarlen:
    """flash-attn 2's ``flash_attn_varlen_func`` (CUDA, fp16/bf16). MLA's narrower v is zero-padded to
    the qk head dim because the kernel wants one head dim; the padding columns are sliced off."""

    def __init__(self):
        from flash_attn import flash_attn_varlen_func  # noqa: PLC0415  (optional dependency)

        self._fn = flash_attn_varlen_func

    def __call__(self, q, k, v, *, layer, cu_seqlens, max_seqlen, softmax_scale, positions=None):
        dv = v.shape[-1]
        if dv != q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))
        cu = cu_seqlens.to(torch.int32)
        out = self._fn(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=softmax_scale, causal=True)
        return out[..., :dv]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def default_attention(device, dtype=None):
    """The training backend for ``device``: flash-attn varlen on CUDA half types when installed, else SDPA."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return FlashAttnVarlen()
    return SDPAAttention()
