"""Training forward + backward of a Qwen2.5-1.5B-shaped model (random weights, bf16): r1fast vs transformers.

r1fast runs the packed [T] layout (cu_seqlens, no padding) and a loss from hidden states, so no [N, V]
logits are materialized: ``r1fast.kernels.fused_linear_grpo_loss`` when importable (beta = 0), else a
chunked, recomputing cross-entropy in PyTorch. transformers runs ``model(input_ids, labels=input_ids)``
with sdpa, its own recipe. ANCHORS.md: transformers 35,754 tokens/s at 2 x 4,096 (41% MFU, 38.7 GiB extra
peak); 4 x 4,096 runs out of memory on 80 GB. Target: >= 1.2x its tokens/s, and 4 x 4,096 fits.

``flops`` = 6 * tokens * (matmul parameters incl. lm_head) + causal attention 6 * L * Hq * D * sum(S_i^2):
the useful work, so time / floor is an MFU. Nothing touches CUDA before ``make_inputs``; both models are
built once (cached) on the first ``make_inputs`` call and handed to the implementations as inputs so
that the harness clears their gradients between calls.
"""

from __future__ import annotations

from bench.registry import Case, Impl, register

QWEN25_15B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
    num_kv_heads=2, head_dim=128, qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)
SHAPES = ((2, 4096), (4, 4096))
_MODELS = {}
HF_TOKENS_PER_S = 35754.0
"""ANCHORS.md: transformers' training tokens/s at 2 x 4,096; also the time-plan estimate for r1fast (unmeasured)."""


def release() -> None:
    """Drop both cached bf16 1.5B models (~6.2 GB with their gradients freed) before later families."""
    _MODELS.clear()


def _flops(batch: int, seq: int) -> float:
    c = QWEN25_15B
    h, d, layers = c["hidden_size"], c["head_dim"], c["num_layers"]
    attn = h * d * (c["num_heads"] * 2 + c["num_kv_heads"] * 2)
    mlp = 3 * h * c["intermediate_size"]
    params = layers * (attn + mlp) + c["vocab_size"] * h
    tokens = batch * seq
    return 6.0 * tokens * params + 6.0 * layers * c["num_heads"] * d * batch * seq * seq


def _models():
    import torch
    import transformers

    from r1fast.model import Transformer
    from r1fast.model_config import ModelArgs

    if not _MODELS:
        args = ModelArgs(**QWEN25_15B)
        _MODELS["r1fast"] = Transformer.from_config(args, dtype=torch.bfloat16, device="cuda", seed=0)
        cfg = transformers.Qwen2Config(**args.to_hf_config())
        cfg._attn_implementation = "sdpa"
        _MODELS["transformers"] = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    return _MODELS["r1fast"], _MODELS["transformers"]


def _inputs(batch: int, seq: int):
    import torch

    ours, theirs = _models()
    ids = torch.randint(0, QWEN25_15B["vocab_size"], (batch, seq), device="cuda")
    cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device="cuda")
    return ours, theirs, ids, cu


def _hidden_state_loss(hidden, weight, targets):
    """Mean token loss from hidden states without [N, V] logits (fused kernel, else chunked + recomputed)."""
    import torch

    try:
        from r1fast.kernels import fused_linear_grpo_loss

        bsz = targets.shape[0]
        ones = torch.ones(targets.shape, device=targets.device, dtype=torch.float32)
        advantages = torch.ones(bsz, device=targets.device, dtype=torch.float32)
        loss, _ = fused_linear_grpo_loss(hidden, weight, targets, ones, advantages, beta=0.0)
        return loss
    except ImportError:
        import torch.nn.functional as F
        from torch.utils.checkpoint import checkpoint

        def chunk_loss(h, t):
            return F.cross_entropy(F.linear(h, weight).float(), t, reduction="sum")

        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        total = sum(checkpoint(chunk_loss, h[i : i + 4096], t[i : i + 4096], use_reentrant=False)
                    for i in range(0, h.shape[0], 4096))
        return total / t.numel()


def _ours(ours, theirs, ids, cu):
    bsz, seq = ids.shape
    hidden = ours(ids.reshape(-1), cu_seqlens=cu, max_seqlen=seq)
    targets = ids.roll(-1, dims=1)
    loss = _hidden_state_loss(hidden.view(bsz, seq, -1), ours.lm_head_weight, targets)
    loss.backward()
    return loss.detach()


def _transformers(ours, theirs, ids, cu):
    loss = theirs(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def _transformers_available():
    import importlib.util

    return None if importlib.util.find_spec("transformers") else "transformers not installed"


@register("model", release=release)
def cases(quick):
    for batch, seq in SHAPES:
        yield Case(
            name=f"model.train_fwd_bwd.qwen2.5-1.5b.{batch}x{seq}",
            shape={"batch": batch, "seq": seq, "tokens": batch * seq, **{k: QWEN25_15B[k] for k in
                   ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")},
                   "dtype": "bf16"},
            make_inputs=lambda b=batch, s=seq: _inputs(b, s),
            impls=[
                Impl("r1fast", _ours, ours=True),
                Impl("transformers-sdpa", _transformers, available=_transformers_available),
            ],
            flops=_flops(batch, seq),
            ceiling="bf16_matmul",
            quick=batch == 2,
            notes="tokens/s = tokens / time; MFU = floor / time, counting causal attention FLOPs at the measured "
                  "bf16 ceiling (ANCHORS' 41% for transformers counts non-causal attention at the 989 TFLOP/s "
                  "datasheet; on this convention transformers lands near 53%). Extra peak memory includes the weight gradients "
                  "(both models' weights stay resident). transformers at 4x4096 is expected to run out of memory.",
            input_bytes=float(batch * seq * 8),
            rates={"tokens": batch * seq},
            # 4 x 4,096: transformers runs out of memory (ANCHORS), which its first call finds in ~1 s
            est_call_s={"r1fast": batch * seq / HF_TOKENS_PER_S,
                        "transformers-sdpa": batch * seq / HF_TOKENS_PER_S if batch == 2 else 1.0},
            est_setup_s=60.0,  # a guess
        )
