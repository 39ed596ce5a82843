"""Run configuration: one dataclass per concern, TOML files, ``--section.field value`` overrides.

Every field carries a docstring (the string literal under it, read back with ``ast`` for ``--help``),
so adding an option is one annotated line plus its docstring. Types come from the annotation:
``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (choices), ``X | None`` (written ``none``),
``list[X]``, ``tuple[X, ...]``/``tuple[X, Y]``, ``dict[str, X]`` and nested dataclasses (sections).
Numeric ranges are declared with ``bounded(default, ge=.., gt=.., le=.., lt=..)``; they apply to every
element of a list/tuple/dict value too.

Validation is strict and every error is a one-line ``ConfigError`` naming the full key:
unknown keys (with the allowed ones listed), wrong types, values outside choices or ranges, and the
cross-field rules in ``Config.validate`` / each section's ``validate``. ``config_to_toml`` writes the
resolved config so that ``load_config`` of that file gives back an equal ``Config``; ``None`` is written
as the string ``"none"`` (TOML has no null), so an ``str | None`` field cannot hold the text "none".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from r1fast import config_dump, config_io
from r1fast.config_checks import check_dir_name, check_master_weights
from r1fast.config_dump import config_to_toml, field_docs, save_config
from r1fast.config_io import (
    ConfigError,
    _check_tree,  # noqa: F401  (Config.validate)
    bounded,
)
from r1fast.data.templates import TEMPLATES
from r1fast.seeding import SEED_MAX, SEED_MIN

__all__ = [
    "ConfigError", "bounded", "ModelConfig", "RolloutConfig", "GRPOConfig", "RewardsConfig", "DataConfig",
    "ParallelConfig", "TrainConfig", "Config", "load_config", "config_to_toml", "save_config", "describe",
    "field_docs", "parse_cli", "check_dir_name",
]

DATA_TEMPLATES = (*TEMPLATES, "chat", "auto")
"""Values of data.template: the named templates of r1fast.data, plus 'chat' (the tokenizer's chat template) and
'auto' (the template the checkpoint was trained with when r1fast recorded it, else 'chat' when the tokenizer has a
chat template, else 'r1_zero'; see ``r1fast.stage_io.resolve_template``)."""


# ---------------------------------------------------------------------------------------------------
# Sections. Defaults describe a tiny run that finishes on a laptop CPU (tests/test_config.py checks that
# its longest prompt plus rollout.max_new_tokens fits model.max_seq_len).
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The policy model (and its tokenizer)."""

    name_or_path: str = "tiny"
    """'tiny' builds the small in-code transformer from the shape fields below; otherwise a local HF
    model directory (config.json + safetensors), whose own config overrides the shape fields."""
    tokenizer: str | None = None
    """Tokenizer directory; none = the model directory ('tiny' uses the built-in character tokenizer)."""
    vocab_size: int | None = bounded(None, ge=1)
    """Vocabulary of the tiny model; none = exactly the tokenizer's (larger would let it sample
    ids the tokenizer cannot decode)."""
    hidden_size: int = bounded(64, ge=1)
    """Width of the residual stream."""
    num_layers: int = bounded(2, ge=1)
    """Number of transformer blocks."""
    num_heads: int = bounded(4, ge=1)
    """Query heads per attention layer; must divide hidden_size."""
    num_kv_heads: int = bounded(2, ge=1)
    """Key/value heads (grouped-query attention); must divide num_heads."""
    intermediate_size: int = bounded(128, ge=1)
    """Hidden width of the SwiGLU MLP."""
    # 512: the default task's longest R1-Zero prompt is 374 character tokens (the template alone is 365),
    # plus rollout.max_new_tokens = 64 makes 438.
    max_seq_len: int = bounded(512, ge=1)
    """Longest prompt + completion the tiny model (RoPE cache, KV cache) must hold; an HF model's own
    max_position_embeddings replaces it."""
    rope_theta: float = bounded(10000.0, gt=0)
    """RoPE base frequency."""
    head_dim: int | None = bounded(None, ge=2)
    """Width of one attention head; none = hidden_size / num_heads."""
    rms_norm_eps: float = bounded(1e-6, gt=0)
    """Epsilon of the RMSNorm layers."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head (tiny model)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype (bfloat16 on GPUs; float32 for CPU runs and tests). Training keeps fp32 master weights and
    optimizer state for bfloat16/float16 (FSDP2 mixed precision, so parallel.fsdp must be on); checkpoints are
    written in this dtype. float16 trains without loss scaling: activation gradients below its smallest
    subnormal (6e-8) flush to zero and those below 6e-5 lose bits, so prefer bfloat16 wherever the GPU has it."""

    def validate(self) -> None:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size} "
                              "when model.head_dim is none")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model head dim {self.resolved_head_dim} must be even (RoPE rotates pairs of "
                              "dimensions); set model.head_dim or model.num_heads")

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, or hidden_size // num_heads when it is none."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass
class RolloutConfig:
    """Generation of the completions (the rollout engine and its paged KV cache)."""

    max_new_tokens: int = bounded(64, ge=1)
    """Longest completion; also the fixed normalizer L of the dr_grpo loss."""
    # 1e-5 = r1fast.rollout.sampler.MIN_TEMPERATURE, the smallest the engine samples at (fp32 logits
    # divided by less overflow to inf); greedy (0) is no option here since GRPO divides by it too.
    temperature: float = bounded(1.0, ge=1e-5)
    """Sampling temperature of the GRPO rollouts (>= 1e-5: the engine and the loss divide the logits by it;
    held-out evaluation uses its own, see train.eval_samples)."""
    top_p: float = bounded(1.0, gt=0, le=1)
    """Nucleus sampling mass (1 = off)."""
    top_k: int = bounded(0, ge=0)
    """Keep only the k most likely tokens (0 = off)."""
    block_size: int = bounded(16, ge=8, le=128)
    """Tokens per KV-cache block; a power of two from 8 to 128 (the paged-attention kernel's page)."""
    num_blocks: int | None = bounded(None, ge=1)
    """KV-cache blocks to allocate; none = on CUDA, as many as memory_fraction of free GPU memory allows;
    on CPU, a fixed 65,536 tokens (at most 1 GiB; r1fast.rollout.engine.CPU_CACHE_TOKENS)."""
    max_batch_tokens: int = bounded(4096, ge=1)
    """Token budget of one engine step (prefill + decode); bounds activation memory."""
    memory_fraction: float = bounded(0.5, gt=0, le=1)
    """Fraction of free GPU memory the KV cache may take when num_blocks is none, counted after setting aside
    what training allocates later (AdamW moments, gradients, the weights gathered for generation:
    r1fast.memory_budget) (CUDA only; ignored on CPU, where the cache has a fixed size)."""

    def validate(self) -> None:
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"rollout.block_size={self.block_size} must be a power of two")


@dataclass
class GRPOConfig:
    """The GRPO objective: groups, advantages, clipping, KL, loss normalization, filters."""

    prompts_per_step: int = bounded(4, ge=1)
    """P: prompts drawn per optimizer step."""
    samples_per_prompt: int = bounded(4, ge=2)
    """G: completions sampled per prompt (the group; GRPO's advantage needs at least 2)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the reward std of the group, of the whole batch, or not at all (Dr. GRPO)."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    """Loss normalization: grpo = mean per sequence then over sequences; bnpo = over this rank's tokens
    of the rollout batch (so it depends on the number of ranks; on one rank it equals dapo); dr_grpo =
    sum / (sequences x rollout.max_new_tokens); dapo = over the global batch's tokens."""
    eps_low: float = bounded(0.2, ge=0, lt=1)
    """Lower clip: the ratio is clipped at 1 - eps_low."""
    eps_high: float = bounded(0.2, ge=0)
    """Upper clip: the ratio is clipped at 1 + eps_high (DAPO's clip-higher uses 0.28)."""
    delta: float | None = bounded(None, gt=1)
    """Two-sided clipping: cap the ratio at delta for negative advantages; none = off. Must exceed 1 + eps_high
    (below it the cap clips positive advantages too)."""
    beta: float = bounded(0.001, ge=0)
    """Weight of the k3 KL penalty to the reference model (0 = no reference model)."""
    ref_update_steps: int = bounded(0, ge=0)
    """Copy the policy into the reference model every N steps (0 = never)."""
    updates_per_rollout: int = bounded(1, ge=1)
    """mu: optimizer updates on each batch of rollouts (>1 makes the ratio differ from 1)."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO) or per sequence, length-normalized (GSPO)."""
    dynamic_sampling: bool = False
    """Drop groups without signal from the loss (DAPO's filter; the batch is not refilled): groups whose valid
    (not skipped) rewards are all equal, so all their advantages are 0, or with fewer than 2 valid samples. What
    that changes depends on the loss: dapo/bnpo leave the dropped tokens out of the token normalizer (the kept
    groups' gradients grow by all tokens / kept tokens); with beta > 0 the KL term stops training on them (every
    loss type); grpo/dr_grpo still count dropped rows in their per-sequence mean, as TRL counts masked rows, so
    with beta = 0 the gradient would not change and that combination is refused. A step whose groups are all
    dropped takes no optimizer update."""
    overlong_filter: bool = False
    """Mask out completions truncated at max_new_tokens from the loss (DAPO). dapo/bnpo leave their tokens out of
    the token normalizer; grpo/dr_grpo still count their rows in the per-sequence mean (B), as TRL does."""
    soft_overlong_penalty: bool = False
    """Penalize completions linearly over the last overlong_cache_len tokens before max_new_tokens (DAPO)."""
    overlong_cache_len: int = bounded(16, ge=1)
    """Length of the soft overlong penalty ramp, in tokens."""
    micro_batch_size: int = bounded(8, ge=1)
    """Completions per forward/backward pass (gradient accumulation over the batch)."""


@dataclass
class RewardsConfig:
    """Rule-based rewards and the code sandbox."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    """Weight per reward name; the total reward is the weighted sum. CLI: --rewards.weights.format 0.2."""
    format_partial_credit: bool = False
    """Give partial format reward per well-formed tag instead of all-or-nothing."""
    language: Literal["en", "zh"] = "en"
    """Target language of the language-consistency reward (the scripts it can count: en, zh)."""
    repetition_unit: Literal["word", "char"] = "word"
    """What the repetition penalty's n-grams are made of: words (split at whitespace), or characters for text
    without spaces (Chinese, or '7+5=12,' loops), whose word n-grams never repeat."""
    repetition_ngram_size: int = bounded(3, ge=1)
    """n of the repetition penalty's n-grams (its weight scales the penalty)."""
    length_cosine_values: tuple[float, float, float, float] = (-1.0, -0.5, 0.5, 1.0)
    """The cosine length reward's (min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)."""
    sandbox_timeout_s: float = bounded(5.0, gt=0)
    """Wall-clock limit for running one generated program."""
    sandbox_memory_mb: int = bounded(512, ge=16)
    """Memory limit of one program run: each process's address space, and all of them with a cgroup."""
    code_all_or_nothing: bool = False
    """Code reward 1 only when every test passes (False: the fraction of tests passed)."""
    require_answer_tag: bool = True
    """Math accuracy grades only the <answer> block (no block: 0). Set false for a chat template or a model that
    answers outside the R1 tags (R1-Distill, QwQ: '...</think> The answer is \\boxed{7}.'): math-verify then
    searches the whole completion. Used by rewards and held-out evaluation alike (r1fast.eval's flag)."""

    def validate(self) -> None:
        if not self.weights:
            raise ConfigError("rewards.weights: expected a non-empty dict of reward name -> weight")
        for name, weight in self.weights.items():
            if not math.isfinite(weight):
                raise ConfigError(f"rewards.weights.{name}: expected a finite float, got {weight!r}")


@dataclass
class DataConfig:
    """Prompts: which task, how many, which template."""

    task: str = "arithmetic"
    """A built-in task name (see r1fast.data) or a path to a .jsonl file of prompts and answers."""
    train_size: int = bounded(1000, ge=1)
    """Training prompts: generated for a built-in task; for a JSONL file, the first N prompts of the file's
    train split (~80% of its lines, chosen by content hash; every line when data.eval_size = 0), so fewer when
    that split is smaller."""
    eval_size: int = bounded(64, ge=0)
    """Held-out evaluation prompts (0 = no evaluation set); for a JSONL file they are drawn from the
    held-out ~20% of its lines, and with 0 those lines train too."""
    seed: int = bounded(0, ge=SEED_MIN, le=SEED_MAX)
    """Seed of task generation and prompt shuffling (a signed 64-bit integer, as TOML allows)."""
    template: str = "r1_zero"
    """Prompt template: 'r1_zero' (the DeepSeek-R1-Zero template verbatim), 'compact', 'none', 'chat'
    (the tokenizer's chat template) or 'auto' (the template the checkpoint was trained with, else its chat
    template, else r1_zero)."""
    params: dict[str, int] = field(default_factory=dict)
    """Difficulty knobs of the generated task for GRPO and evaluation, e.g. {min_digits = 2, max_digits = 3}."""
    sft_params: dict[str, int] = field(default_factory=dict)
    """Difficulty knobs of the cold-start SFT's worked solutions (empty = the task's defaults)."""
    sft_size: int = bounded(2000, ge=1)
    """Distinct worked solutions generated for the cold-start SFT."""


@dataclass
class ParallelConfig:
    """How the model is spread over devices and what it recomputes."""

    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo otherwise."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    fp8_experts: bool = False
    """Run the routed experts of an MoE model in FP8 (DeepSeek-V3 recipe: 1x128 activation tiles,
    128x128 weight blocks, master weights quantized once per optimizer step); hidden and expert
    intermediate sizes must be multiples of 128. Dense models reject it."""
    timeout_s: float = bounded(1800.0, gt=0)
    """Seconds a collective may wait for the other ranks before the process group fails the run (a rank
    that hangs or a node that loses its network); torch's default is 1800 for gloo and 600 for NCCL."""


@dataclass
class TrainConfig:
    """The training loop: optimizer, schedule, logging, checkpoints, cold-start SFT."""

    name: str = "tiny"
    """Run name; outputs go to out_dir/name."""
    steps: int = bounded(20, ge=0)
    """GRPO optimizer steps."""
    lr: float = bounded(3e-4, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW decoupled weight decay, applied to every parameter (norm gains and biases too, as torchtitan and
    verl do; Hugging Face's Trainer exempts them). AdamW's eps is torch's 1e-8."""
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    """AdamW (beta1, beta2)."""
    grad_clip: float = bounded(1.0, ge=0)
    """Clip the global gradient norm to this value (0 = off)."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear learning-rate warmup, in GRPO steps that updated the weights (the updates_per_rollout updates of
    one step share its rate; a step that skipped every update does not advance the schedule)."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    seed: int = bounded(0, ge=SEED_MIN, le=SEED_MAX)
    """Seed of model init and sampling (a signed 64-bit integer; the per-sample seeds derived from it are
    reduced into torch's range by r1fast.seeding)."""
    out_dir: str = "runs"
    """Directory holding one subdirectory per run."""
    checkpoint_every: int = bounded(0, ge=0)
    """Save a checkpoint every N steps (0 = no periodic checkpoints)."""
    keep_last: int = bounded(0, ge=0)
    """Keep only the newest N complete checkpoints of the run, deleting older ones after each save; every
    save counts (periodic, SIGTERM, final, the cold-start SFT's step_0). 0 = keep all; a 7B model's
    checkpoint with AdamW state is ~112 GB."""
    log_every: int = bounded(1, ge=1)
    """Write metrics every N steps."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate on the held-out prompts every N GRPO steps (0 = not between steps); the evaluations before
    the cold-start SFT (when there is one), before RL and after RL always run."""
    eval_samples: int = bounded(1, ge=1)
    """k: completions sampled per evaluation prompt at temperature 0.6, top-p 0.95 (R1's evaluation), next
    to one greedy completion; only pass@1 averaged over the k is reported (r1fast.eval gives pass@k)."""
    resume: str | None = None
    """none = fresh run; 'latest' = newest checkpoint under out_dir/name; else a checkpoint directory."""
    sft_steps: int = bounded(0, ge=0)
    """Cold-start supervised fine-tuning steps before GRPO (0 = R1-Zero style, no SFT)."""
    sft_lr: float = bounded(1e-4, gt=0)
    """Learning rate of the cold-start SFT."""
    sft_batch_size: int = bounded(32, ge=1)
    """Worked solutions per cold-start SFT step (global, split over ranks)."""

    def validate(self) -> None:
        check_dir_name(self.name, "train.name")


@dataclass
class Config:
    """A whole run: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model and tokenizer."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation of completions."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """The GRPO objective."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Rule-based rewards."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and templates."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distribution and compilation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""

    def validate(self) -> Config:
        """Check every field's type and range, each section's own rules, then cross-section rules."""
        _check_tree(self, "")
        g, r = self.grpo, self.rollout
        check_master_weights(self.model.dtype, self.parallel.fsdp)
        if g.dynamic_sampling and g.loss_type in ("grpo", "dr_grpo") and g.beta == 0:
            # the dropped groups' advantages are 0 and these losses keep their rows in the per-sequence mean:
            # a probe's gradient was bit-identical with and without the filter (dapo: 0.48 relative change)
            raise ConfigError(f"grpo.dynamic_sampling=true has no effect with grpo.loss_type={g.loss_type} and "
                              "grpo.beta=0 (dropped groups have zero advantage and still count in the "
                              "per-sequence mean); use grpo.loss_type=dapo or bnpo, whose token normalizer "
                              "counts only kept groups, or set grpo.beta > 0 (the KL term then skips them)")
        if g.ref_update_steps and g.beta == 0:  # accepted and silently a no-op before
            raise ConfigError(f"grpo.ref_update_steps={g.ref_update_steps} has no effect with grpo.beta=0: no "
                              "reference model is kept (set grpo.beta > 0, or ref_update_steps = 0)")
        if g.delta is not None and g.delta <= 1 + g.eps_high:
            # at or below 1 + eps_high the cap binds for positive advantages too (min(r, delta) < clip(r)): not the
            # two-sided clipping the field documents
            raise ConfigError(f"grpo.delta={g.delta} must exceed 1 + grpo.eps_high = {1 + g.eps_high:g}: below it the "
                              "ratio cap also clips positive advantages; it is meant for negative ones only")
        if g.soft_overlong_penalty and g.overlong_cache_len >= r.max_new_tokens:
            raise ConfigError(f"grpo.overlong_cache_len={g.overlong_cache_len} must be < "
                              f"rollout.max_new_tokens={r.max_new_tokens} when grpo.soft_overlong_penalty is on")
        # model.max_seq_len sizes only the tiny model; an HF model's limit is its config's, checked against
        # the real prompts once they are tokenized (r1fast.train_checks.fit_lengths)
        if self.model.name_or_path == "tiny" and r.max_new_tokens >= self.model.max_seq_len:
            raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} must be < model.max_seq_len="
                              f"{self.model.max_seq_len} (the prompt needs room)")
        if self.data.template not in DATA_TEMPLATES:
            raise ConfigError(f"data.template: unknown template {self.data.template!r}; allowed: "
                              f"{', '.join(DATA_TEMPLATES)}")
        return self


def load_config(path: str | None = None, overrides: list[str] | None = None, *, schema: type | None = None) -> Any:
    """Defaults, then the TOML file at ``path`` (if any), then ``--section.field value`` overrides, validated."""
    return config_io.load_config(path, overrides, schema=schema or Config)


def describe(cfg_cls: type | None = None, prefix: str = "") -> str:
    """Every option as ``--key TYPE = default`` followed by its docstring (for --help)."""
    return config_dump.describe(cfg_cls or Config, prefix)


def parse_cli(argv: list[str] | None = None, *, default_config: str | None = None) -> tuple[str | None, list[str]]:
    """Split argv into (config path or None, override tokens); ``--help`` prints every option (with the
    values of ``--config`` or ``default_config``) and exits."""
    return config_io.parse_cli(argv, schema=Config, default_config=default_config)
