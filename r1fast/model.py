"""r1fast's one decoder-only transformer: Llama / Qwen2 / Qwen3 (GQA) and DeepSeek-V3 / V2 (MLA + MoE).

Tokens always flow packed: [T, H] with ``cu_seqlens`` marking sequence boundaries, so training batches
carry no padding and the rollout engine feeds its mixed prefill/decode batches the same way. The model
has no parallelism and chooses no kernels: attention is an injected callable (``r1fast.attention``
documents its signature; rollouts pass a paged-KV backend), routed experts an injected function
(``r1fast.moe``). Parameter names equal HF's minus the ``model.`` prefix, except the stacked experts,
so ``r1fast.checkpoint`` maps names one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import default_attention
from .model_config import ModelArgs
from .moe import MoE, SwiGLU
from .rope import apply_rope, cos_sin, inv_freq_and_attention_factor, mla_softmax_scale


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight multiply (the HF/Llama convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@dataclass
class Batch:
    """What every layer needs about the packed batch (computed once per forward)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    attn: object


class Attention(nn.Module):
    """Grouped-query attention with optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, args.num_heads, args.num_kv_heads, args.head_dim
        h = args.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=args.o_bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.scale = self.head_dim**-0.5

    def forward(self, x, b: Batch):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, b.cos, b.sin), apply_rope(k, b.cos, b.sin)
        out = b.attn(q, k, v, layer=self.layer, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                     softmax_scale=self.scale, positions=b.positions)
        return self.o_proj(out.reshape(t, -1))


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; the backend gets decompressed per-head k (nope | rope) and v."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.heads = layer, args.num_heads
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank, self.interleave = args.kv_lora_rank, args.rope_interleave
        h, qk = args.hidden_size, self.nope + self.rope_dim
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(h, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, self.heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, args.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, h, bias=False)
        self.scale = mla_softmax_scale(qk, args.rope_scaling)

    def forward(self, x, b: Batch):
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(t, self.heads, -1).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(t, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rope = apply_rope(q_rope, b.cos, b.sin, self.interleave)
        k_rope = apply_rope(k_rope.view(t, 1, self.rope_dim), b.cos, b.sin, self.interleave)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(t, self.heads, self.rope_dim)), dim=-1)
        out = b.attn(q, k, v, layer=self.layer, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                     softmax_scale=self.scale, positions=b.positions)
        return self.o_proj(out.reshape(t, -1))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = (MLAttention if args.is_mla else Attention)(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if args.is_moe_layer(layer):
            self.mlp = MoE(args)
        else:
            self.mlp = SwiGLU(args.hidden_size, args.intermediate_size, args.mlp_bias)

    def forward(self, x, b: Batch):
        x = x + self.self_attn(self.input_layernorm(x), b)
        return x + self.mlp(self.post_attention_layernorm(x))


def _checked_max_seqlen(cu: list[int], total: int) -> int:
    """Longest sequence of host-side ``cu_seqlens``; ValueError unless it is 0, non-decreasing, ``total``."""
    if not cu or cu[0] != 0 or cu[-1] != total or any(a > b for a, b in zip(cu, cu[1:], strict=False)):
        shown = cu if len(cu) <= 8 else [*cu[:4], "...", *cu[-2:]]
        raise ValueError(f"cu_seqlens={shown} must start at 0, never decrease and end at the {total} tokens "
                         "of input_ids")
    return max((b - a for a, b in zip(cu, cu[1:], strict=False)), default=0)


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm; ``forward`` returns final hidden states, ``logits`` applies the head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        inv_freq, self.rope_attention_factor = inv_freq_and_attention_factor(
            args.rope_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        # A plain fp32 attribute, not a buffer: model.to(bf16) must not round the frequencies.
        self._inv_freq = inv_freq
        self._inv_freq_by_device = {}
        self._default_attn = {}

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, args, *, dtype=None, device=None, seed: int | None = None) -> Transformer:
        """Random init (normal(0, 0.02) matrices, unit norms, zero biases) from ModelArgs or an HF config dict."""
        if isinstance(args, dict):
            args = ModelArgs.from_hf_config(args)
        elif not isinstance(args, ModelArgs):
            raise ValueError(f"args must be ModelArgs or an HF config dict, got {type(args).__name__}")
        with torch.device("meta"):
            model = cls(args)
        model.to_empty(device=device or "cpu")
        model.reset_parameters(seed=seed)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None) -> Transformer:
        """Load an HF directory (config.json + safetensors, sharded or not); see ``r1fast.checkpoint``."""
        from .checkpoint import load_pretrained  # noqa: PLC0415  (checkpoint imports this module)

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size="5GB", dtype=None) -> None:
        """Write config.json + safetensors that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
        from .checkpoint_save import save_pretrained  # noqa: PLC0415

        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, seed: int | None = None) -> None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(torch.initial_seed() if seed is None else seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:  # sample on CPU so a seed gives the same weights on every device
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))
        for m in self.modules():
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.zero_()

    def set_experts_fn(self, fn) -> None:
        """Inject the routed-expert function into every MoE layer (None restores the default choice)."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.experts_fn = fn

    # ---- API used by the loss and the rollout engine ------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [V, H] output matrix (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def eos_token_id(self):
        return self.args.eos_token_id

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)

    def _attention_for(self, x: torch.Tensor):
        key = (x.device, x.dtype)
        if key not in self._default_attn:
            self._default_attn[key] = default_attention(x.device, x.dtype)
        return self._default_attn[key]

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, attn=None, max_seqlen=None):
        """Final hidden states (after the final norm), shaped ``input_ids.shape + (H,)``.

        input_ids: [B, S] (every row a sequence) or [T] packed with ``cu_seqlens`` int32 [B+1] (None: one
        sequence). position_ids: same shape as input_ids (default: 0.. within each sequence).
        max_seqlen: longest sequence (computed from cu_seqlens when None; one host read).
        attn: attention backend (default: SDPA, or flash-attn varlen on CUDA when installed).
        """
        shape = input_ids.shape
        dev = input_ids.device
        if input_ids.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens is only for packed 1-D input_ids; got input_ids of shape [B, S]")
            bsz, seq = shape
            cu_seqlens = torch.arange(0, bsz * seq + 1, max(seq, 1), dtype=torch.int32, device=dev)[: bsz + 1]
            max_seqlen = seq
            if position_ids is None:
                position_ids = torch.arange(seq, device=dev).repeat(bsz)
        elif input_ids.dim() == 1:
            total = shape[0]
            if cu_seqlens is None:
                cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=dev)
                max_seqlen = total
            elif cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
                raise ValueError(f"cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
            if max_seqlen is None:  # the one host read; a caller passing max_seqlen (the engine) skips it
                max_seqlen = _checked_max_seqlen(cu_seqlens.tolist(), total)
            if position_ids is None:
                idx = torch.arange(total, device=dev)
                seq_of = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
                position_ids = idx - cu_seqlens.long()[seq_of]
        else:
            raise ValueError(f"input_ids must be [B, S] or packed [T], got shape {tuple(shape)}")
        positions = position_ids.reshape(-1)
        if positions.numel() != input_ids.numel():
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match input_ids {tuple(shape)}")
        if input_ids.numel() == 0:  # nothing to attend over: the empty hidden states, still [.., 0, H]
            return self.norm(self.embed_tokens(input_ids))
        x = self.embed_tokens(input_ids.reshape(-1))
        if dev not in self._inv_freq_by_device:
            self._inv_freq_by_device[dev] = self._inv_freq.to(dev)
        cos, sin = cos_sin(self._inv_freq_by_device[dev], positions, self.rope_attention_factor)
        batch = Batch(cos, sin, positions, cu_seqlens, int(max_seqlen), attn or self._attention_for(x))
        for layer in self.layers:
            x = layer(x, batch)
        return self.norm(x.view(*shape, -1))  # norm of the reshaped input: the output is not a view (FSDP2 warns)
