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
    """Causal attention per sequence through ``F.scaled_dot_product_attention``, one call per layer.

    A ragged packed batch is scattered into a right-padded [B, max_seqlen] layout and attended with
    ``is_causal=True`` and no mask: with right padding, a real query at position i only sees keys
    0..i, all real, so its output (and every gradient reaching real q/k/v) is the per-sequence
    result; the padded rows are computed and dropped. No mask keeps SDPA's flash / memory-efficient
    backends eligible on GPU. The scatter index is built on the device from ``cu_seqlens`` (no host
    read) once per micro-batch and reused by every layer, forward and backward.

    Why not always a loop over sequences (the previous code): one SDPA call per sequence per layer cost
    164 us of host time per sequence (fwd + bwd, CPU probe): 10.5 ms per layer at B = 64, x28 layers
    ~0.3 s per micro-batch. The padded call wastes the attention work of the padding instead, which
    grows with raggedness and length (CPU, lengths L..4L, B = 16: padded 3.8x faster at L = 8, equal
    at L = 200, 1.8x slower at L = 1000). So the padded call is taken when its worst-case wasted work,
    (B * S^2 - T^2 / B) score entries x Hq x (Dqk + Dv) (T^2 / B is the least sum of L^2 for T tokens
    in B sequences), costs less than the B - 1 calls it saves, at ``CALL_COST`` units per call; else
    the sequences loop as before (one host read of cu_seqlens per forward, cached across layers).
    Equal-length batches need neither: a plain reshape.
    """

    # Work units (score entries x head dims) that one extra SDPA call's fixed cost (fwd + bwd) is worth.
    # CPU: the padded and loop paths tie at B = 16, L = 200..800, Hq = 2, D = 16 (the measurement above):
    # (16 * 800^2 - 8000^2 / 16) * 2 * 32 / 15 = 2.7e7. CUDA (estimate, owed a measurement): ~100 us of
    # launches per call x ~600 TFLOP/s of attention / ~7 FLOPs per unit (QK and PV, causal half, bwd 2.5x).
    CALL_COST = {"cpu": 2.7e7, "cuda": 8e9}

    def __init__(self):
        self._index_of = (None, -1, -1)  # (the cu_seqlens tensor itself, its version, max_seqlen): a strong
        self._index = None  # reference, so a freed tensor's id can never be mistaken for a new one
        self._bounds_of = (None, -1)
        self._bounds = None

    def _padded_index(self, cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
        """[T] int64: the row of each packed token in the [B * max_seqlen] padded layout (device-side)."""
        tensor, version, width = self._index_of
        if tensor is not cu_seqlens or version != cu_seqlens._version or width != max_seqlen:
            cu = cu_seqlens.long()
            token = torch.arange(total, device=cu.device)
            seq = torch.searchsorted(cu[1:], token, right=True)
            self._index = seq * max_seqlen + (token - cu[seq])
            self._index_of = (cu_seqlens, cu_seqlens._version, max_seqlen)
        return self._index

    def _sequence_bounds(self, cu_seqlens: torch.Tensor) -> list[int]:
        tensor, version = self._bounds_of
        if tensor is not cu_seqlens or version != cu_seqlens._version:
            self._bounds, self._bounds_of = cu_seqlens.tolist(), (cu_seqlens, cu_seqlens._version)
        return self._bounds

    def _padding_pays(self, q, v, num_seqs: int, max_seqlen: int, total: int) -> bool:
        """Whether the padded call's worst-case wasted work costs less than the calls it saves (see above)."""
        waste = (num_seqs * max_seqlen ** 2 - total ** 2 / max(num_seqs, 1)) * q.shape[1] * (q.shape[2] + v.shape[2])
        return waste <= (num_seqs - 1) * self.CALL_COST.get(q.device.type, self.CALL_COST["cuda"])

    @staticmethod
    def _sdpa(q, k, v, scale):
        # [B, S, H, D] -> [B, H, S, D]; GQA repeats k/v heads (enable_gqa does it without a copy on new torch)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)

    def __call__(self, q, k, v, *, layer, cu_seqlens, max_seqlen, softmax_scale, positions=None):
        num_seqs, total = cu_seqlens.numel() - 1, q.shape[0]
        slots = num_seqs * max_seqlen
        if slots == total:  # every length is max_seqlen: a plain reshape
            out = self._sdpa(*(t.reshape(num_seqs, max_seqlen, *t.shape[1:]) for t in (q, k, v)), softmax_scale)
            return out.reshape(total, q.shape[1], v.shape[-1])
        if self._padding_pays(q, v, num_seqs, max_seqlen, total):
            index = self._padded_index(cu_seqlens, total, max_seqlen)
            padded = [t.new_zeros(slots, *t.shape[1:]).index_copy(0, index, t).view(num_seqs, max_seqlen, *t.shape[1:])
                      for t in (q, k, v)]
            out = self._sdpa(*padded, softmax_scale)
            return out.reshape(slots, q.shape[1], v.shape[-1]).index_select(0, index)
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
