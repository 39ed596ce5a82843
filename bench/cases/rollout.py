"""Rollout tokens/s of a Qwen2.5-1.5B-shaped model (random bf16 weights): r1fast ``Engine`` vs transformers.

GRPO shape: P prompts x G samples, prompt 256 tokens, N new tokens, temperature 1, EOS ignored (no stop
tokens, so every completion has exactly N tokens). transformers runs ``generate(do_sample=True,
num_return_sequences=G)`` on the same batch with sdpa, EOS disabled. ANCHORS.md (H100): transformers
2,364 generated tokens/s at 16 x 16 x 512. Targets: >= 10x transformers, and >= 50% of the roofline.

Roofline: ``bytes`` = what generation must read at least: all weights once per forward (the prefill, which
yields the first token, and N - 1 decode steps; the tied embedding / lm_head counted once) plus, per decode
step, each group's shared prompt KV once and every sample's own generated KV. Prefill's compute is not in the
floor (small next to N decode steps). time / floor at the measured copy ceiling is the roofline ratio;
generated tokens / time is the tokens/s (``extra["generated_tokens"]``).

Each case builds its engine once (cached; the cache is sized from free memory, so the transformers model
is built first) and hands prompts as inputs. Nothing touches CUDA before ``make_inputs``.
"""

from __future__ import annotations

from bench.plan import ANCHOR_CEILINGS, FLOOR_FACTOR
from bench.registry import Case, Impl, register
from bench.rows import floor_ms

QWEN25_15B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
    num_kv_heads=2, head_dim=128, qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)
PROMPT_LEN = 256
# (prompts, samples per prompt, new tokens, time transformers too, in --quick)
SHAPES = ((16, 16, 512, True, False), (64, 16, 1024, False, False), (4, 16, 128, True, True))
_STATE = {}
# Time-plan estimates (bench/plan.py). transformers: ANCHORS' seconds per decode step, 55.5 s / 512 at
# 16 prompts, 32,768 tokens / 645 tokens/s / 512 at 4 (host-bound: ~0.1 s per step whatever the batch).
HF_STEP_S = {16: 55.5 / 512, 4: 32768 / 645 / 512}
R1FAST_HOST_STEP_S = 0.02
"""A guess until a GPU run measures it: 20 ms of Python scheduling per decode step, on top of 3x the roofline."""
SETUP_S = {True: 60.0, False: 20.0}
"""A guess: building a random 1.5B transformers model on the host (with the peer) and the engine's model."""


def _param_bytes() -> int:
    c = QWEN25_15B
    h, d, layers = c["hidden_size"], c["head_dim"], c["num_layers"]
    q, kv = c["num_heads"] * d, c["num_kv_heads"] * d
    attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h
    mlp = 3 * h * c["intermediate_size"]
    norms = 2 * h
    return 2 * (layers * (attn + mlp + norms) + c["vocab_size"] * h + h)


def _kv_bytes_per_token() -> int:
    c = QWEN25_15B
    return c["num_layers"] * 2 * c["num_kv_heads"] * c["head_dim"] * 2


def roofline_bytes(prompts: int, samples: int, new_tokens: int) -> float:
    """Weights once per forward (the prefill, which yields the first token, then new_tokens - 1 decode steps);
    each decode step reads every group's shared prompt KV once and each sample's own KV so far."""
    steps = new_tokens - 1
    weights = new_tokens * _param_bytes()
    prompt_kv = steps * prompts * PROMPT_LEN * _kv_bytes_per_token()
    # decode step t (1-based) reads the t tokens generated before it, its input's KV just written among them
    own_kv = prompts * samples * _kv_bytes_per_token() * steps * (steps + 1) / 2
    return float(weights + prompt_kv + own_kv)


def _models(with_transformers: bool):
    import torch

    from r1fast.model import Transformer
    from r1fast.model_config import ModelArgs
    from r1fast.rollout import Engine

    if with_transformers and "transformers" not in _STATE:
        import transformers

        cfg = transformers.Qwen2Config(**ModelArgs(**QWEN25_15B).to_hf_config())
        cfg._attn_implementation = "sdpa"
        _STATE["transformers"] = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    if "engine" not in _STATE:
        model = Transformer.from_config(ModelArgs(**QWEN25_15B), dtype=torch.bfloat16, device="cuda", seed=0)
        # leave room for the transformers peer's generate (its KV cache and logits) in the same process
        _STATE["engine"] = Engine(model, memory_fraction=0.6 if with_transformers else 0.9)
    return _STATE["engine"], _STATE.get("transformers")


def _inputs(prompts: int, samples: int, new_tokens: int, with_transformers: bool):
    import torch

    engine, hf = _models(with_transformers)
    ids = torch.randint(0, QWEN25_15B["vocab_size"], (prompts, PROMPT_LEN), device="cuda")
    return engine, hf, ids, samples, new_tokens


def _r1fast(engine, hf, ids, samples, new_tokens):
    out = engine.generate(ids.tolist(), n=samples, max_new_tokens=new_tokens, temperature=1.0)
    return sum(len(c.token_ids) for group in out for c in group)


def _transformers(engine, hf, ids, samples, new_tokens):
    import torch

    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                          top_p=1.0, top_k=0, num_return_sequences=samples, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out.shape[0] * (out.shape[1] - ids.shape[1])


def _transformers_available():
    import importlib.util

    return None if importlib.util.find_spec("transformers") else "transformers not installed"


def release() -> None:
    """Drop the cached engine and transformers model (~3.1 GB each plus the engine's KV cache)."""
    _STATE.clear()


def _estimates(prompts: int, samples: int, new_tokens: int, with_hf: bool) -> dict:
    floor_s = floor_ms(None, roofline_bytes(prompts, samples, new_tokens), "copy", ANCHOR_CEILINGS) / 1e3
    est = {"r1fast": FLOOR_FACTOR * floor_s + R1FAST_HOST_STEP_S * new_tokens}  # plan.py's floor estimate + host
    if with_hf:
        est["transformers-generate"] = HF_STEP_S[prompts] * new_tokens
    return est


@register("rollout", release=release)
def cases(quick):
    for prompts, samples, new_tokens, with_hf, in_quick in SHAPES:
        impls = [Impl("r1fast", _r1fast, ours=True)]
        if with_hf:
            impls.append(Impl("transformers-generate", _transformers, available=_transformers_available))
        yield Case(
            name=f"rollout.qwen2.5-1.5b.{prompts}x{samples}x{new_tokens}",
            shape={"prompts": prompts, "samples": samples, "prompt_len": PROMPT_LEN, "new_tokens": new_tokens,
                   "dtype": "bf16", "temperature": 1.0, "eos": "ignored"},
            make_inputs=lambda p=prompts, g=samples, n=new_tokens, h=with_hf: _inputs(p, g, n, h),
            impls=impls,
            bytes=roofline_bytes(prompts, samples, new_tokens),
            ceiling="copy",
            quick=in_quick,
            notes="tokens/s = generated_tokens / time; roofline ratio = floor / time (weights + KV bytes per "
                  "decode step at the copy ceiling). One call is a whole rollout (seconds): its median comes "
                  "from 1-3 directly timed calls (bench/timing.py).",
            input_bytes=float(_param_bytes()),
            rates={"tokens": prompts * samples * new_tokens},
            est_call_s=_estimates(prompts, samples, new_tokens, with_hf),
            est_setup_s=SETUP_S[with_hf],
            extra={"generated_tokens": prompts * samples * new_tokens, "param_bytes": _param_bytes(),
                   "kv_bytes_per_token": _kv_bytes_per_token()},
        )
