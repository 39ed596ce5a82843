"""A checkpoint records the prompt template it was trained with; 'auto' in later stages uses it."""

import json

from train_testing import tiny_config

from r1fast.data import apply_template
from r1fast.stage_io import render_prompt, resolve_template
from r1fast.tokenizer import PROMPT_TEMPLATE_FILE, CharTokenizer
from r1fast.tokenizer import load as load_tokenizer


def test_auto_renders_with_the_template_the_checkpoint_was_trained_with(tmp_path, monkeypatch):
    """The tiny model trains on 'compact' prompts; eval/rejection's default 'auto' rendered r1_zero's (longer than
    its 128 positions: every prompt was dropped)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast.train import run

    run(tiny_config(tmp_path, "--train.steps", "1", "--train.name", "tpl", "--train.sft_steps", "0"))
    ckpt = tmp_path / "tpl" / "checkpoints" / "step_1" / "model"
    assert json.loads((ckpt / PROMPT_TEMPLATE_FILE).read_text()) == {"prompt_template": "compact"}
    tok = load_tokenizer(ckpt)
    assert resolve_template(tok, "auto") == "compact" and resolve_template(tok, "r1_zero") == "r1_zero"
    assert render_prompt(tok, "auto", prompt="1+2") == apply_template("1+2", "compact")


def test_auto_without_a_record_is_chat_when_possible_else_r1_zero(tmp_path):
    plain = CharTokenizer()
    assert resolve_template(plain, "auto") == "r1_zero"
    chat = CharTokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_template(chat, "auto") == "chat"
    chat.prompt_template = "chat"
    chat.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.prompt_template == "chat" and resolve_template(reloaded, "auto") == "chat"
    plain.prompt_template = "chat"  # a record the tokenizer can no longer honour falls back
    assert resolve_template(plain, "auto") == "r1_zero"
