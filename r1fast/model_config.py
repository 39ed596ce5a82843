"""``ModelArgs``: the one configuration object of r1fast's transformer, read from and written to HF config.json.

Covers the dense Llama / Qwen2 / Qwen3 family and DeepSeek-V3 / V2 (multi-head latent attention + MoE). Anything
a config asks for that the model does not implement (sliding windows, partial rotary, dynamic or longrope scaling,
activations other than SiLU, unknown architectures) is refused with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import asdict, dataclass, field, fields

from .checkpoint_fp8 import weight_block
from .config_io import ConfigError
from .hf_config_defaults import hf_value
from .rope_config import read_rope, rope_fields

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
}
MODEL_TYPE_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _read_json(file: str):
    """The JSON value in ``file``; a one-line ConfigError naming the file when it is not valid UTF-8 JSON."""
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e


@dataclass
class ModelArgs:
    """Shapes and options of one decoder-only transformer (field names follow HF where they exist)."""

    model_type: str | None = None
    """One of llama, qwen2, qwen3, deepseek_v3, deepseek_v2 (decides the HF architecture written on save);
    None = qwen2 with q/k/v biases, else llama (the two dense layouts that HF checkpoints can express)."""
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    """FFN width of dense layers (SwiGLU)."""
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    """Heads of k/v as the attention backend sees them (MLA: equal to num_heads, k/v are decompressed)."""
    head_dim: int = 16
    """Head dim of q and k as the attention backend sees them (MLA: qk_nope_head_dim + qk_rope_head_dim)."""
    v_head_dim: int | None = None
    """Head dim of v (None: head_dim; MLA sets it from the config)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF rope_scaling / rope_parameters dict without rope_theta (rope_type default, linear, llama3, yarn)."""
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool | None = None
    """Qwen3: RMSNorm over head_dim on q and k before RoPE (None: on exactly when model_type is qwen3, the
    only HF architecture here whose checkpoints carry q_norm / k_norm weights)."""
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    generation_config: dict | None = None
    """generation_config.json as read (instruct models list their chat eos there: Qwen2.5-Instruct stops on
    two ids, config.json names one); written back verbatim, never into config.json."""
    # multi-head latent attention (DeepSeek); kv_lora_rank > 0 switches it on
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    rope_interleave: bool = True
    """MLA rope dims rotate in interleaved pairs (DeepSeek checkpoints); False: rotate-half like Llama."""
    # mixture of experts; n_routed_experts > 0 switches it on for layers >= first_k_dense_replace
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    """Router scores: sigmoid (V3, with e_score_correction_bias) or softmax (V2)."""
    topk_method: str = "noaux_tc"
    """noaux_tc (V3: bias-corrected group-limited top-k), greedy or group_limited_greedy (V2)."""
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    fp8: bool = False
    """Run routed experts through the FP8 hook installed with ``r1fast.moe.set_fp8_experts_fn``."""
    torch_dtype: str | None = None
    """dtype named in config.json (used when from_pretrained gets dtype=None)."""
    hf_config: dict = field(default_factory=dict, repr=False)
    """The config.json this came from, kept so save_pretrained writes back every field it does not own."""

    def __post_init__(self):
        if self.model_type is None:
            self.model_type = "qwen2" if self.qkv_bias else "llama"
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.model_type not in MODEL_TYPE_TO_ARCH:
            raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {sorted(MODEL_TYPE_TO_ARCH)}")
        if self.qk_norm is None:
            self.qk_norm = self.model_type == "qwen3"
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_dim % 2:  # RoPE rotates pairs of dims: an odd count fails deep in the forward
            name = "qk_rope_head_dim" if self.is_mla else "head_dim"
            raise ValueError(f"{name}={self.rope_dim} must be even (RoPE rotates pairs of dimensions)")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if self.is_moe:
            self._check_moe()

    def _check_moe(self) -> None:
        """Router shapes the top-k can honour (most would otherwise fail as 'selected index k out of range'; more
        experts per token than the chosen groups hold would silently route into unchosen groups)."""
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func={self.scoring_func!r} is not supported (sigmoid or softmax)")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method={self.topk_method!r} is not supported")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts="
                             f"{self.n_routed_experts}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq={self.moe_layer_freq} must be >= 1")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            # a group's score is the sum of its two best experts
            raise ValueError(f"n_group={self.n_group} leaves {per_group} expert per group; noaux_tc needs >= 2")
        grouped = self.topk_method == "noaux_tc" or self.topk_method == "group_limited_greedy"
        if grouped and self.n_group > 1 and self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {self.topk_group * per_group} "
                             f"experts in topk_group={self.topk_group} groups of {per_group}")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def rope_dim(self) -> int:
        """Number of dims RoPE rotates per head."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    # ---- HF config.json in and out -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Parse an HF config.json dict; ValueError naming the field for anything unsupported."""
        cfg = dict(cfg)
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if archs and arch is None:
            raise ValueError(f"architectures={archs} is not supported; supported: {sorted(ARCHITECTURES)}")
        if arch is not None:
            model_type = ARCHITECTURES[arch]
        if model_type not in MODEL_TYPE_TO_ARCH:
            raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(MODEL_TYPE_TO_ARCH)}")
        weight_block(cfg)  # block FP8 is dequantized on load (checkpoint_fp8); other quantizations are refused
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (only silu / SwiGLU)")
        if cfg.get("use_sliding_window") or (model_type == "llama" and cfg.get("sliding_window")):
            raise ValueError("use_sliding_window=True is not supported")
        rope_theta, rope = read_rope(cfg)
        hf = functools.partial(hf_value, cfg, model_type)  # the key, else transformers' default
        heads = cfg["num_attention_heads"]
        common = dict(
            model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            rms_norm_eps=hf("rms_norm_eps"), rope_theta=rope_theta, rope_scaling=rope,
            max_position_embeddings=hf("max_position_embeddings"),
            tie_word_embeddings=bool(hf("tie_word_embeddings")),
            bos_token_id=hf("bos_token_id"), eos_token_id=hf("eos_token_id"),
            pad_token_id=hf("pad_token_id"), torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            hf_config=copy.deepcopy(cfg),
        )
        if model_type.startswith("deepseek"):
            nope, rdim = hf("qk_nope_head_dim"), hf("qk_rope_head_dim")
            v2 = model_type == "deepseek_v2"
            if hf("attention_bias"):
                raise ValueError("attention_bias=True is not supported for MLA")
            args = cls(
                **common,
                num_kv_heads=heads,
                head_dim=nope + rdim,
                v_head_dim=hf("v_head_dim"), q_lora_rank=hf("q_lora_rank"), kv_lora_rank=hf("kv_lora_rank"),
                qk_nope_head_dim=nope, qk_rope_head_dim=rdim,
                # V2 always rotates interleaved pairs (complex multiply); V3 says so in rope_interleave.
                rope_interleave=True if v2 else bool(hf("rope_interleave")),
                n_routed_experts=hf("n_routed_experts") or 0,
                n_shared_experts=hf("n_shared_experts") or 0,
                num_experts_per_tok=hf("num_experts_per_tok") or 0,
                moe_intermediate_size=hf("moe_intermediate_size") or 0,
                first_k_dense_replace=hf("first_k_dense_replace") or 0,
                moe_layer_freq=cfg.get("moe_layer_freq") or 1,
                scoring_func="softmax" if v2 else cfg.get("scoring_func", "sigmoid"),
                topk_method=cfg.get("topk_method") or ("greedy" if v2 else "noaux_tc"),
                n_group=hf("n_group") or 1, topk_group=hf("topk_group") or 1,
                norm_topk_prob=bool(hf("norm_topk_prob")),
                routed_scaling_factor=float(hf("routed_scaling_factor")),
            )
            mismatch = args._deepseek_moe_mismatch()
            if mismatch:  # refused here, not later as a puzzling missing / unexpected tensor
                raise ValueError(f"{mismatch[0]} is not supported for model_type={model_type!r}: {mismatch[1]}")
            return args
        head_dim = hf("head_dim") or cfg["hidden_size"] // heads
        bias = bool(hf("attention_bias"))
        return cls(
            **common,
            num_kv_heads=hf("num_key_value_heads") or heads,
            head_dim=head_dim,
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(hf("mlp_bias")),
            qk_norm=model_type == "qwen3",
        )

    def _deepseek_moe_mismatch(self) -> tuple[str, str] | None:
        """(field=value, why) when transformers' DeepSeek builds another MoE than asked: it ignores moe_layer_freq,
        V3's scoring_func / topk_method and V2's scoring_func, so load and save both refuse these (None: fine)."""
        if not (self.model_type.startswith("deepseek") and self.is_moe):
            return None
        if self.moe_layer_freq != 1:
            return f"moe_layer_freq={self.moe_layer_freq}", "transformers makes every layer from " \
                "first_k_dense_replace on an MoE layer"
        v3 = self.model_type == "deepseek_v3"
        scoring, methods = ("sigmoid", ("noaux_tc",)) if v3 else ("softmax", ("greedy", "group_limited_greedy"))
        why = "transformers' DeepSeek-V3 router is always sigmoid with bias-corrected top-k (noaux_tc)" if v3 else \
            "the DeepSeek-V2 router is softmax with greedy or group_limited_greedy top-k"
        if self.scoring_func != scoring:
            return f"scoring_func={self.scoring_func!r}", why
        return (f"topk_method={self.topk_method!r}", why) if self.topk_method not in methods else None

    def transformers_divergence(self) -> str | None:
        """Why transformers computes these (loadable, saveable) args differently from r1fast; None: it does not.

        DeepSeek-V2, norm_topk_prob, k > 1: DeepSeek's modeling_deepseek.py, which trained such weights, renormalizes
        the top-k probabilities *instead of* scaling them; transformers 5 ignores norm_topk_prob for V2. r1fast keeps
        DeepSeek's semantics; checkpoint load and save warn (refusing would strand a fine-tuned model).
        """
        if self.model_type == "deepseek_v2" and self.is_moe and self.norm_topk_prob and self.num_experts_per_tok > 1:
            return (f"deepseek_v2 with norm_topk_prob=True, num_experts_per_tok={self.num_experts_per_tok}: r1fast "
                    "follows DeepSeek's modeling_deepseek.py (top-k probabilities renormalized, routed_scaling_factor="
                    f"{self.routed_scaling_factor} unused); transformers ignores norm_topk_prob for deepseek_v2 and "
                    "scales the raw probabilities: another model (a probe with 8 experts, k=3, scale 1.5: MoE output "
                    "off by 19.5, logits by 0.51)")
        return None

    def _check_expressible(self) -> None:
        """ValueError when the HF architecture of model_type cannot hold these args.

        transformers builds each architecture's modules from its config alone: a weight r1fast has and the
        architecture lacks would be dropped on load, one it has and r1fast lacks filled randomly, so the
        saved checkpoint would load (in transformers and here) as a different model.
        """
        mt = self.model_type

        def refuse(what: str, why: str):
            raise ValueError(f"cannot save as model_type={mt!r}: {what}: {why}")

        if mt.startswith("deepseek"):
            if not self.is_mla:
                refuse(f"kv_lora_rank={self.kv_lora_rank}", "DeepSeek checkpoints use latent attention (kv_lora_rank > 0)")
            if self.mlp_bias:
                refuse("mlp_bias=True", "DeepSeek MLPs have no biases")
            if mismatch := self._deepseek_moe_mismatch():
                refuse(*mismatch)
            if mt == "deepseek_v2" and not self.rope_interleave:
                refuse("rope_interleave=False", "DeepSeek-V2 always rotates interleaved pairs")
            return
        if self.is_mla:
            refuse(f"kv_lora_rank={self.kv_lora_rank}", "latent attention needs model_type deepseek_v3 or deepseek_v2")
        if self.is_moe:
            refuse(f"n_routed_experts={self.n_routed_experts}", "a dense architecture has no MoE layers")
        if self.qk_norm != (mt == "qwen3"):
            refuse(f"qk_norm={self.qk_norm}", "only (and every) qwen3 checkpoint has q_norm / k_norm weights")
        if mt == "qwen2":
            if not self.qkv_bias:
                # transformers' Qwen2 always builds q/k/v biases: without ours it would fill them randomly
                refuse("qkv_bias=False", "a qwen2 checkpoint always has q/k/v biases; build the model with "
                       "qkv_bias=True or model_type='llama'")
            for name in ("o_bias", "mlp_bias"):
                if getattr(self, name):
                    refuse(f"{name}=True", "Qwen2 has biases on q/k/v only")
            return
        if self.qkv_bias != self.o_bias:
            refuse(f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}",
                   "attention_bias puts a bias on all of q/k/v/o or on none")
        if mt == "qwen3" and self.mlp_bias:
            refuse("mlp_bias=True", "Qwen3 MLPs have no biases")

    def to_hf_config(self, dtype: str | None = None) -> dict:
        """The config.json dict (fields this class owns overwrite the stored original's); ValueError for args
        that the HF architecture of model_type cannot express (see ``_check_expressible``)."""
        self._check_expressible()
        out = {
            "architectures": [MODEL_TYPE_TO_ARCH[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            **rope_fields(self.rope_theta, self.rope_scaling),  # both HF forms: 4.x and vLLM read rope_scaling
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.is_mla:
            out.update(
                head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                attention_bias=False,
                n_routed_experts=self.n_routed_experts,
                n_shared_experts=self.n_shared_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                # no experts: make every layer dense (transformers would build MoE layers of 0 experts)
                first_k_dense_replace=self.first_k_dense_replace if self.is_moe else self.num_layers,
                moe_layer_freq=self.moe_layer_freq,
                topk_method=self.topk_method,
                n_group=self.n_group,
                topk_group=self.topk_group,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
            )
            if self.model_type == "deepseek_v3":
                out.update(rope_interleave=self.rope_interleave, scoring_func=self.scoring_func)
        else:
            out["head_dim"] = self.head_dim
            if self.model_type != "qwen2":
                out["attention_bias"] = self.qkv_bias
            if self.model_type == "llama":
                out["mlp_bias"] = self.mlp_bias
        cfg = copy.deepcopy(self.hf_config)
        cfg.pop("torch_dtype", None)
        cfg.pop("quantization_config", None)  # weights are held and written dequantized (checkpoint_fp8)
        cfg.update(out)
        if dtype is not None:
            cfg["dtype"] = dtype
        return cfg

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelArgs:
        """An HF directory's config.json; a one-line ConfigError naming the file (user input: no CLI traceback)."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"{file}: not found (from_pretrained needs an HF model directory)")
        cfg = _read_json(file)
        try:
            args = cls.from_hf_config(cfg)
        except (KeyError, ValueError, TypeError, AttributeError) as e:  # AttributeError: a JSON list, not a dict
            raise ConfigError(f"{file}: {e if not isinstance(e, KeyError) else f'missing field {e}'}") from e
        generation = os.path.join(path, "generation_config.json")
        args.generation_config = _read_json(generation) if os.path.isfile(generation) else None
        return args

    def replace(self, **changes) -> ModelArgs:
        """A copy with some fields changed (re-validated)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelArgs(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("hf_config")
        return d
