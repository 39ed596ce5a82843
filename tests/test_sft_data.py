"""r1fast.sft data checks: a record that cannot be rendered or encoded, a chat template the tokenizer lacks and a
max_seq_len past the model's positions are one-line errors (naming path:line or the key) before any training."""

import json
import re

import pytest

from r1fast.config_io import ConfigError, DataError, load_config
from r1fast.sft import SFTConfig, encode_sft_examples, read_sft_records, run_sft
from r1fast.tokenizer import CharTokenizer

TINY = ["--model.num_layers", "1", "--model.hidden_size", "32", "--model.intermediate_size", "64",
        "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "64"]
GOOD = {"prompt": "1+1", "completion": "<answer>2</answer>"}


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")  # the kernels have their own tests; these test the stage
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _no_model(monkeypatch):
    import r1fast.sft as sft

    monkeypatch.setattr(sft, "build_model", lambda *a, **k: pytest.fail("model built before the data check"))
    return sft


@pytest.mark.parametrize("record, template, match", [
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "compact",
     r"messages\[0\] must be an object with string 'role' and 'content'"),
    ({"messages": [{"role": 1, "content": "u"}, {"role": "assistant", "content": "x"}]}, "compact",
     r"messages\[0\] must be an object"),
    # the position is the user's (3 in "café"), not the rendered prompt's (409 under r1_zero)
    ({"prompt": "caf\u00e9", "completion": "2"}, "auto", r"prompt: character 'é' at position 3 is not in"),
    ({"messages": [{"role": "user", "content": "\u00e9"}, {"role": "assistant", "content": "2"}]}, "compact",
     r"messages\[0\]\.content: character 'é' at position 0"),
    ({"prompt": "1+1", "completion": "2 \u00b0"}, "compact", r"completion: character '°' at position 2"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "x"}]}, "compact", r"template 'compact' renders a single user"),
])
def test_bad_record_is_one_line_naming_its_line_before_the_model(tmp_path, monkeypatch, capsys, record, template,
                                                                  match):
    sft = _no_model(monkeypatch)
    data = _write_jsonl(tmp_path / "d.jsonl", [GOOD, record])
    assert sft.main(["--data", data, "--template", template, "--out_dir", str(tmp_path / "runs"), *TINY]) == 1
    err = capsys.readouterr().err
    assert re.match(rf"r1fast.sft: error: .*d\.jsonl:2: {match}", err) and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_chat_template_missing_is_the_shared_config_error(tmp_path, monkeypatch, capsys):
    sft = _no_model(monkeypatch)
    data = _write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert sft.main(["--data", data, "--template", "chat", "--out_dir", str(tmp_path / "runs"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err == "r1fast.sft: error: template=chat but the tokenizer has no chat_template (auto falls back to " \
                  "r1_zero)\n", err
    with pytest.raises(ConfigError, match="^template=chat"):  # programmatic callers: not a DataError on line 1
        encode_sft_examples(read_sft_records(data), CharTokenizer(), "chat", 64)


def test_empty_prompt_is_a_data_error_not_too_long(tmp_path):
    no_bos = CharTokenizer()
    no_bos.bos_id = None  # as an HF tokenizer without a bos_token
    data = _write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "", "completion": "hello"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: the prompt encodes to no tokens \(template 'none'"):
        encode_sft_examples(read_sft_records(data), no_bos, "none", 10_000)
    # records built in code have no line: they are named by position
    with pytest.raises(DataError, match=r"^record 1: the prompt encodes to no tokens"):
        encode_sft_examples([({"prompt": ""}, "hello")], no_bos, "none", 10_000)
    examples, dropped = encode_sft_examples(read_sft_records(data, limit=1), no_bos, "none", 10_000)
    assert dropped == 0 and examples == [(no_bos.encode("1+1"), no_bos.encode("<answer>2</answer>") + [no_bos.eos_id])]


def test_max_seq_len_may_not_exceed_the_models_positions(tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1", "completion": "2" * 150}])
    cfg = load_config(None, ["--data", data, "--out_dir", str(tmp_path / "runs"), "--template", "none",
                             "--max_seq_len", "400", "--steps", "1", "--batch_size", "1", *TINY], schema=SFTConfig)
    with pytest.raises(ConfigError, match="max_seq_len=400 exceeds the model's max_position_embeddings=64"):
        run_sft(cfg)  # it trained a 155-token example on 64 positions
    cfg.max_seq_len = 64  # the limit itself is allowed; the one record does not fit in it
    with pytest.raises(DataError, match="all 1 records .* longer than max_seq_len=64"):
        run_sft(cfg)
