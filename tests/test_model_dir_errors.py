"""A broken model directory is the user's input: every stage reports it as one ``<prog>: error: ...`` line
naming the file, before any expensive work, never as a Python traceback (a probe found 9 of 10 cases crashing).

Cases: config.json, the weights or tokenizer.json missing; eos_token not in the vocabulary; a chat template with a
Jinja syntax error; a truncated weights file.
"""

import json
import os

import pytest
from conftest import save_char_checkpoint

from r1fast.checkpoint import SINGLE_FILE, CheckpointError
from r1fast.config import Config, ModelConfig
from r1fast.config_io import ConfigError
from r1fast.data_setup import build_model, build_tokenizer
from r1fast.tokenizer import load as load_tokenizer

BROKEN_TEMPLATE = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
"""The probe's unclosed ``{{ ... }`` on line 2: jinja raised a bare ``TemplateSyntaxError: unexpected '}'``."""


def _hf_tokenizer_dir(path):
    """``save_char_checkpoint`` with the r1fast marker dropped from tokenizer_config.json, so the directory loads
    through tokenizer.json as any downloaded HF model does."""
    save_char_checkpoint(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("r1fast_tokenizer")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return cfg


def _edit_tokenizer_config(path, **changes):
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, **changes}))


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


CASES = {
    # name: (break the directory, the file the message names, the error at build_tokenizer / load)
    "no_config": (lambda d: os.remove(d / "config.json"), "config.json", FileNotFoundError),
    "no_weights": (lambda d: os.remove(d / SINGLE_FILE), SINGLE_FILE, FileNotFoundError),
    "no_tokenizer": (lambda d: os.remove(d / "tokenizer.json"), "tokenizer.json", ConfigError),
    "eos_not_in_vocab": (lambda d: _edit_tokenizer_config(d, eos_token="<|eot|>"), "tokenizer_config.json",
                         ConfigError),
    "bad_template": (lambda d: _edit_tokenizer_config(d, chat_template=BROKEN_TEMPLATE), "tokenizer_config.json",
                     ConfigError),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_build_tokenizer_names_the_broken_file(tmp_path, case):
    """The trainer's and SFT's first step: it must fail here (before data, scorer and model), naming the file."""
    break_dir, file, error = CASES[case]
    model = tmp_path / "m"
    _hf_tokenizer_dir(model)
    break_dir(model)
    with pytest.raises(error) as err:
        build_tokenizer(ModelConfig(name_or_path=str(model)))
    message = str(err.value)
    assert str(model / file) in message and "\n" not in message


def test_template_syntax_error_names_file_and_line(tmp_path):
    _hf_tokenizer_dir(tmp_path)
    _edit_tokenizer_config(tmp_path, chat_template=BROKEN_TEMPLATE)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'tokenizer_config.json'}: chat_template line 2: Jinja "
                                          r"syntax error: unexpected '}'$"):
        load_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}\n{% if %}")  # newer HF layout wins
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'chat_template.jinja'}: chat_template line 2: "):
        load_tokenizer(tmp_path)
    _edit_tokenizer_config(tmp_path, chat_template=[{"name": "default", "template": "ok"},
                                                    {"name": "tool_use", "template": "{% if %}"}])
    os.remove(tmp_path / "chat_template.jinja")
    with pytest.raises(ConfigError, match=r"chat_template 'tool_use' line 1: Jinja syntax error"):
        load_tokenizer(tmp_path)


def test_truncated_weights_are_one_line_checkpoint_error(tmp_path):
    """A corrupt shard stays a CheckpointError naming the file, now a ConfigError the CLIs print in one line."""
    model = tmp_path / "m"
    save_char_checkpoint(model)
    _truncate(model / SINGLE_FILE)
    cfg = Config(model=ModelConfig(name_or_path=str(model)))
    tok = build_tokenizer(cfg.model)  # headers are only read at model load; the tokenizer is fine
    with pytest.raises(CheckpointError) as err:
        build_model(cfg, tok, device="cpu")
    assert isinstance(err.value, ConfigError) and str(model / SINGLE_FILE) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", [*sorted(CASES), "truncated"])
def test_eval_cli_reports_a_broken_model_dir_in_one_line(tmp_path, case, capsys):
    """r1fast.eval (check_checkpoint + load_policy, as rejection and the pipeline's stages): no traceback."""
    from r1fast.eval import main

    model = tmp_path / "m"
    _hf_tokenizer_dir(model)
    break_dir, file = ((lambda d: _truncate(d / SINGLE_FILE)), SINGLE_FILE) if case == "truncated" else CASES[case][:2]
    break_dir(model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    assert main(["--model", str(model), "--data", str(data), "--limit", "1", "--k", "1", "--max_new_tokens", "2"]) in (1, 2)
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1fast.eval: error: ") and err.count("\n") == 0 and str(model / file) in err
