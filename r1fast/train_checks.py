"""Checks ``r1fast.train`` runs once the ranks, the tokenizer and the model are known (config checks that need
no model live in ``r1fast.config``): a run directory every rank sees, batches that split evenly over ranks,
prompts and cold-start examples that fit the model's positions."""

from __future__ import annotations

import os
import secrets
import sys
import time

from r1fast import distributed as D
from r1fast.config import Config, ConfigError
from r1fast.data_setup import encode_prompts

SHARED_DIR_WAIT_S = 5.0
"""How long a rank looks for rank 0's marker before calling the directory not shared: NFS clients may see a
new file a moment late (attribute caching); on one filesystem it is there at once."""


def check_shared_run_dir(cfg: Config, run_dir: str) -> None:
    """ConfigError naming train.out_dir on every rank unless all ranks see one ``run_dir``.

    Every rank writes its RNG state into the checkpoint rank 0 creates and reads the checkpoint back on resume:
    with per-node local disks (or a relative out_dir under different working directories) the run trained to
    the end and then died in its first save. Rank 0 writes a marker with a fresh token, every rank looks for
    it, and all ranks agree on the outcome; the marker is removed again."""
    if D.world_size() <= 1:
        return
    token = D.broadcast_object(secrets.token_hex(8) if D.rank() == 0 else None)
    marker = os.path.join(run_dir, f".shared-check-{token}")
    if D.rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(marker, "w") as f:
            f.write(token)
    D.barrier()
    deadline = time.monotonic() + SHARED_DIR_WAIT_S
    while not (seen := _holds(marker, token)) and time.monotonic() < deadline:
        time.sleep(0.25)
    blind = [r for r, ok in enumerate(D.all_gather_object(seen)) if not ok]
    if D.rank() == 0:
        os.remove(marker)
    if blind:
        D.shutdown()  # every rank is here: leave the group together (gloo's teardown at exit aborted some ranks)
        ranks = ", ".join(map(str, blind))
        raise ConfigError(f"train.out_dir={cfg.train.out_dir!r} must be a directory all nodes share (one filesystem "
                          f"at the same path; a relative path resolves against each node's working directory): "
                          f"rank(s) {ranks} do not see {os.path.abspath(run_dir)} as rank 0 does, and every rank "
                          f"writes checkpoints there and reads them back on resume")


def _holds(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


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
