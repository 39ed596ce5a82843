"""r1fast.tokenizer: the built-in CharTokenizer and HF tokenizer.json loading (tiny tokenizers built here)."""

import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from r1fast.tokenizer import ALPHABET, R1_TAGS, CharTokenizer, HFTokenizer, load

R1_TEXT = "A conversation.\nUser: What is 12*(3+4)? Assistant: <think>12*7 = 84, check: 84/7 == 12!</think> <answer>84</answer>"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_char_roundtrip_and_single_token_tags():
    tok = CharTokenizer()
    ids = tok.encode(R1_TEXT)
    assert tok.decode(ids) == R1_TEXT
    for tag in R1_TAGS:
        assert len(tok.encode(tag)) == 1 and tok.decode(tok.encode(tag)) == tag
    assert tok.encode("<thin") == [tok.token_to_id[c] for c in "<thin"]  # a partial tag is just characters
    assert tok.vocab_size == 7 + len(ALPHABET) and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert tok.encode("ab", add_special_tokens=True)[0] == tok.bos_id
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"
    assert tok.decode([tok.eos_id], skip_special_tokens=False) == "<eos>"
    with pytest.raises(ValueError, match="position 2"):
        tok.encode("ab\u00e9")
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])


def test_char_save_load_and_hf_compatibility(tmp_path):
    tok = CharTokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                      "{% if add_generation_prompt %} Assistant: <think>{% endif %}")
    tok.save(tmp_path)
    back = load(tmp_path)
    assert isinstance(back, CharTokenizer) and back.vocab == tok.vocab
    assert back.encode(R1_TEXT) == tok.encode(R1_TEXT)
    assert back.apply_chat_template([{"role": "user", "content": "2+2?"}]) == "2+2? Assistant: <think>"
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(R1_TEXT, add_special_tokens=False).ids == tok.encode(R1_TEXT)
    assert hf.decode(tok.encode(R1_TEXT)) == R1_TEXT
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(R1_TEXT, add_special_tokens=False)["input_ids"] == tok.encode(R1_TEXT)
    # <bos> first by default, as every prompt r1fast trained on (a named template's) began with it
    assert auto(R1_TEXT)["input_ids"] == tok.encode(R1_TEXT, add_special_tokens=True) == [tok.bos_id, *tok.encode(R1_TEXT)]
    assert (auto.eos_token_id, auto.pad_token_id, auto.bos_token_id) == (tok.eos_id, tok.pad_id, tok.bos_id)


def _tiny_bpe(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([R1_TEXT, "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
              "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHATML}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_hf_tokenizer_load(tmp_path):
    raw = _tiny_bpe(tmp_path)
    tok = load(tmp_path)
    assert isinstance(tok, HFTokenizer)
    text = "the quick fox: <think>12*7</think> ünïcode"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == raw.encode(text).ids
    assert tok.eos_id == raw.token_to_id("<|im_end|>") and tok.pad_id == raw.token_to_id("<|endoftext|>")
    assert tok.bos_id is None and tok.vocab_size == raw.get_vocab_size()
    assert tok.decode([*tok.encode("dog"), tok.eos_id]) == "dog"
    messages = [{"role": "user", "content": "2+2?"}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered
    assert tok.encode(rendered) == auto(rendered, add_special_tokens=False)["input_ids"]


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen_style_dir(path):
    """A Qwen2.5-style tokenizer directory: byte-level BPE tokenizer.json and a tokenizer_config.json with the
    settings r1fast does not use itself (model_max_length, additional_special_tokens, the class), plus the
    other files such directories carry."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([R1_TEXT, "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in QWEN_SPECIALS}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None, "chat_template": CHATML,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}))
    (path / "added_tokens.json").write_text(json.dumps({t: tok.token_to_id(t) for t in QWEN_SPECIALS}))
    return config


def test_hf_tokenizer_save_keeps_the_source_config_and_files(tmp_path):
    """A checkpoint's tokenizer reads in transformers as the one it was trained from. save() rebuilt
    tokenizer_config.json: model_max_length 32768 became transformers' 1e30 default (truncation=True returned
    80,001 tokens), <|im_start|> left all_special_tokens and the class became the generic one."""
    src, saved = tmp_path / "src", tmp_path / "saved"
    config = _qwen_style_dir(src)
    load(src).save(saved)
    assert json.loads((saved / "tokenizer_config.json").read_text()) == config
    for name in ("special_tokens_map.json", "added_tokens.json"):
        assert (saved / name).read_bytes() == (src / name).read_bytes()
    assert load(saved).encode(R1_TEXT) == load(src).encode(R1_TEXT)
    transformers = pytest.importorskip("transformers")
    before, after = (transformers.AutoTokenizer.from_pretrained(d) for d in (src, saved))
    assert type(after) is type(before) and after.model_max_length == before.model_max_length == 32768
    assert after.all_special_tokens == before.all_special_tokens and "<|im_start|>" in after.all_special_tokens
    messages = [{"role": "user", "content": "the quick fox?"}]
    chat = before.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert after.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
    assert after(chat)["input_ids"] == before(chat)["input_ids"]
    long_text = "the " * 40_000
    assert len(after(long_text, truncation=True)["input_ids"]) == 32768


def test_hf_tokenizer_save_keeps_chat_template_files_and_tokenizer_code(tmp_path):
    """chat_template.jinja, transformers' named templates and an auto_map tokenizer module are written back
    where the source kept them; an auto_map name that is no plain module is not followed out of the directory."""
    src, saved = tmp_path / "src", tmp_path / "saved"
    config = _qwen_style_dir(src)
    del config["chat_template"]
    (tmp_path / "outside.py").write_text("# not the tokenizer's\n")
    config["auto_map"] = {"AutoTokenizer": ["tokenization_qwen.QwenTokenizer", f"{tmp_path}/outside.QwenTokenizer"]}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").write_text(CHATML)
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("T")
    (src / "tokenization_qwen.py").write_text("# custom tokenizer code\n")
    ours = load(src)
    assert sorted(ours.files) == ["added_tokens.json", "additional_chat_templates/tool_use.jinja",
                                  "chat_template.jinja", "special_tokens_map.json", "tokenization_qwen.py"]
    ours.save(saved)
    assert json.loads((saved / "tokenizer_config.json").read_text()) == config  # template stays in the .jinja
    for name in ("chat_template.jinja", "additional_chat_templates/tool_use.jinja", "tokenization_qwen.py"):
        assert (saved / name).read_bytes() == (src / name).read_bytes()
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in src.iterdir())
    messages = [{"role": "user", "content": "2+2?"}]
    assert load(saved).apply_chat_template(messages) == ours.apply_chat_template(messages)


def test_hf_tokenizer_built_in_code_saves_a_readable_directory(tmp_path):
    """No tokenizer_config.json to keep: the config given is saved, naming the generic fast class."""
    char = CharTokenizer()
    HFTokenizer(char.to_hf_tokenizer(), {"eos_token": "<eos>", "pad_token": "<pad>"}).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<eos>"
    back = load(tmp_path)
    assert (back.eos_id, back.pad_id) == (char.eos_id, char.pad_id)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.eos_token_id, auto.pad_token_id) == (char.eos_id, char.pad_id)


def test_r1_tags_added_as_special_tokens_survive_decoding(tmp_path):
    """Tokenizers that add <think>/<answer> as special tokens (the usual way to make them single tokens):
    decoding a completion keeps the tags, or every reward would see '4' for '<think>..</think><answer>4</answer>'."""
    raw = _tiny_bpe(tmp_path)
    raw.add_special_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load(tmp_path)
    completion = "<think>2+2=4</think><answer>4</answer>"
    ids = tok.encode(completion)
    assert raw.token_to_id("<think>") in ids
    assert tok.decode([*ids, tok.eos_id]) == completion  # eos dropped, tags kept
    assert tok.decode([*ids, tok.eos_id], skip_special_tokens=False) == completion + "<|im_end|>"


def test_named_special_tokens_dropped_in_decoding_like_transformers(tmp_path):
    """An eos that tokenizer.json adds as a plain (non-special) token is still a special token to transformers
    (named in tokenizer_config.json), so decode drops it; r1fast kept "<|im_end|>" in the completion text."""
    raw = _tiny_bpe(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        if added["content"] == "<|im_end|>":
            added["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load(tmp_path)
    completion = "<think>12*7</think> <answer>84</answer>"
    ids = [*tok.encode(completion), tok.eos_id]
    assert raw.token_to_id("<|im_end|>") == tok.eos_id
    assert tok.decode(ids) == completion
    assert tok.decode(ids, skip_special_tokens=False) == completion + "<|im_end|>"
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.decode(ids, skip_special_tokens=True) == completion


def test_special_tokens_map_json_names_tokens_as_in_transformers(tmp_path):
    """A config without added_tokens_decoder (saved before transformers 4.34): transformers takes the named tokens
    of special_tokens_map.json, over the config's; r1fast read only the config and loaded no eos and no pad."""
    raw = _tiny_bpe(tmp_path)
    template = "{{ eos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<unk>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False}}))
    tok = load(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (raw.token_to_id("<|im_end|>"), raw.token_to_id("<|endoftext|>"))
    messages = [{"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(messages) == "<|im_end|>2+2?"
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.eos_token_id, auto.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<|im_end|>2+2?"
    # a config with added_tokens_decoder is read alone, in transformers too
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": {}}))
    assert (load(tmp_path).eos_id, load(tmp_path).pad_id) == (None, raw.token_to_id("<unk>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text("{")
    with pytest.raises(ValueError, match="special_tokens_map.json: not valid JSON"):
        load(tmp_path)


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load(tmp_path)
    _tiny_bpe(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token"):
        load(tmp_path)
    tok = HFTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")))
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# --- chat templates: sandboxed, and rendered as transformers renders them --------------------------------------

MESSAGES = [{"role": "system", "content": "Be <brief> & exact."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "tool_calls": None}]
# Each template exercises one thing transformers' renderer gives templates; all must render identically.
COMPAT_TEMPLATES = {
    "special tokens": "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ sep_token }}|"
                      "{{ cls_token }}|{{ mask_token }}|{% for m in messages %}{{ m.content }}{% endfor %}",
    "strftime_now": "{{ strftime_now('%Y') }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "generation tag": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{% set x = m.content %}"
                      "<{{ x }}|{{ loop.index }}>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
                      "{{ x is defined }}",
    "named templates": [{"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"},
                        {"name": "tool_use", "template": "T"}],
    "tools, documents, None keys": "{{ tools is none }}{{ documents is none }}"
                                   "{% for m in messages %}{{ m.tool_calls is defined }}{% endfor %}",
    "tojson, namespace, dict, loop controls": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson(indent=1) }}"
        "{{ dict.fromkeys(['k']) | tojson }}"),
    "trim and lstrip blocks": "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n"
                              "    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:{% endif %}",
}


def _write_hf_dir(path, chat_template):
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<sep>", "<cls>", "<mask>"])}
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": {"__type": "AddedToken", "content": "<unk>"}, "pad_token": "<pad>", "sep_token": "<sep>",
              "cls_token": "<cls>", "mask_token": "<mask>", "chat_template": chat_template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _hf_messages(auto):
    """MESSAGES as r1fast hands them to a template (None-valued keys dropped), for ``auto`` to render.

    transformers >= 5.23 drops them itself (the behaviour r1fast follows); 5.17 to 5.22 pass ``tool_calls=None``
    through, so their renders differ from ours only there: drop the keys for them, asked of ``auto`` itself."""
    probe = "{% for m in messages %}{{ m.k is defined }}{% endfor %}"
    if auto.apply_chat_template([{"role": "user", "content": "x", "k": None}], chat_template=probe,
                                tokenize=False) == "False":
        return MESSAGES
    return [{k: v for k, v in m.items() if v is not None} for m in MESSAGES]


@pytest.mark.parametrize("name", list(COMPAT_TEMPLATES))
def test_chat_template_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    _write_hf_dir(tmp_path, COMPAT_TEMPLATES[name])
    ours, auto = load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for gen in (True, False):
        expected = auto.apply_chat_template(_hf_messages(auto), tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    ours.save(tmp_path / "saved")  # named templates and every special token survive a save
    again, auto = load(tmp_path / "saved"), transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again.apply_chat_template(MESSAGES) == ours.apply_chat_template(MESSAGES)
    assert auto.apply_chat_template(_hf_messages(auto), tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(MESSAGES)


def test_char_chat_template_special_tokens_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    template = [{"name": "default", "template": COMPAT_TEMPLATES["special tokens"]}, {"name": "other", "template": "o"}]
    CharTokenizer(chat_template=template).save(tmp_path)
    ours = load(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == "<bos>|<eos>||<pad>||||Be <brief> & exact.2+2?4"
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto.apply_chat_template(_hf_messages(auto), tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(MESSAGES)


def test_chat_template_named_template_errors(tmp_path):
    with pytest.raises(ValueError, match=r"chat_template: named templates \['tool_use'\] have no 'default'"):
        CharTokenizer(chat_template=[{"name": "tool_use", "template": "T"}]).apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="chat_template: a list must hold"):
        CharTokenizer(chat_template=[{"name": "default"}])
    with pytest.raises(ValueError, match="chat_template: expected a string"):
        CharTokenizer(chat_template=3)


def test_chat_template_is_sandboxed(tmp_path):
    """A downloaded template is untrusted code: it must not reach Python internals or the caller's objects."""
    import jinja2

    marker = tmp_path / "PWNED"
    escapes = [
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
        "{{ namespace.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ dict.__call__.__globals__ }}",
    ]
    for template in escapes:
        with pytest.raises(jinja2.exceptions.SecurityError):
            CharTokenizer(chat_template=template).apply_chat_template(MESSAGES)
    # rich objects in messages reach the template as inert placeholders, so their methods cannot be called
    tok = CharTokenizer(chat_template="{{ messages[0].content }}{{ messages[0].content.touch() }}")
    with pytest.raises(jinja2.exceptions.UndefinedError):
        tok.apply_chat_template([{"role": "user", "content": marker}])
    assert not marker.exists()
    assert CharTokenizer(chat_template="{{ messages[0].content }}").apply_chat_template(
        [{"role": "user", "content": marker}]) == "<PosixPath>"
    with pytest.raises(ValueError, match="chat template: roles must alternate"):
        CharTokenizer(chat_template="{{ raise_exception('roles must alternate') }}").apply_chat_template(MESSAGES)


def test_missing_pad_token_falls_back_to_eos():
    char = CharTokenizer()
    tok = HFTokenizer(char.to_hf_tokenizer(), {"bos_token": "<bos>", "eos_token": "<eos>"})
    assert tok.eos_id == char.eos_id != 0
    assert tok.pad_id == tok.eos_id
    tok = HFTokenizer(char.to_hf_tokenizer(), {"eos_token": "<eos>", "pad_token": "<pad>"})
    assert tok.pad_id == char.pad_id and tok.eos_id == char.eos_id


def test_negative_ids_are_refused_not_wrapped():
    char = CharTokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        char.decode([char.token_to_id["a"], -1])


def test_vocab_size_counts_tokens_added_outside_the_model():
    char = CharTokenizer()
    hf = char.to_hf_tokenizer()
    hf.add_special_tokens([AddedToken("<extra_special>", special=True, normalized=False)])
    tok = HFTokenizer(hf, {"eos_token": "<eos>"})
    assert tok.vocab_size == char.vocab_size + 1
    assert tok.encode("<extra_special>") == [char.vocab_size]  # an id the embedding must have a row for
