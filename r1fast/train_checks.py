"""Checks ``r1fast.train`` runs once the ranks, the tokenizer and the model are known (config checks that need
no model live in ``r1fast.config``): a run directory every rank sees, batches that split evenly over ranks,
prompts and cold-start examples that fit the model's positions, a resume path that names a finished checkpoint,
and a resumed run whose data order is the checkpoint's."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time

from r1fast import distributed as D
from r1fast.config import Config, ConfigError
from r1fast.config_io import DataError
from r1fast.data_setup import encode_prompts, model_positions
from r1fast.rewards.format import continue_open_think, prefix_for
from r1fast.stage_io import completion_prefix

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


def check_golds(scorer, samples: list[dict], task: str) -> None:
    """DataError on every rank when math-verify can parse no gold answer of the training ``samples``
    (``Scorer.unparsable_golds``): rank 0 decides (one pool's work, not one per rank) and broadcasts, so no rank
    is left waiting in a collective for one that raised alone."""
    reason = None
    if D.rank() == 0:
        try:
            reason = scorer.unparsable_golds(samples)
        except RuntimeError as exc:  # the math-verify worker cannot start: raised on every rank, not rank 0 alone
            reason = str(exc)
    reason = D.broadcast_object(reason)
    if reason is not None:
        raise DataError(f"data.task={task!r}: {reason}")


def check_batch_split(cfg: Config, world: int) -> None:
    """Every rank must hold the same share of each batch: ranks run the same collectives per micro-batch."""
    for key, value in (("grpo.prompts_per_step", cfg.grpo.prompts_per_step),
                       ("train.sft_batch_size", cfg.train.sft_batch_size if cfg.train.sft_steps else 0)):
        if value % world:
            raise ConfigError(f"{key}={value} must be divisible by the {world} ranks")


def fit_lengths(cfg: Config, tokenizer, prompt_ids: list[list[int]], sft_samples: list[dict],
                prompt_samples: list[dict]) -> list[dict]:
    """Check that every prompt plus ``rollout.max_new_tokens`` fits the model's positions (ConfigError if not,
    naming the first too-long prompts by their sample ``id`` from ``prompt_samples``: a JSONL file's path:line);
    return the cold-start examples whose prompt + worked solution fit (the longer ones are dropped, as
    ``r1fast.sft`` drops them; ConfigError when none is left). The positions are the tiny model's max_seq_len or
    config.json's, read before the model loads: an HF model's refusal came only after its load (minutes for a 7B)."""
    limit = model_positions(cfg.model)
    source = "model.max_seq_len" if cfg.model.name_or_path == "tiny" else "max_position_embeddings in its config.json"
    where = f"the model holds {limit} positions ({source})"
    budget = limit - cfg.rollout.max_new_tokens
    too_long = [(i, len(p)) for i, p in enumerate(prompt_ids) if len(p) > budget]
    if too_long:
        named = ", ".join(f"{prompt_samples[i].get('id', f'prompt {i}')} ({n} tokens)"
                          for i, n in too_long[:3])
        raise ConfigError(f"{where}, fewer than {len(too_long)} prompt(s) plus rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens} need: {named}{', ...' if len(too_long) > 3 else ''} "
                          f"(longest {max(n for _, n in too_long)} tokens)")
    if not (cfg.train.sft_steps and sft_samples):
        return sft_samples
    prompts = encode_prompts(tokenizer, sft_samples, cfg.data.template)
    prefix = completion_prefix(tokenizer, cfg.data.template)  # the targets as the cold start encodes them
    lengths = [len(p) + len(tokenizer.encode(continue_open_think(s["solution"], prefix_for(prefix, s["prompt"])))) + 1
               for p, s in zip(prompts, sft_samples, strict=True)]
    kept = [s for s, n in zip(sft_samples, lengths, strict=True) if n <= limit]
    if not kept:
        raise ConfigError(f"{where}, fewer than every cold-start example (shortest: {min(lengths)} tokens)")
    if len(kept) < len(sft_samples) and D.rank() == 0:
        print(f"r1fast.train: {len(sft_samples) - len(kept)} of {len(sft_samples)} cold-start examples are longer "
              f"than {limit} tokens and are left out", file=sys.stderr)
    return kept


def fit_kv_cache(cfg: Config, prompt_ids: list[list[int]], prompt_samples: list[dict], capacity_tokens: int) -> None:
    """ConfigError naming rollout.num_blocks and rollout.max_new_tokens unless the longest prompt plus
    max_new_tokens - 1 (the last sampled token is never cached: ``stage_io.generation_limit``) fits a KV cache of
    ``capacity_tokens``. With an explicit num_blocks the trainer checks before the model loads (num_blocks x
    block_size); otherwise once the engine has sized its cache. Before: evaluation's ValueError traceback after
    config.toml and metrics.jsonl were written."""
    r = cfg.rollout
    if not prompt_ids:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    need = len(prompt_ids[longest]) + r.max_new_tokens - 1
    if need <= capacity_tokens:
        return
    blocks = -(-need // r.block_size)
    size = (f"rollout.num_blocks={r.num_blocks} x rollout.block_size={r.block_size}" if r.num_blocks is not None
            else f"the cache sized from rollout.memory_fraction={r.memory_fraction}")
    name = prompt_samples[longest].get("id", f"prompt {longest}")
    raise ConfigError(f"{size} holds {capacity_tokens} KV-cache tokens, but {name} ({len(prompt_ids[longest])} "
                      f"tokens) + rollout.max_new_tokens={r.max_new_tokens} - 1 needs {need}: set rollout.num_blocks "
                      f">= {blocks} or lower rollout.max_new_tokens")


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """The checkpoint directory ``train.resume`` names ('latest': this run's newest complete one), or None.

    Checked before the run writes anything (config.toml, metrics.jsonl): a failed resume left both behind, and
    the next fresh run moved the directory aside as an "earlier run". Rank 0 decides for every rank, so all
    ranks raise the same error (FileNotFoundError for a path that is not there, else ConfigError) before any
    collective could wait on a rank that died alone."""
    if resume is None:
        return None
    verdict = D.broadcast_object(_resume_verdict(resume, run_dir) if D.rank() == 0 else None)
    kind, text = verdict
    if kind == "ok":
        return text
    raise (FileNotFoundError if kind == "missing" else ConfigError)(text)


def _resume_verdict(resume: str, run_dir: str) -> tuple[str, str]:
    """("ok", path), ("missing", message) or ("bad", message) for ``train.resume=resume``."""
    from r1fast.train_state import MANIFEST, finish_interrupted_saves, is_complete_checkpoint, latest_checkpoint

    # a kill between a replaced checkpoint's two renames; before an explicit older checkpoint too, so that
    # rewind_run_dir sets the finished later one aside with the others (a 'resume latest' after a fork killed
    # before its first save renamed it into place and continued the abandoned branch)
    finish_interrupted_saves(run_dir)
    if resume == "latest":
        path = latest_checkpoint(run_dir)
        if path is None:
            return "missing", f"train.resume=latest but {run_dir}/checkpoints holds no finished checkpoint"
        return "ok", path
    if os.path.isfile(resume):
        parent = os.path.dirname(os.path.abspath(resume))
        hint = (f"pass its checkpoint directory {parent!r}"
                if os.path.isfile(os.path.join(parent, "train_state.pt")) else "pass a checkpoint directory")
        return "bad", f"train.resume: {resume!r} is a file, not a checkpoint directory; {hint}"
    if not os.path.isdir(resume):
        return "missing", f"train.resume: checkpoint directory {resume!r} does not exist"
    if not os.path.isfile(os.path.join(resume, "train_state.pt")):
        found = _checkpoint_names(os.path.join(resume, "checkpoints"))
        if found:  # a run directory, e.g. the run's own out_dir/name
            return "bad", (f"train.resume: {resume!r} is a run directory, not a checkpoint: pass 'latest' (to "
                           f"continue the run named by train.out_dir/train.name) or one of its checkpoints "
                           f"({', '.join(found)}) under {os.path.join(resume, 'checkpoints')}")
        return "bad", f"train.resume: {resume!r} is not an r1fast checkpoint (train_state.pt missing)"
    if not is_complete_checkpoint(resume):
        return "bad", (f"train.resume: {resume!r} is incomplete (a file its {MANIFEST} lists is missing or cut "
                       "short: a save killed or a disk that filled up); resume from an earlier checkpoint")
    return "ok", resume


def _checkpoint_names(root: str) -> list[str]:
    """The ``step_<N>`` names under ``root``, by step (at most 5 shown: a long run keeps hundreds)."""
    from r1fast.train_state import _step_dirs

    names = [os.path.basename(path) for _, path in reversed(_step_dirs(root))]
    return names if len(names) <= 5 else [*names[:2], "...", *names[-2:]]


def data_order_fingerprint(cfg: Config, sft_samples: list[dict], train_samples: list[dict]) -> dict:
    """What the order of the examples depends on, saved in the checkpoint's loop state (``data_order``).

    GRPO step ``s`` draws positions ``s*P .. (s+1)*P`` of a stream of ``data.seed``-permuted epochs over the
    n training prompts, and SFT step ``s`` the same with ``train.sft_batch_size`` and ``train.seed`` over the
    cold-start examples (``r1fast.data.order``). A resume with another P, n, seed or set of prompts drew from
    another position (P 4 -> 8 at step 2 skipped 8 of 16 prompts of epoch 0 and repeated others), so these are
    compared on resume. The prompts' content is hashed too: a JSONL file edited in place keeps every key. For a
    JSONL file, whether data.eval_size is 0 decides which lines train (all, or the hash-chosen ~80%)."""
    d, t = cfg.data, cfg.train
    rl = {"data.task": d.task, "data.params": dict(d.params), "data.train_size": d.train_size, "data.seed": d.seed,
          "grpo.prompts_per_step": cfg.grpo.prompts_per_step, "training prompts": _content_hash(train_samples)}
    if d.task.endswith(".jsonl"):
        rl[_JSONL_SPLIT] = "every line (data.eval_size=0)" if d.eval_size == 0 else "~80% by content hash"
    sft = {"data.sft_params": dict(d.sft_params), "data.sft_size": d.sft_size,
           "train.sft_batch_size": t.sft_batch_size, "train.seed": t.seed,
           "cold-start examples": _content_hash(sft_samples)}
    return {"rl": rl, "sft": sft}


_CONTENT_KEYS = ("training prompts", "cold-start examples")
"""The fingerprint's content hashes (reported only when no config key explains the difference)."""

_JSONL_SPLIT = "JSONL lines trained on"
"""The fingerprint key of a JSONL run's split (absent from checkpoints written before every line could train)."""


def _content_hash(samples: list[dict]) -> str:
    """sha256 of the samples as sorted-key JSON (1000 arithmetic prompts: about 5 ms)."""
    text = json.dumps(samples, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_data_order(path: str, loop_state: dict, current: dict) -> None:
    """ConfigError naming every data-order key that differs between the checkpoint at ``path`` and this run
    (its saved and new value); the SFT's keys only for a checkpoint written mid-SFT (after the SFT they no
    longer decide anything). Everything else (lr, steps, schedule, ...) may change: a user extends a run.
    A checkpoint from before fingerprints existed is accepted with one warning. Same outcome on every rank."""
    saved = loop_state.get("data_order")
    if saved is None:
        if D.rank() == 0:
            print(f"r1fast.train: {path} predates data-order fingerprints: resuming without checking that data.*, "
                  "grpo.prompts_per_step and train.sft_batch_size are the ones it was trained with",
                  file=sys.stderr)
        return
    phases = ("rl", "sft") if loop_state.get("sft_step") is not None else ("rl",)
    differ = [(key, old, current[phase].get(key)) for phase in phases for key, old in saved.get(phase, {}).items()
              if current[phase].get(key) != old]
    same_content = not any(key in _CONTENT_KEYS for key, _, _ in differ)
    differ = [d for d in differ if not _same_jsonl_file(*d, same_content)]
    if any(key not in _CONTENT_KEYS for key, _, _ in differ):  # the content hash then differs as a consequence
        differ = [d for d in differ if d[0] not in _CONTENT_KEYS]
    changed = [f"{key}: {old!r} in the checkpoint, {new!r} now" + (" (the data itself changed)" if key in
               _CONTENT_KEYS else "") for key, old, new in differ]
    if changed:
        raise ConfigError(f"train.resume: {path} was trained on another data order ({'; '.join(changed)}); the "
                          "resumed run would skip or repeat examples. Resume with the checkpoint's values, or start "
                          "a fresh run (train.resume=none, or another train.name)")


def _same_jsonl_file(key: str, old, new, same_content: bool) -> bool:
    """Whether a data.task difference is only how one JSONL file was named (./math.jsonl, then /abs/math.jsonl):
    the order depends on the lines, not on the path that led to them, so the content hashes decide; a path that
    resolves to the same file is no news either when the content changed (the hashes report that)."""
    if key != "data.task" or not all(isinstance(v, str) and v.endswith(".jsonl") for v in (old, new)):
        return False
    return same_content or os.path.realpath(old) == os.path.realpath(new)
