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


def test_a_bad_record_is_one_config_error_naming_the_file(tmp_path):
    """Corrupt JSON raised a traceback in every stage; an unknown name silently fell back to r1_zero."""
    import pytest

    from r1fast.config_io import ConfigError

    CharTokenizer().save(tmp_path)
    for content in (b"{not json", b"\xff\xfe", b'["compact"]', b'{"prompt_template": "compakt"}',
                    b'{"prompt_template": 3}'):
        (tmp_path / PROMPT_TEMPLATE_FILE).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"{PROMPT_TEMPLATE_FILE}: .*prompt_template"):
            load_tokenizer(tmp_path)


def test_pipeline_report_says_when_stages_scored_different_subsets():
    """Eval drops prompts too long for a stage's model: the report counted the file's lines for every row."""
    from r1fast.pipeline_report import build_report

    def record(stage, scored, dropped):
        return {"stage": stage, "kind": "rl", "family": "teacher", "optimizer_steps": 3, "train_s": 1.0, "wall_s": 2.0,
                "eval": {"greedy_accuracy": 0.5, "pass@1": 0.5, "samples_per_prompt": 2, "num_prompts": scored,
                         "dropped_too_long": dropped}, "summary": {}}

    report = build_report([record("a", 6, 0), record("b", 3, 3)], comparison={"distilled": None, "rl_only": None},
                          heldout={"path": "h.jsonl", "sha256": "0" * 64, "num_prompts": 6},
                          eval_settings={"k": 2, "temperature": 0.6, "top_p": 0.95}, ran=["a", "b"])
    assert "scored 3 of 6 prompts (3 too long for the model)" in report["markdown"]
    assert "different subsets" in report["markdown"]
    assert [r["dropped_too_long"] for r in report["stages"]] == [0, 3]


R1_DISTILL_LIKE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")


def test_a_prompt_that_opens_think_is_graded_with_its_open_tag():
    """R1-Distill-style chat templates end the prompt with '<think>\\n': the model writes only
    '...</think><answer>...</answer>', which scored format 0 (and language 0) on every sample."""
    from r1fast.eval import _grade
    from r1fast.rewards import combine
    from r1fast.rewards.format import open_think_tail
    from r1fast.rewards_setup import Scorer
    from r1fast.stage_io import completion_prefix

    assert open_think_tail("<|assistant|><think>\n") == "<think>\n"
    assert open_think_tail("<think>x</think><think>  \n") == "<think>  \n"
    for closed in ("<|assistant|>", "<think>\n</think>\n", "<think>\nreasoning", "think>"):
        assert open_think_tail(closed) == ""
    chat = CharTokenizer(chat_template=R1_DISTILL_LIKE)
    assert completion_prefix(chat, "chat") == "<think>\n"
    assert completion_prefix(chat, "r1_zero") == "" and completion_prefix(CharTokenizer(), "auto") == ""
    completion = "1 plus 2 is 3</think>\n<answer>3</answer>"
    sample = {"prompt": "1+2", "answer": "3", "task": "addition"}
    weights = {"format": 1.0, "task_accuracy": 1.0, "language": 1.0}
    opened, plain = Scorer(combine(weights, {}), "<think>\n"), Scorer(combine(weights, {}))
    assert opened.score(["1+2"], [completion], [sample]).total == [3.0]
    assert plain.score(["1+2"], [completion], [sample]).total[0] < 2.0  # format and language both 0 unopened
    assert opened.check(sample, completion) == (True, True) and plain.check(sample, completion)[1] is False
    assert _grade([sample], [completion], True, "<think>\n")[1] == [True]
    assert _grade([sample], [completion], True)[1] == [False]


def test_training_targets_continue_the_think_block_a_template_opened():
    """r1fast's worked solutions and R1-Distill data start with '<think>'; after a prompt that opened one, the
    cold start and r1fast.sft trained '<think>\\n<think>...' and every stage then graded the model format 0."""
    from r1fast.rewards.format import continue_open_think, format_reward
    from r1fast.sft import tokenize_sft_records

    assert continue_open_think("<think>\n33+4=37</think><answer>37</answer>", "<think>\n") == "33+4=37</think><answer>37</answer>"
    assert continue_open_think("<think>x</think><answer>1</answer>", "<think>\n") == "x</think><answer>1</answer>"
    assert continue_open_think("x</think><answer>1</answer>", "<think>\n") == "x</think><answer>1</answer>"
    assert continue_open_think("<answer>207</answer>", "<think>\n") == "\n</think>\n\n<answer>207</answer>"
    assert continue_open_think("<think>x</think><answer>1</answer>", "") == "<think>x</think><answer>1</answer>"
    chat = CharTokenizer(chat_template=R1_DISTILL_LIKE)
    records = [({"prompt": "33+4"}, "<think>\n33+4=37</think>\n<answer>37</answer>"), ({"prompt": "hi"}, "<answer>207</answer>")]
    for prompt_ids, target_ids in tokenize_sft_records(records, chat, "chat"):
        text = chat.decode(prompt_ids) + chat.decode(target_ids)
        assert text.count("<think>") == 1 and format_reward("", text[text.index("<think>"):], {}) == 1.0, text


def test_pre_rendered_prompts_under_template_none_are_graded_with_their_own_open_tag(monkeypatch):
    """Template 'none' takes each prompt as its own rendering: a TinyZero-style prompt ending "Assistant: Let me
    solve this step by step.\\n<think>" left every completion graded without its '<think>' (format 0 throughout,
    and RL then taught a second '<think>'); a prompt that opens nothing keeps an empty prefix."""
    from r1fast import rejection_filters as F
    from r1fast.eval import _grade
    from r1fast.rejection import RejectionConfig, filter_traces
    from r1fast.rewards import combine
    from r1fast.rewards_setup import Scorer
    from r1fast.stage_io import completion_prefix

    prefix = completion_prefix(CharTokenizer(), "none")
    opened = {"prompt": "User: 1+2. Assistant: Let me solve this step by step.\n<think>", "answer": "3",
              "task": "addition"}
    plain = {"prompt": "User: 1+2. Assistant:", "answer": "3", "task": "addition"}
    completion = " 1 plus 2 is 3</think>\n<answer>3</answer>"
    assert prefix(opened["prompt"]) == "<think>" and prefix(plain["prompt"]) == ""
    scorer = Scorer(combine({"format": 1.0, "task_accuracy": 1.0}, {}), prefix)
    assert scorer.score([opened["prompt"], plain["prompt"]], [completion] * 2, [opened, plain]).total == [2.0, 1.0]
    assert scorer.check(opened, completion) == (True, True) and scorer.check(plain, completion) == (True, False)
    assert _grade([opened, plain], [completion] * 2, True, prefix)[1] == [True, False]
    read = []  # the texts rejection's filters read: each prompt's own prefix + its completion
    monkeypatch.setattr(F, "unreadable", lambda text, **kw: read.append(text) or False)
    traces = [{"prompt": s["prompt"], "completion": completion, "prompt_index": i,
               "rewards": {"accuracy": 1.0, "format": 1.0}, "num_tokens": 30, "finish_reason": "stop"}
              for i, s in enumerate((opened, plain))]
    cfg = RejectionConfig(checkpoint="c", data="d", out="o", min_language_share=0.0, max_repeated_fraction=1.0)
    kept, _ = filter_traces(traces, cfg, completion_prefix=prefix)
    assert len(kept) == 2 and read == ["<think>" + completion, completion]
