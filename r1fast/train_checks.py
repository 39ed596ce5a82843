"""Checks ``r1fast.train`` runs once the ranks, the tokenizer and the model are known (config checks that need
no model live in ``r1fast.config``): batches that split evenly over ranks, prompts and cold-start examples that
fit the model's positions."""

from __future__ import annotations

import sys

from r1fast import distributed as D
from r1fast.config import Config, ConfigError
from r1fast.data_setup import encode_prompts


def check_batch_split(cfg: Config, world: int) -> None:
    """Every rank must hold the same share of each batch: ranks run the same collectives per micro-batch."""
    for key, value in (("grpo.prompts_per_step", cfg.grpo.prompts_per_step),
                       ("train.sft_batch_size", cfg.train.sft_batch_size if cfg.train.sft_steps else 0)):
        if value % world:
            raise ConfigError(f"{key}={value} must be divisible by the {world} ranks")


def fit_lengths(cfg: Config, tokenizer, model, prompt_ids: list[list[int]], sft_samples: list[dict]) -> list[dict]:
    """Check that every prompt plus ``rollout.max_new_tokens`` fits the model's positions (ConfigError if not);
    return the cold-start examples whose prompt + worked solution fit (the longer ones are dropped, as
    ``r1fast.sft`` drops them; ConfigError when none is left)."""
    limit = model.args.max_position_embeddings
    source = "model.max_seq_len" if cfg.model.name_or_path == "tiny" else "max_position_embeddings in its config.json"
    where = f"the model holds {limit} positions ({source})"
    longest = max((len(p) for p in prompt_ids), default=0)
    if longest + cfg.rollout.max_new_tokens > limit:
        raise ConfigError(f"{where}, fewer than the longest prompt ({longest} tokens) plus "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}")
    if not (cfg.train.sft_steps and sft_samples):
        return sft_samples
    prompts = encode_prompts(tokenizer, sft_samples, cfg.data.template)
    lengths = [len(p) + len(tokenizer.encode(s["solution"])) + 1 for p, s in zip(prompts, sft_samples, strict=True)]
    kept = [s for s, n in zip(sft_samples, lengths, strict=True) if n <= limit]
    if not kept:
        raise ConfigError(f"{where}, fewer than every cold-start example (shortest: {min(lengths)} tokens)")
    if len(kept) < len(sft_samples) and D.rank() == 0:
        print(f"r1fast.train: {len(sft_samples) - len(kept)} of {len(sft_samples)} cold-start examples are longer "
              f"than {limit} tokens and are left out", file=sys.stderr)
    return kept
