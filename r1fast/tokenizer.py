"""Tokenizers: HF ``tokenizers`` (tokenizer.json + tokenizer_config.json) and a built-in character tokenizer.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``eos_id``, ``pad_id``, ``bos_id``,
``vocab_size`` and ``apply_chat_template(messages, add_generation_prompt=True)`` when a chat template is known.

``CharTokenizer`` serves the offline tiny recipes: one id per character of a fixed alphabet (digits,
letters, punctuation, space, newline) plus single-token specials <pad> <bos> <eos> and the R1 tags
<think> </think> <answer> </answer>. ``save(dir)`` writes a real HF ``tokenizer.json`` (built with the
``tokenizers`` library: added tokens + per-character WordLevel) and ``tokenizer_config.json``, so a
checkpoint directory is complete for HF tooling; ``load(dir)`` recognizes it and returns a CharTokenizer.

Chat templates render through ``r1fast.chat_template`` (sandboxed, as transformers renders them).
"""

from __future__ import annotations

import json
import os
import string

from r1fast.chat_template import check_syntax, named_templates, render, stored_templates
from r1fast.config_io import ConfigError

CONTROL_TOKENS = ("<pad>", "<bos>", "<eos>")
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
_MARKER = "r1fast.CharTokenizer"

# The named special tokens transformers exposes to chat templates (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token):
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


class CharTokenizer:
    """Character-level tokenizer with the R1 tags as single tokens (ids: specials first, then ALPHABET)."""

    def __init__(self, alphabet: str = ALPHABET, chat_template: str | list | dict | None = None):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.special_tokens = CONTROL_TOKENS + R1_TAGS
        self.vocab = list(self.special_tokens) + list(alphabet)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self.chat_template = named_templates(chat_template)
        self.prompt_template: str | None = None  # the template a checkpoint was trained with (PROMPT_TEMPLATE_FILE)
        self.special_tokens_map = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        self.pad_id, self.bos_id, self.eos_id = (self.token_to_id[t] for t in CONTROL_TOKENS)
        # longest specials first so "</think>" is never read as "<" + ...
        self._specials_by_length = sorted(self.special_tokens, key=len, reverse=True)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; ``add_special_tokens`` prepends <bos>. ValueError on characters outside the alphabet."""
        ids = [self.bos_id] if add_special_tokens else []
        i = 0
        while i < len(text):
            if text[i] == "<":
                tag = next((s for s in self._specials_by_length if text.startswith(s, i)), None)
                if tag is not None:
                    ids.append(self.token_to_id[tag])
                    i += len(tag)
                    continue
            tid = self.token_to_id.get(text[i])
            if tid is None:
                raise ValueError(f"text: character {text[i]!r} at position {i} is not in the CharTokenizer alphabet")
            ids.append(tid)
            i += 1
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; <pad>/<bos>/<eos> are dropped unless skip_special_tokens=False (R1 tags always kept)."""
        skip = set(range(len(CONTROL_TOKENS))) if skip_special_tokens else set()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"ids: {i} is outside the vocabulary [0, {len(self.vocab)})")
            if i not in skip:
                out.append(self.vocab[i])
        return "".join(out)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """``messages`` through the chat template (its "default" one if named), as transformers renders it."""
        return render(self.chat_template, messages, add_generation_prompt, self.special_tokens_map)

    def to_hf_tokenizer(self):
        """The same tokenization as an HF ``tokenizers.Tokenizer`` (what ``save`` writes as tokenizer.json)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415

        chars = {c: i for i, c in enumerate(self.vocab) if c not in self.special_tokens}
        tok = Tokenizer(models.WordLevel(vocab={**{s: i for i, s in enumerate(self.special_tokens)}, **chars},
                                         unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in R1_TAGS])
        # <bos> first, as ``encode(add_special_tokens=True)`` and r1fast's named-template prompts have it: without
        # this, transformers' ``tokenizer(prompt)`` on a saved checkpoint fed the model prompts without the <bos>
        # every training prompt began with
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1",
                                                           special_tokens=[("<bos>", self.bos_id)])
        return tok

    def save(self, path) -> None:
        os.makedirs(path, exist_ok=True)
        self.to_hf_tokenizer().save(os.path.join(path, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "r1fast_tokenizer": _MARKER,
            "alphabet": "".join(self.vocab[len(self.special_tokens):]),
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = stored_templates(self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        _save_prompt_template(self, path)


class HFTokenizer:
    """An HF ``tokenizers.Tokenizer`` plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, tokenizer, config: dict | None = None, chat_template: str | None = None,
                 source: str = "tokenizer_config.json", files: dict[str, bytes] | None = None):
        """``source``: the config's file, named in errors (``load`` passes its full path). ``config`` and ``files``
        (the source's other tokenizer files, name -> bytes; see ``TOKENIZER_FILES``) are written back by ``save``."""
        self.tok = tokenizer
        self.source = source
        self._skip_ids: frozenset[int] | None = None
        config = config or {}
        self.config = dict(config)
        self.files = dict(files or {})
        self._loaded = files is not None  # read from a directory by ``load`` (else built in code)
        # every named special token the config gives (unk_token, sep_token, ...): templates may print any of them
        self._sync_added_tokens(config)
        named = {**config, **self._legacy_special_tokens(config)}
        self.special_tokens_map = {name: str(_content(named[name])) for name in SPECIAL_TOKEN_NAMES
                                   if _content(named.get(name)) is not None}
        self.bos_token, self.eos_token, self.pad_token = (self.special_tokens_map.get(f"{n}_token")
                                                          for n in ("bos", "eos", "pad"))
        self.chat_template = named_templates(chat_template or config.get("chat_template"))
        self.prompt_template: str | None = None  # the template a checkpoint was trained with (PROMPT_TEMPLATE_FILE)
        self.bos_id = self._id(self.bos_token, "bos_token")
        self.eos_id = self._id(self.eos_token, "eos_token")
        pad = self._id(self.pad_token, "pad_token")
        self.pad_id = pad if pad is not None else self.eos_id

    def _sync_added_tokens(self, config: dict) -> None:
        """Give the added tokens of tokenizer.json the properties tokenizer_config.json's added_tokens_decoder
        states for the same id and content (lstrip, rstrip, ...), as transformers does when it loads: with the
        config's rstrip=True on <|im_end|> it encodes "ab  <|im_end|>\\n\\ncd" as 5 ids, r1fast read 9 from
        tokenizer.json's flags; one special in either file is special (dropped by decode). Tokens the config
        names at another id or not at all are left alone."""
        from tokenizers import AddedToken  # noqa: PLC0415

        entries = config.get("added_tokens_decoder")
        current = self.tok.get_added_tokens_decoder()
        changed = []
        for index, entry in (entries.items() if isinstance(entries, dict) else ()):
            have = current.get(int(index)) if str(index).isdigit() else None
            if have is None or not isinstance(entry, dict) or entry.get("content") != have.content:
                continue
            flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized")
                     if isinstance(entry.get(k), bool) and entry[k] != getattr(have, k)}
            if entry.get("special") is True and not have.special:  # special in either file: transformers' decode
                flags["special"] = True  # drops it (the config's special=False does not unmark one)
            if flags:
                props = {k: getattr(have, k) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
                changed.append(AddedToken(have.content, **{**props, **flags}))
        if changed:
            self.tok.add_tokens(changed)  # same content: updates the token in place, its id unchanged

    def _legacy_special_tokens(self, config: dict) -> dict:
        """The named tokens of the source's special_tokens_map.json where transformers reads them: for a config
        without added_tokens_decoder (saved before transformers 4.34) its entries override the config's. Unread, a
        directory naming bos/eos only there loaded with neither: a Llama-3 chat prompt lost its <|begin_of_text|>
        (the template's bos_token rendered as "") while transformers' has it."""
        data = self.files.get("special_tokens_map.json")
        if data is None or "added_tokens_decoder" in config:
            return {}
        file = os.path.join(os.path.dirname(self.source), "special_tokens_map.json")
        try:
            tokens = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(tokens, dict):
            raise ConfigError(f"{file}: expected a JSON object of named special tokens, got {type(tokens).__name__}")
        return {name: tokens[name] for name in SPECIAL_TOKEN_NAMES if name in tokens}

    def _id(self, token, field):
        if token is None:
            return None
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise ConfigError(f"{self.source}: {field}={token!r} is not in the vocabulary of tokenizer.json")
        return tid

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless skip_special_tokens=False, except the R1 tags,
        which are always kept (as CharTokenizer keeps them): a tokenizer that adds <think>/<answer> as
        special tokens would otherwise decode every completion without its tags, and the format and
        accuracy rewards would score a perfect completion 0."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            skip = self._special_ids()
            ids = [i for i in ids if i not in skip]
        return self.tok.decode(ids, skip_special_tokens=False)

    def _special_ids(self) -> frozenset[int]:
        """Added tokens marked special in tokenizer.json, plus the config's named special tokens (eos_token, ...):
        transformers registers those as special whatever tokenizer.json says, so its decode drops them. Without
        them an eos that tokenizer.json adds as a plain token stayed in every decoded completion
        ("...</answer><|im_end|>") and the strict format reward scored it 0."""
        if self._skip_ids is None:
            added = {i for i, token in self.tok.get_added_tokens_decoder().items() if token.special}
            named = {self.tok.token_to_id(t) for t in self.special_tokens_map.values()} - {None}
            self._skip_ids = frozenset(i for i in added | named if self.tok.id_to_token(i) not in R1_TAGS)
        return self._skip_ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """``messages`` through the chat template (its "default" one if named), as transformers renders it."""
        return render(self.chat_template, messages, add_generation_prompt, self.special_tokens_map)

    def save(self, path) -> None:
        """Write tokenizer.json (``self.tok``, what r1fast tokenized with), the loaded tokenizer_config.json and
        the source's other tokenizer files. The config is written back as it was read, not rebuilt: a rebuilt one
        lost model_max_length (transformers then defaults to 1e30, so truncation=True no longer truncated),
        additional_special_tokens and the tokenizer class of every checkpoint r1fast trained."""
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        files = dict(self.files)
        config = dict(self.config)
        if not self._loaded and "tokenizer_class" not in config:
            # built in code: transformers 4.x needs a class (or a config.json) to read the directory. A loaded
            # config without one is kept so: transformers picks the class from config.json, as for the source
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # the chat template is written from self.chat_template (the one r1fast renders with), where the source
        # kept it: chat_template.jinja overrides the config's key in transformers and in ``load``
        if isinstance(self.chat_template, str) and CHAT_TEMPLATE_FILE in files:
            files[CHAT_TEMPLATE_FILE] = self.chat_template.encode("utf-8")
        else:
            files.pop(CHAT_TEMPLATE_FILE, None)
            if self.chat_template is None:
                config.pop("chat_template", None)
            else:
                config["chat_template"] = stored_templates(self.chat_template)
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
        _save_prompt_template(self, path)


CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", CHAT_TEMPLATE_FILE, "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
"""Tokenizer files besides tokenizer.json and tokenizer_config.json that ``load`` keeps and ``save`` writes back, so
a checkpoint's tokenizer reads in transformers as its source did (special_tokens_map.json names special tokens,
the slow-tokenizer vocabularies let a slow class load). Also kept: ``additional_chat_templates/*.jinja``
(transformers' named templates) and the ``tokenization_*.py`` a config's auto_map names for AutoTokenizer."""
CHAT_TEMPLATE_DIR = "additional_chat_templates"


PROMPT_TEMPLATE_FILE = "r1fast_prompt.json"
"""Next to a checkpoint's tokenizer: {"prompt_template": name}, the template r1fast trained the model with, which
``template = "auto"`` then uses (the tiny model trained on 'compact' prompts was evaluated with r1_zero's, longer
than its 128 positions). A file of its own: transformers passes unknown tokenizer_config keys to the tokenizer."""


def _save_prompt_template(tokenizer, path: str) -> None:
    name = getattr(tokenizer, "prompt_template", None)
    if name is not None:
        with open(os.path.join(path, PROMPT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"prompt_template": name}, f)


def _read_prompt_template(path: str) -> str | None:
    """The recorded template name; a one-line ConfigError for a file that is not {"prompt_template": <known name>}
    (a typo silently fell back to r1_zero, and corrupt JSON raised a traceback in every stage)."""
    from r1fast.config import DATA_TEMPLATES
    from r1fast.config_io import ConfigError

    file = os.path.join(path, PROMPT_TEMPLATE_FILE)
    if not os.path.isfile(file):
        return None
    allowed = [t for t in DATA_TEMPLATES if t != "auto"]
    try:
        with open(file, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid UTF-8 JSON ({e}); expected {{\"prompt_template\": name}}") from None
    name = record.get("prompt_template") if isinstance(record, dict) else None
    if name not in allowed:
        raise ConfigError(f"{file}: expected {{\"prompt_template\": name}} with name one of {', '.join(allowed)}, "
                          f"got {record!r:.80}; fix or delete the file (it records the template the model was "
                          "trained with)")
    return name


def load(path):
    """The tokenizer saved in directory ``path``: a CharTokenizer if r1fast wrote one, else an HFTokenizer; its
    ``prompt_template`` is the template r1fast trained the model with (None when not recorded)."""
    tokenizer = _load(path)
    tokenizer.prompt_template = _read_prompt_template(os.fspath(path))
    return tokenizer


def _load(path):
    """The tokenizer of ``path``; every problem with its files is a one-line ConfigError naming the file (the
    directory is the user's input, so the CLIs print it without a traceback)."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from e
    template_file = os.path.join(path, "chat_template.jinja")  # newer transformers store the template apart
    template = None
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
    try:  # compiled once here: a syntax error is named with its file before any model loads
        template = named_templates(template or config.get("chat_template"))
        check_syntax(template)
    except ValueError as e:
        raise ConfigError(f"{template_file if os.path.isfile(template_file) else cfg_file}: {e}") from None
    if config.get("r1fast_tokenizer") == _MARKER:
        return CharTokenizer(config["alphabet"], chat_template=template)
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise ConfigError(f"{tok_file}: not found (load needs an HF tokenizer.json or an r1fast CharTokenizer)")
    from tokenizers import Tokenizer  # noqa: PLC0415

    try:
        tokenizer = Tokenizer.from_file(tok_file)
    except Exception as e:
        raise ConfigError(f"{tok_file}: cannot be read ({' '.join(str(e).split())})") from e
    return HFTokenizer(tokenizer, config, template, source=cfg_file, files=_tokenizer_files(path, config))


def _tokenizer_files(path: str, config: dict) -> dict[str, bytes]:
    """The tokenizer files of ``path`` that ``save`` writes back (see TOKENIZER_FILES), read now: a checkpoint is
    saved long after loading, when the source (a hub cache entry, a previous run's checkpoint) may be gone."""
    names = list(TOKENIZER_FILES)
    template_dir = os.path.join(path, CHAT_TEMPLATE_DIR)
    if os.path.isdir(template_dir):
        names += [f"{CHAT_TEMPLATE_DIR}/{n}" for n in sorted(os.listdir(template_dir)) if n.endswith(".jinja")]
    auto_map = config.get("auto_map")
    classes = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
    for ref in classes if isinstance(classes, list) else [classes]:
        # "tokenization_x.Class" is this directory's tokenization_x.py ("repo--module.Class" lives elsewhere);
        # only a plain module name: the config is downloaded input, and a name like "/etc/x" would make save
        # write outside its directory
        module = ref.split(".")[0] if isinstance(ref, str) and ref.count(".") == 1 else ""
        if module.isidentifier():
            names.append(module + ".py")
    files = {}
    for name in dict.fromkeys(names):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                files[name] = f.read()
    return files
