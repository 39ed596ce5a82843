"""What transformers' config classes put in for a key a config.json leaves out, per model_type.

A config.json written by hand (or trimmed) may omit keys; transformers then builds the model from its config
class's defaults, and those are the full-size model's (DeepSeek-V3: routed_scaling_factor 2.5, n_group 8,
topk_group 4, first_k_dense_replace 3), not neutral values. Reading the same file as another model than
transformers does would make r1fast's outputs differ from the checkpoint's, so r1fast takes the same defaults.
tests/test_model_args.py compares every entry with ``transformers.AutoConfig.for_model`` (transformers 5.x).

The five core shapes (vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads) stay
required: a config without one is broken, and transformers' full-size default would only fail later on a shape.
"""

from __future__ import annotations

from typing import Any


def _all_heads(cfg: dict) -> int:
    return cfg["num_attention_heads"]


def _split_hidden(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _qwen_kv_heads(cfg: dict) -> int:
    """Qwen2 / Qwen3 read a missing num_key_value_heads as 32 whatever the query head count (not as MHA)."""
    if cfg["num_attention_heads"] % 32:
        raise ValueError(f"config.json has no num_key_value_heads: transformers' Qwen2 / Qwen3 read it as 32, which "
                         f"num_attention_heads={cfg['num_attention_heads']} cannot share; write the checkpoint's "
                         "count in config.json")
    return 32


_DENSE = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
_DEEPSEEK = dict(_DENSE, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 v_head_dim=128, first_k_dense_replace=0, norm_topk_prob=True, routed_scaling_factor=1.0)

HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_DENSE, max_position_embeddings=2048, num_key_value_heads=_all_heads, head_dim=_split_hidden,
                  bos_token_id=1, eos_token_id=2),
    "qwen2": dict(_DENSE, max_position_embeddings=32768, num_key_value_heads=_qwen_kv_heads, head_dim=_split_hidden),
    "qwen3": dict(_DENSE, max_position_embeddings=32768, num_key_value_heads=_qwen_kv_heads, head_dim=128),
    "deepseek_v2": dict(_DEEPSEEK, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=None, moe_intermediate_size=1407,
                        n_group=None, topk_group=None, norm_topk_prob=False),
    "deepseek_v3": dict(_DEEPSEEK, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                        rope_interleave=True, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        moe_intermediate_size=2048, first_k_dense_replace=3, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5),
}
"""model_type -> key -> default (a callable of the config dict where transformers derives it)."""


def hf_value(cfg: dict, model_type: str, key: str) -> Any:
    """``cfg[key]`` if the config.json has the key (an explicit null included), else transformers' default."""
    if key in cfg:
        return cfg[key]
    default = HF_DEFAULTS[model_type][key]
    return default(cfg) if callable(default) else default
