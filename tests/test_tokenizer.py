"""r1fast.tokenizer: the built-in CharTokenizer and HF tokenizer.json loading (tiny tokenizers built here)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    assert hf.encode(R1_TEXT).ids == tok.encode(R1_TEXT)
    assert hf.decode(tok.encode(R1_TEXT)) == R1_TEXT
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert auto(R1_TEXT, add_special_tokens=False)["input_ids"] == tok.encode(R1_TEXT)
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
