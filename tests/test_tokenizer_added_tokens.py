"""r1fast.tokenizer: tokenizer_config.json's added_tokens_decoder decides the added tokens' flags, as in transformers."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from r1fast.tokenizer import load

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write(tmp_path, flags: dict[str, dict]) -> Tokenizer:
    """A byte-level BPE tokenizer.json (specials with default flags) and a config overriding ``flags`` per token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["ab cd the quick brown fox\n\n"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                         "single_word": False, "special": True, **flags.get(t, {})} for t in SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": decoder,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_config_flags_of_added_tokens_apply_as_in_transformers(tmp_path):
    """The config's rstrip/lstrip on <|im_end|> override tokenizer.json's flags in transformers; r1fast read
    tokenizer.json's alone (9 ids for the text below where transformers gives 5). Its special=False on
    <|im_start|> does not: decoding still drops the token, in both."""
    raw = _write(tmp_path, {"<|im_end|>": {"lstrip": True, "rstrip": True}, "<|im_start|>": {"special": False}})
    tok = load(tmp_path)
    text = "ab  <|im_end|>\n\ncd"
    ids = tok.encode(text)
    assert ids == [*raw.encode("ab", add_special_tokens=False).ids, raw.token_to_id("<|im_end|>"),
                   *raw.encode("cd", add_special_tokens=False).ids]
    assert len(raw.encode(text, add_special_tokens=False).ids) > len(ids)  # tokenizer.json's flags keep the spaces
    assert tok.decode([raw.token_to_id("<|im_start|>"), *ids]) == "abcd"
    assert tok.vocab_size == raw.get_vocab_size()  # flags changed in place, no token added
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(text, add_special_tokens=False)["input_ids"] == ids
    assert auto.decode([raw.token_to_id("<|im_start|>"), *ids], skip_special_tokens=True) == "abcd"


def test_a_token_special_in_either_file_is_dropped_in_decoding(tmp_path):
    """tokenizer.json adds <|im_start|> as a plain token, the config's added_tokens_decoder marks it special:
    transformers' decode drops it, r1fast kept it in the text."""
    raw = _write(tmp_path, {})
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        if added["content"] == "<|im_start|>":
            added["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ids = [raw.token_to_id("<|im_start|>"), *raw.encode("ab", add_special_tokens=False).ids]
    assert load(tmp_path).decode(ids) == "ab"
    assert load(tmp_path).decode(ids, skip_special_tokens=False) == "<|im_start|>ab"
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).decode(ids, skip_special_tokens=True) == "ab"
