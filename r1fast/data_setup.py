"""Builds what a run trains on from its config: tokenizer, policy model, and the prompt sets."""

from __future__ import annotations

import os

import torch

from r1fast.checkpoint import resolve_dtype
from r1fast.config import Config, ConfigError, ModelConfig
from r1fast.config_io import DataError
from r1fast.data import MIXTURES, TASKS, generate_tasks, load_jsonl, split_of, worked_solution
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.stage_io import (
    check_chat_template,
    check_checkpoint,
    check_tokenizer_fits,
    data_errors,
    empty_data_error,
    encode_prompt,
    render_prompt,
)
from r1fast.tokenizer import CharTokenizer
from r1fast.tokenizer import load as load_tokenizer


def build_tokenizer(m: ModelConfig):
    """The tokenizer of a model section alone: the character tokenizer for 'tiny', else the checkpoint's (or
    ``model.tokenizer``'s). Under a second even for a 150k-token tokenizer.json, so stages check their data with
    it before loading a model (a 7B load takes minutes). The model directory is checked first
    (``stage_io.check_checkpoint``: config.json and weights present), so a broken one fails before any work."""
    if m.name_or_path == "tiny":
        return CharTokenizer()
    if not os.path.isdir(m.name_or_path):
        raise ConfigError(f"model.name_or_path: {m.name_or_path!r} is neither 'tiny' nor a local model directory")
    check_checkpoint(m.name_or_path, "model.name_or_path")
    if m.tokenizer and not os.path.isdir(m.tokenizer):
        raise ConfigError(f"model.tokenizer: {m.tokenizer!r} is not a directory (it names the tokenizer's files)")
    return load_tokenizer(m.tokenizer or m.name_or_path)


def model_positions(m: ModelConfig) -> int:
    """The positions of the model a section builds, read before it loads (a 7B load takes minutes): the tiny
    model's ``max_seq_len``, else ``max_position_embeddings`` of the checkpoint's config.json."""
    return m.max_seq_len if m.name_or_path == "tiny" else ModelArgs.from_dir(m.name_or_path).max_position_embeddings


def build_model(cfg: Config, tok, device: torch.device, dtype: torch.dtype | None = None) -> Transformer:
    """('tiny') a small Qwen2-style model built in code for the character tokenizer ``tok``, or the local HF
    directory (``tok`` checked against it: ``stage_io.check_tokenizer_fits``); parameters in ``dtype``
    (default: model.dtype; training passes its fp32 master dtype)."""
    m = cfg.model
    dtype = dtype or resolve_dtype(m.dtype)
    if m.name_or_path == "tiny":
        if m.vocab_size is not None and m.vocab_size != tok.vocab_size:
            raise ConfigError(f"model.vocab_size={m.vocab_size} must equal the character tokenizer's "
                              f"{tok.vocab_size} ids (or be none)")
        args = ModelArgs(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=m.hidden_size,
                         intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
                         num_kv_heads=m.num_kv_heads, head_dim=m.resolved_head_dim, rms_norm_eps=m.rms_norm_eps,
                         rope_theta=m.rope_theta, max_position_embeddings=m.max_seq_len,
                         qkv_bias=True, tie_word_embeddings=m.tie_word_embeddings, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id, torch_dtype=m.dtype)
        return Transformer.from_config(args, dtype=dtype, device=device, seed=cfg.train.seed)
    model = Transformer.from_pretrained(m.name_or_path, dtype=dtype, device=device)
    check_tokenizer_fits(tok, model, "model.tokenizer" if m.tokenizer else "model.name_or_path")
    return model


def build_datasets(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(cold-start SFT samples with a 'solution', GRPO training prompts, held-out prompts).

    Generated tasks: SFT and GRPO samples come from the train split, evaluation from the held-out
    split; the splits are disjoint by content hash. A JSONL file is split the same way, except that with
    data.eval_size = 0 every line trains (``split_rows``).
    """
    d, t = cfg.data, cfg.train
    if d.task in TASKS or d.task in MIXTURES:
        def generate(key: str, params: dict, n: int, **kw) -> list[dict]:
            try:
                return generate_tasks(d.task, n, **kw, **params)
            except ValueError as err:  # a difficulty knob the task does not take, or too few distinct samples
                raise ConfigError(f"{key}={params} does not fit data.task={d.task!r}: {err}") from None

        train = generate("data.params", d.params, d.train_size, seed=d.seed, split="train")
        heldout = generate("data.params", d.params, d.eval_size, seed=d.seed, split="heldout") if d.eval_size else []
        sft = []
        if t.sft_steps:
            sft = generate("data.sft_params", d.sft_params, d.sft_size, seed=d.seed + 1, split="train")
            sft = [{**s, "solution": worked_solution(s)} for s in sft]
        return sft, train, heldout
    if not d.task.endswith(".jsonl"):
        raise ConfigError(f"data.task: {d.task!r} is neither a built-in task ({sorted(TASKS) + sorted(MIXTURES)}) "
                          "nor a .jsonl file")
    return _jsonl_datasets(cfg)


def _jsonl_datasets(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """``build_datasets`` for a JSONL file: every check that the splits can feed the run comes here, before the
    model loads (a file whose lines all fell in the held-out split crashed the first GRPO step, minutes later)."""
    d, t = cfg.data, cfg.train
    with data_errors():  # a malformed line is the user's data, reported in one line naming path:line
        rows = load_jsonl(d.task)
    if not rows:
        raise empty_data_error(d.task, "data.task", '{"prompt": ..., "answer": ...}')
    train, heldout = split_rows(rows, d.eval_size)
    if not train:
        raise DataError(f"data.task: none of the {len(rows)} line(s) of {d.task} fell in the training split (by "
                        f"content hash ~80% train / 20% held-out: train 0, held-out {len(heldout)}); add lines, or "
                        "set data.eval_size=0 to train on every line (no held-out evaluation)")
    train, heldout = train[: d.train_size], heldout[: d.eval_size]
    sft = [r for r in train if r.get("solution")]
    if t.sft_steps and not sft:
        raise ConfigError(f"train.sft_steps={t.sft_steps} but no training line of {d.task} has a 'solution' to "
                          "imitate: set train.sft_steps=0 (--train.sft_steps 0: pure RL from the model as loaded, "
                          "as R1-Zero) or add a \"solution\" field (the target completion, e.g. "
                          "\"<think>...</think><answer>...</answer>\") to the lines")
    return sft, train, heldout


def split_rows(rows: list[dict], eval_size: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) lines of a JSONL file, disjoint by content hash (~20% held out); with ``eval_size`` 0
    nothing is evaluated, so every line trains (the held-out 20% were otherwise neither trained on nor scored:
    every pipeline rl stage runs with eval_size 0)."""
    if eval_size == 0:
        return list(rows), []
    heldout = [split_of(r.get("task", "jsonl"), r["prompt"], 0.2) == "heldout" for r in rows]
    return [r for r, h in zip(rows, heldout, strict=True) if not h], [r for r, h in zip(rows, heldout, strict=True) if h]


def encode_prompts(tokenizer, samples: list[dict], template: str) -> list[list[int]]:
    """Token ids of each sample's prompt: a named template with <bos> first when the tokenizer has one, or
    the tokenizer's chat template (``chat``, or ``auto`` when it has one), as r1fast.sft and r1fast.eval
    render them, so every stage conditions the model on the same text."""
    check_chat_template(tokenizer, template, "data.template")
    return [encode_prompt(tokenizer, render_prompt(tokenizer, template, prompt=s["prompt"]), template) for s in samples]
