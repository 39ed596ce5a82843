"""Helpers every stage shares (sft, eval, rejection, the pipeline): checkpoint and file checks done
before any work, file and checkpoint identities (resume decisions), bad user data as a one-line
``DataError``, this rank's device and dtype, loading a policy, and rendering / encoding prompts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterable

import torch

from r1fast import distributed as D
from r1fast.checkpoint import INDEX_FILE, SINGLE_FILE, resolve_dtype, weights_file
from r1fast.config import DATA_TEMPLATES, ModelConfig
from r1fast.config_io import ConfigError, DataError
from r1fast.data import apply_template
from r1fast.safe_write import replace_atomically

_DTYPE_NAMES = ("bfloat16", "float16", "float32")


def check_template(template: str, key: str) -> None:
    if template not in DATA_TEMPLATES:
        raise ConfigError(f"{key}: unknown template {template!r}; allowed: {', '.join(DATA_TEMPLATES)}")


def check_chat_template(tokenizer, template: str, key: str) -> None:
    """ConfigError naming ``key`` when ``template`` is 'chat' but the tokenizer has none to render with ('auto'
    falls back to r1_zero instead). A config mistake, so every stage checks it before rendering any prompt:
    otherwise the first record's render raised a bare ValueError after the model was built."""
    if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{key}=chat but the tokenizer has no chat_template (auto falls back to r1_zero)")


def check_checkpoint(path: str, key: str) -> None:
    """FileNotFoundError naming ``key`` and the missing file unless ``path`` is an HF model directory: config.json
    and its weights (model.safetensors or model.safetensors.index.json). Reads no tensor, so every stage runs it
    before any work: missing weights otherwise surfaced after data and tokenizer were prepared, as a traceback."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}: checkpoint directory {path!r} does not exist")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{key}: {path!r} is not a model checkpoint (no config.json in it: {config} does "
                                "not exist)")
    if weights_file(path) is None:
        raise FileNotFoundError(f"{key}: {path!r} holds no weights: neither {os.path.join(path, SINGLE_FILE)} nor "
                                f"{os.path.join(path, INDEX_FILE)} exists")


def nearest_existing(path: str) -> str:
    """The absolute ``path``, or its nearest ancestor that exists: what an output path will be created under (a
    file there makes os.makedirs fail, after the work whose results it was to hold)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return existing


def check_file(path: str, key: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: file {path!r} does not exist")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_identity(path: str) -> dict | None:
    """A checkpoint directory's identity: sha256 of its files' names, sizes and mtimes (None: no directory).
    Not of the contents: hashing a 7B model's 15 GB of weights on every resume would take about a minute."""
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            h.update(f"{os.path.relpath(os.path.join(root, name), path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"listing_sha256": h.hexdigest()}


@contextlib.contextmanager
def data_errors():
    """Re-raise the ValueError of r1fast.data's JSONL readers (its message names ``path:line``) as a
    ``DataError``: bad user data, which the CLIs report in one line, not a bug with a traceback."""
    try:
        yield
    except (ConfigError, DataError):
        raise
    except ValueError as err:
        raise DataError(str(err)) from err


def empty_data_error(path: str, key: str, what: str) -> DataError:
    """The one-line error for a data file ``key`` that holds no records (``what``: the record's shape)."""
    return DataError(f"{key}: {path!r} holds no records (expected one JSON object per line: {what})")


def pick_device_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """This rank's device, and ``dtype`` ('auto' = bfloat16 on CUDA, float32 on CPU)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: expected auto or one of {list(_DTYPE_NAMES)}, got {dtype!r}")
    return device, resolve_dtype(dtype)


def load_policy(path: str, *, device, dtype, key: str = "model"):
    """(tokenizer, Transformer) of the HF checkpoint directory ``path``; checked before anything loads."""
    from r1fast.model import Transformer
    from r1fast.tokenizer import load as load_tokenizer

    check_checkpoint(path, key)
    tokenizer = load_tokenizer(path)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    return check_tokenizer_fits(tokenizer, model, key), model


def build_model(m: ModelConfig, device, *, seed: int, dtype: torch.dtype | None = None, tokenizer=None):
    """(tokenizer, Transformer) of a model section: 'tiny' built in code (seeded) or a local HF directory, its
    parameters in ``dtype`` (default model.dtype). The same builder as the GRPO trainer's, so every stage's
    checkpoints share one architecture. ``tokenizer``: the one ``data_setup.build_tokenizer`` already built
    (None: build it here, which checks the model directory first); its eos/pad may be set in place."""
    from r1fast.config import Config, TrainConfig
    from r1fast.data_setup import build_model as build_policy
    from r1fast.data_setup import build_tokenizer

    tokenizer = build_tokenizer(m) if tokenizer is None else tokenizer
    return tokenizer, build_policy(Config(model=m, train=TrainConfig(seed=seed)), tokenizer, device, dtype)


def resolve_template(tokenizer, template: str) -> str:
    """``template`` itself, or for 'auto': the template the checkpoint was trained with when r1fast recorded it
    (``tokenizer.prompt_template``), else 'chat' when the tokenizer has a chat template, else 'r1_zero'."""
    if template != "auto":
        return template
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    trained = getattr(tokenizer, "prompt_template", None)
    if trained in DATA_TEMPLATES and trained != "auto" and (trained != "chat" or has_chat):
        return trained
    return "chat" if has_chat else "r1_zero"


def checked_template(tokenizer, template: str, key: str) -> str:
    """``resolve_template``, and one stderr line (rank 0) when the checkpoint records that it was trained with
    another template: an SFT on 'compact' then GRPO on data.template's default r1_zero ran (and saved) the policy
    on a prompt format it never saw, without a word. A warning, not an error: a deliberate change is allowed."""
    used = resolve_template(tokenizer, template)
    trained = getattr(tokenizer, "prompt_template", None)
    if trained is not None and trained != used and D.rank() == 0:
        print(f"r1fast: {key}={template!r} renders prompts with {used!r}, but the checkpoint was trained with "
              f"{trained!r} (its r1fast_prompt.json); set {key}={trained!r} or auto to keep the format it learned",
              file=sys.stderr)
    return used


def render_prompt(tokenizer, template: str, *, prompt: str | None = None, messages: list[dict] | None = None) -> str:
    """The text the model is conditioned on: a chat template (``chat``/``auto`` with one) or a named template.

    Give either a bare ``prompt`` or chat ``messages`` (ending before the assistant's turn). A named
    template wraps a single user message, so multi-turn or system messages need a chat template.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("render_prompt: give exactly one of prompt or messages")
    if messages is None:
        messages = [{"role": "user", "content": prompt}]
    name = resolve_template(tokenizer, template)
    if name == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise ValueError(f"template {name!r} renders a single user message; got roles "
                         f"{[m.get('role') for m in messages]} (use a tokenizer with a chat template)")
    return apply_template(messages[0]["content"], name)


def completion_prefix(tokenizer, template: str):
    """What rewards put before each completion: the think tag the rendered prompt leaves open
    (``rewards.format.open_think_tail``); ``rewards.format.prefix_for(prefix, prompt)`` reads it. A named or
    chat template decides it, not the question, so one render does (a str). Under 'none' each prompt is its own
    rendering and decides it: the callable ``open_think_tail`` (a pre-rendered TinyZero-style prompt ends with
    "Assistant: ... <think>"; graded without it, every completion scored format 0)."""
    from r1fast.rewards.format import open_think_tail

    if resolve_template(tokenizer, template) == "none":
        return open_think_tail
    return open_think_tail(render_prompt(tokenizer, template, prompt="x"))


def encode_prompt(tokenizer, text: str, template: str) -> list[int]:
    """Token ids of a rendered prompt; named templates get <bos> first (as ``data_setup.encode_prompts``) unless
    the text already starts with it, chat templates write their own."""
    chat = resolve_template(tokenizer, template) == "chat"
    bos = getattr(tokenizer, "bos_id", None)
    ids = tokenizer.encode(text)
    # a prompt pre-rendered with a chat template (template 'none') carries its own <bos>: a second one made every
    # prompt start <bos><bos>, which apply_chat_template (it encodes without adding specials) never gives
    return ids if chat or bos is None or ids[:1] == [bos] else [bos, *ids]


def generation_limit(engine) -> int:
    """The most tokens (prompt + max_new_tokens) one sequence may hold in ``engine``: the model's
    max_position_embeddings (positions past it fall outside the range RoPE was trained or scaled for), and
    the KV cache's capacity + 1 (the last sampled token is never cached; the CPU cache holds 65,536 tokens).
    The rollout engine raises a ValueError for a longer sequence, so stages drop those prompts first."""
    limit = engine.args.max_position_embeddings
    cache = getattr(engine, "cache", None)  # a stand-in engine (tests) may have none
    return limit if cache is None else min(limit, cache.capacity_tokens + 1)


def encode_fitting_prompts(tokenizer, samples: list[dict], template: str, *, max_new_tokens: int, limit: int,
                           path: str, key: str = "data") -> tuple[dict[int, list[int]], int]:
    """({sample index: prompt ids} of the prompts whose length + ``max_new_tokens`` fits ``limit``, how many
    were dropped). The one length rule eval and rejection share: one over-long prompt of a MATH-style file
    crashed the whole run with the engine's ValueError. A one-line DataError naming ``key`` and ``path``
    when no prompt fits (nothing left to sample)."""
    fitting = {}
    for i, s in enumerate(samples):
        ids = encode_prompt(tokenizer, render_prompt(tokenizer, template, prompt=s["prompt"]), template)
        if len(ids) + max_new_tokens <= limit:
            fitting[i] = ids
    dropped = len(samples) - len(fitting)
    if not fitting:
        raise DataError(f"{key}: all {dropped} prompts of {path!r} are too long: prompt + max_new_tokens="
                        f"{max_new_tokens} exceeds the {limit} tokens the model holds (max_position_embeddings / KV cache)")
    return fitting, dropped


def warn_dropped_too_long(stage: str, dropped: int, total: int, *, max_new_tokens: int, limit: int, path: str) -> None:
    """One stderr line (rank 0) saying how many prompts were dropped for length, so a silently shorter
    evaluation or SFT set is visible; nothing when none were."""
    if dropped and D.rank() == 0:
        print(f"{stage}: dropped {dropped} of {total} prompts of {path!r}: prompt + max_new_tokens={max_new_tokens} "
              f"exceeds the {limit} tokens the model holds (dropped_too_long={dropped})", file=sys.stderr)


def encode_prompts_that_fit(stage: str, engine, tokenizer, samples: list[dict], template: str, *,
                            max_new_tokens: int, path: str) -> tuple[dict[int, list[int]], int]:
    """``encode_fitting_prompts`` against ``generation_limit(engine)``, with the dropped prompts said on stderr
    (``warn_dropped_too_long``, naming ``stage``): the length rule as eval and rejection apply it."""
    limit = generation_limit(engine)
    fitting, dropped = encode_fitting_prompts(tokenizer, samples, template, max_new_tokens=max_new_tokens,
                                              limit=limit, path=path)
    warn_dropped_too_long(stage, dropped, len(samples), max_new_tokens=max_new_tokens, limit=limit, path=path)
    return fitting, dropped


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """``rows`` as JSONL, written to a new temporary file and renamed (an existing file is complete; a
    symlink at ``path`` is replaced, never written through: ``r1fast.safe_write``)."""
    with replace_atomically(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def stop_token_ids(tokenizer, args) -> list[int]:
    """The ids generation stops at: the tokenizer's eos, then every ``eos_token_id`` of the model's config.json
    and generation_config.json (an int or a list: Qwen2.5-Instruct and Llama-3 stop on either of two). Only the tokenizer's eos
    stopped generation before; the other one ran on to max_new_tokens, and the junk was trained on."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    extra = []
    for value in (args.eos_token_id, (args.generation_config or {}).get("eos_token_id")):
        extra += value if isinstance(value, (list, tuple)) else [value]
    for token in extra:
        if token is not None and 0 <= int(token) < args.vocab_size and int(token) not in ids:
            ids.append(int(token))
    return ids


def check_tokenizer_fits(tokenizer, model, key: str = "model.name_or_path"):
    """The tokenizer, checked against the model it feeds (ConfigError naming ``key``): every id must have an
    embedding row (tags added to a tokenizer without resizing the model gave an IndexError mid-run), and
    there must be an eos (a tokenizer_config.json without eos_token falls back to config.json's)."""
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ConfigError(f"{key}: the tokenizer has {tokenizer.vocab_size} ids but the model embeds only "
                          f"{model.args.vocab_size} (tokens added without resizing the embeddings?)")
    if tokenizer.eos_id is None:
        config_eos = stop_token_ids(tokenizer, model.args)
        if not config_eos:
            raise ConfigError(f"{key}: neither tokenizer_config.json (eos_token) nor config.json (eos_token_id) "
                              "names an end-of-sequence token; generation could never stop")
        tokenizer.eos_id = config_eos[0]
        if getattr(tokenizer, "pad_id", None) is None:
            tokenizer.pad_id = tokenizer.eos_id
    return tokenizer



def check_sampling_temperature(value: float, key: str) -> None:
    """0 (greedy) or at least the engine's smallest sampling temperature: a one-line ConfigError at parse time
    (1e-6 passed the config and failed after the model was loaded, with the engine's traceback)."""
    from r1fast.rollout.sampler import MIN_TEMPERATURE

    if 0 < value < MIN_TEMPERATURE:
        raise ConfigError(f"{key}={value} is below {MIN_TEMPERATURE}, the smallest temperature the engine samples "
                          "at; use 0 for greedy decoding")
