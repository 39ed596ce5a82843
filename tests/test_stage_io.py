"""What every stage shares when it loads a user's model: stop ids, tokenizer/model fit, prompt rendering,
checkpoint dtype, and a fresh run beside an earlier one (the real-model path, not the tiny recipe's)."""

import json
import os

import pytest
import torch
from conftest import save_char_checkpoint

from r1fast.config import ConfigError
from r1fast.data_setup import encode_prompts
from r1fast.model import Transformer
from r1fast.stage_io import check_tokenizer_fits, encode_prompt, load_policy, render_prompt, stop_token_ids
from r1fast.tokenizer import CharTokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_stop_ids_are_the_tokenizer_eos_and_every_config_eos(tiny_checkpoint):
    tok, model = load_policy(tiny_checkpoint, device="cpu", dtype=torch.float32)
    assert stop_token_ids(tok, model.args) == [tok.eos_id]
    model.args.eos_token_id = [tok.eos_id, 5, 10_000]  # Qwen2.5-Instruct / Llama-3 ship two; out of range ignored
    assert stop_token_ids(tok, model.args) == [tok.eos_id, 5]


def test_tokenizer_must_fit_the_model_and_have_an_eos(tmp_path):
    tok, model = load_policy(save_char_checkpoint(tmp_path / "m"), device="cpu", dtype=torch.float32)
    model.args.vocab_size = tok.vocab_size - 1  # tags added to the tokenizer, embeddings not resized
    with pytest.raises(ConfigError, match="model.name_or_path: the tokenizer has .* ids but the model embeds only"):
        check_tokenizer_fits(tok, model)
    model.args.vocab_size = tok.vocab_size
    tok.eos_id, model.args.eos_token_id = None, [7, 8]  # tokenizer_config.json without eos_token
    assert check_tokenizer_fits(tok, model).eos_id == 7
    tok.eos_id, model.args.eos_token_id = None, None
    with pytest.raises(ConfigError, match="names an end-of-sequence token"):
        check_tokenizer_fits(tok, model)


def test_grpo_prompts_render_as_sft_and_eval_render_them():
    plain, chat = CharTokenizer(), CharTokenizer(chat_template=CHATML.replace("<|im_start|>", "[").replace(
        "<|im_end|>", "]"))
    samples = [{"prompt": "2+2"}, {"prompt": "10+5"}]
    for tok, template in ((plain, "r1_zero"), (plain, "auto"), (chat, "auto"), (chat, "chat"), (chat, "compact")):
        expected = [encode_prompt(tok, render_prompt(tok, template, prompt=s["prompt"]), template) for s in samples]
        assert encode_prompts(tok, samples, template) == expected, template
    assert encode_prompts(chat, samples[:1], "chat")[0] == chat.encode("[user\n2+2]\n[assistant\n")  # no <bos>
    with pytest.raises(ConfigError, match="data.template=chat but the tokenizer has no chat_template"):
        encode_prompts(plain, samples, "chat")


def test_prerendered_prompt_with_its_own_bos_gets_no_second_one():
    """Template 'none' on a prompt rendered with a chat template that writes <bos> (Llama-3, R1-Distill): one
    <bos>, not two (the model never sees <bos><bos>); a prompt without it still gets one."""
    tok = CharTokenizer()
    prerendered = "<bos>User: 2+2. Assistant: <think>"
    assert encode_prompt(tok, prerendered, "none") == tok.encode(prerendered)
    assert tok.encode(prerendered).count(tok.bos_id) == 1
    assert encode_prompt(tok, "User: 2+2.", "none") == [tok.bos_id, *tok.encode("User: 2+2.")]


def test_bf16_runs_save_bf16_checkpoints(tmp_path):
    from r1fast.train_state import save_hf

    model = Transformer.from_pretrained(save_char_checkpoint(tmp_path / "m"), dtype=torch.bfloat16)
    save_hf(model, {k: v.detach() for k, v in model.state_dict().items()}, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    reloaded = Transformer.from_pretrained(str(tmp_path / "out"))
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_a_fresh_run_sets_an_earlier_one_aside(tmp_path, capsys):
    from r1fast.run_dir import set_aside_earlier_run

    run_dir = tmp_path / "runs" / "x"
    (run_dir / "checkpoints" / "step_3").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    set_aside_earlier_run(str(run_dir))
    assert not run_dir.exists()
    (aside,) = [p for p in os.listdir(tmp_path / "runs") if p.startswith("x.prev-")]
    assert (tmp_path / "runs" / aside / "checkpoints" / "step_3").is_dir()
    assert "holds an earlier run" in capsys.readouterr().err
    run_dir.mkdir()
    set_aside_earlier_run(str(run_dir))  # an empty directory is no earlier run
    assert run_dir.exists()
    (run_dir / "summary.json").write_text("{}")
    set_aside_earlier_run(str(run_dir) + "/")  # a trailing slash: os.replace would move it into itself
    assert not run_dir.exists() and len([p for p in os.listdir(tmp_path / "runs") if p.startswith("x.prev-")]) == 2


def test_generation_config_eos_ids_stop_generation_and_the_file_is_saved_back(tmp_path):
    """Instruct models list their chat eos in generation_config.json (config.json names one)."""
    path = save_char_checkpoint(tmp_path / "m")
    generation = {"eos_token_id": [2, 5], "temperature": 0.7, "top_p": 0.8}
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(generation))
    tok, model = load_policy(path, device="cpu", dtype=torch.float32)
    assert stop_token_ids(tok, model.args) == [tok.eos_id, *[i for i in (2, 5) if i != tok.eos_id]]
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == generation
    assert "generation_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_length_rule_matches_the_engine_at_the_boundary_and_an_all_long_file_is_one_error(tmp_path):
    """A prompt of exactly positions - max_new_tokens tokens is sampled; one token more is dropped, not the
    engine's ValueError (one 137-token MATH-style prompt on a 40-position model crashed eval and rejection)."""
    from r1fast.config_io import DataError
    from r1fast.rollout import Engine
    from r1fast.stage_io import encode_fitting_prompts, generation_limit

    tok, model = load_policy(save_char_checkpoint(tmp_path / "m", max_position_embeddings=40), device="cpu",
                             dtype=torch.float32)
    engine = Engine(model, block_size=8)
    assert generation_limit(engine) == 40  # the CPU cache (65,536 tokens) is not the bound here
    head = len(encode_prompt(tok, render_prompt(tok, "none", prompt=""), "none"))  # <bos>
    samples = [{"prompt": "1" * (32 - head)}, {"prompt": "1" * (33 - head)}, {"prompt": "2+2"}]
    fitting, dropped = encode_fitting_prompts(tok, samples, "none", max_new_tokens=8, limit=40, path="p.jsonl")
    assert sorted(fitting) == [0, 2] and dropped == 1 and len(fitting[0]) == 32
    out = engine.generate([fitting[0]], n=1, max_new_tokens=8, temperature=0.0)  # exactly 40: the engine agrees
    assert len(out[0][0].token_ids) <= 8
    with pytest.raises(ValueError, match="40 positions"):  # and one more token is what the rule drops
        engine.generate([tok.encode("1" * 33)], n=1, max_new_tokens=8, temperature=0.0)
    with pytest.raises(DataError, match=r"^data: all 2 prompts of 'p\.jsonl' are too long: .*max_new_tokens=8"):
        encode_fitting_prompts(tok, samples[1:2] * 2, "none", max_new_tokens=8, limit=40, path="p.jsonl")
    small = Engine(model, block_size=8, num_blocks=3)  # 24 cached tokens: the cache, not the positions, bounds it
    assert generation_limit(small) == 25
    small.generate([tok.encode("1" * 17)], n=1, max_new_tokens=8, temperature=0.0)  # 17 + 8 = 25 fits
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        small.generate([tok.encode("1" * 18)], n=1, max_new_tokens=8, temperature=0.0)


def test_a_template_other_than_the_one_the_checkpoint_was_trained_with_is_said(tmp_path, monkeypatch, capsys):
    """An SFT on 'compact' then GRPO with data.template's default r1_zero (or a second SFT, or rejection sampling,
    on another template) ran the policy on a prompt format it never saw, silently; now one stderr line says so,
    and 'auto' or the same template say nothing."""
    from r1fast.config_io import load_config
    from r1fast.sft import SFTConfig, run_sft
    from r1fast.stage_io import checked_template
    from r1fast.tokenizer import load as load_tokenizer

    tok = CharTokenizer()
    assert checked_template(tok, "r1_zero", "data.template") == "r1_zero"  # nothing recorded: nothing to say
    tok.prompt_template = "compact"
    assert checked_template(tok, "auto", "template") == "compact" and checked_template(tok, "compact", "t") == "compact"
    assert capsys.readouterr().err == ""
    assert checked_template(tok, "r1_zero", "data.template") == "r1_zero"
    assert "data.template='r1_zero' renders prompts with 'r1_zero', but the checkpoint was trained with 'compact'" \
        in capsys.readouterr().err

    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setenv("R1FAST_PROGRESS", "0")
    ckpt = save_char_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "r1fast_prompt.json").write_text('{"prompt_template": "compact"}')
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2", "completion": "<answer>3</answer>"}\n')
    for name, template, said in (("same", "auto", False), ("other", "none", True)):
        run_sft(load_config(None, ["--data", str(data), "--out_dir", str(tmp_path / "runs"), "--name", name,
                                   "--template", template, "--steps", "1", "--batch_size", "1",
                                   "--model.name_or_path", ckpt], schema=SFTConfig))
        assert ("but the checkpoint was trained with 'compact'" in capsys.readouterr().err) == said
        assert load_tokenizer(tmp_path / "runs" / name / "model").prompt_template == ("none" if said else "compact")
