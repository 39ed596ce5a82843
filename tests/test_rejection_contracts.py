"""r1fast.rejection: what counts as correct, what the grader sees, the order of the gathered traces over ranks,
and config checks that must fail before any model loads."""

import json
import re
from types import SimpleNamespace

import pytest
from test_rejection import GOOD, _trace

import r1fast.distributed as D
from r1fast.config_io import ConfigError
from r1fast.rejection import RejectionConfig, filter_traces, sample_traces
from r1fast.rollout import Completion
from r1fast.tokenizer import CharTokenizer


def test_partial_accuracy_and_a_missing_format_reward_are_incorrect():
    """Kept: accuracy 1 (and format 1 when require_format); partial credit is not correct, and a reward dict
    without "format" does not pass the format requirement."""
    cfg = RejectionConfig(checkpoint="c", data="d", out="o")
    traces = [_trace(0, GOOD, acc=0.5), {**_trace(1, GOOD), "rewards": {"accuracy": 1.0}}, _trace(2, GOOD)]
    kept, counts = filter_traces(traces, cfg)
    assert [t["prompt_index"] for t in kept] == [2]
    assert counts["incorrect"] == 2
    relaxed = RejectionConfig(checkpoint="c", data="d", out="o", require_format=False)
    kept, counts = filter_traces(traces, relaxed)
    assert [t["prompt_index"] for t in kept] == [1, 2] and counts["incorrect"] == 1


class _Engine:
    """Completion j of prompt text P: the characters of f"{P}|{j}" then EOS."""

    def __init__(self, tok):
        self.tok = tok
        self.args = SimpleNamespace(eos_token_id=tok.eos_id, generation_config=None, vocab_size=tok.vocab_size)
        self.calls = []

    def generate(self, prompts, n, seed=None, **kw):
        self.calls.append(seed)
        return [[Completion(self.tok.encode(f"{self.tok.decode(p)}|{j}") + [self.tok.eos_id], [0.0] * 4, "stop")
                 for j in range(n)] for p in prompts]


def _samples(n):
    return [{"prompt": f"q{i}", "answer": "1"} for i in range(n)]


def test_the_grader_sees_the_prompts_open_think_and_the_trace_does_not():
    tok = CharTokenizer()
    seen = []

    def score(samples, texts):
        seen.extend(texts)
        return [{"accuracy": 1.0, "format": 1.0} for _ in texts]

    cfg = RejectionConfig(checkpoint="c", data="d", out="o", k=2, template="none")
    samples = _samples(2)
    ids = {i: tok.encode(s["prompt"]) for i, s in enumerate(samples)}
    traces = sample_traces(_Engine(tok), tok, samples, cfg, score, prompt_ids=ids, completion_prefix="<think>\n")
    assert [t["completion"] for t in traces] == ["q0|0", "q0|1", "q1|0", "q1|1"]
    assert seen == ["<think>\nq0|0", "<think>\nq0|1", "<think>\nq1|0", "<think>\nq1|1"]


def test_traces_gathered_over_ranks_come_back_in_prompt_order_with_global_seeds(monkeypatch):
    """Rank r samples prompts r, r + world, ...; every rank gets all traces in (prompt, sample) order, each with
    the seed of its global prompt index (seed * 1_000_003 + i * k + j)."""
    tok = CharTokenizer()
    cfg = RejectionConfig(checkpoint="c", data="d", out="o", k=2, template="none", seed=3)
    samples = _samples(4)
    ids = {i: tok.encode(s["prompt"]) for i, s in enumerate(samples)}
    score = lambda samples, texts: [{"accuracy": 1.0, "format": 1.0} for _ in texts]  # noqa: E731
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "rank", lambda: 0)
    monkeypatch.setattr(D, "all_gather_object", lambda obj: [obj])
    rank0 = sample_traces(_Engine(tok), tok, samples, cfg, score, prompt_ids=ids, completion_prefix="")
    assert [t["prompt_index"] for t in rank0] == [0, 0, 2, 2]
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "all_gather_object", lambda obj: [rank0, obj])  # rank order
    traces = sample_traces(_Engine(tok), tok, samples, cfg, score, prompt_ids=ids, completion_prefix="")
    assert [(t["prompt_index"], t["sample_index"]) for t in traces] == [(i, j) for i in range(4) for j in range(2)]
    assert [t["completion"] for t in traces] == [f"q{i}|{j}" for i in range(4) for j in range(2)]
    assert [t["seed"] for t in traces] == [3 * 1_000_003 + i * 2 + j for i in range(4) for j in range(2)]


def test_block_size_must_be_a_power_of_two_before_any_model_loads():
    with pytest.raises(ConfigError, match="block_size"):
        RejectionConfig(checkpoint="c", data="d", out="o", block_size=24).validate()
    RejectionConfig(checkpoint="c", data="d", out="o", block_size=32).validate()


def test_out_naming_the_data_file_by_another_spelling_is_refused(tmp_path, monkeypatch):
    """run_rejection deletes ``out`` before sampling: the data file named relatively must be caught too."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="out"):
        RejectionConfig(checkpoint="c", data=str(data), out="d.jsonl").validate()
    with pytest.raises(ConfigError, match="out"):
        RejectionConfig(checkpoint="c", data="d.jsonl", out="./d.jsonl").validate()


def test_an_out_that_cannot_be_written_is_refused_before_sampling(tmp_path):
    """A directory at out was an IsADirectoryError traceback; a file above out one after all the sampling."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=rf"^out: {re.escape(repr(str(tmp_path)))} is a directory; out names"):
        RejectionConfig(checkpoint="c", data=str(data), out=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match=rf"^out: {re.escape(repr(str(data)))} is a file; out names"):
        RejectionConfig(checkpoint="c", data=str(data), out=str(data / "kept.jsonl")).validate()
    RejectionConfig(checkpoint="c", data=str(data), out=str(tmp_path / "new" / "kept.jsonl")).validate()


def test_written_records_carry_each_traces_provenance(tmp_path):
    from r1fast.rejection import _write_jsonl

    cfg = RejectionConfig(checkpoint=str(tmp_path / "ckpt"), data=str(tmp_path / "d.jsonl"), out="o", k=2, seed=3)
    kept = [{**_trace(i, GOOD), "answer": "12", "task": "addition", "id": f"a{i}",
             "sample_index": i, "seed": 100 + i, "num_tokens": 7 + i, "finish_reason": "stop"} for i in range(2)]
    out = tmp_path / "sub" / "kept.jsonl"
    _write_jsonl(str(out), kept, cfg, "compact")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "completion", "answer", "task", "id", "rewards", "provenance"}] * 2
    for i, r in enumerate(rows):
        assert (r["prompt"], r["completion"], r["id"]) == (f"p{i}", GOOD, f"a{i}")
        p = r["provenance"]
        assert (p["sample_index"], p["seed"], p["num_tokens"], p["finish_reason"]) == (i, 100 + i, 7 + i, "stop")
        assert p["template"] == "compact" and p["checkpoint"] == str(tmp_path / "ckpt")
        assert p["sampling"] == {"k": 2, "temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_new_tokens": 256, "seed": 3}


def test_counts_prompts_with_a_kept_trace_not_kept_traces(tmp_path, tiny_checkpoint, monkeypatch):
    """counts["prompts_with_kept"] counts prompts, not traces: 3 kept traces from 2 of 3 prompts give 2."""
    import r1fast.rejection as rej

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(3)))
    thoughts = ["first we add the two small numbers carefully", "counting up from the first number gives the sum",
                "the second number is one so the answer is next"]

    def fake_traces(engine, tokenizer, samples, cfg, score, **kw):
        made = [(0, 0, thoughts[0], 1.0), (0, 1, thoughts[1], 1.0), (1, 0, thoughts[2], 1.0), (2, 0, thoughts[0], 0.0)]
        return [{**_trace(i, f"<think>{t}</think><answer>{i + 1}</answer>", acc=acc),
                 "answer": str(i + 1), "task": "math", "id": f"p{i}", "sample_index": j, "seed": j}
                for i, j, t, acc in made]

    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setattr(rej, "sample_traces", fake_traces)
    cfg = RejectionConfig(checkpoint=tiny_checkpoint, data=str(data), out=str(tmp_path / "kept.jsonl"), k=2,
                          template="compact", max_new_tokens=24)
    counts = rej.run_rejection(cfg)["counts"]
    assert counts["kept"] == 3 and counts["incorrect"] == 1
    assert counts["prompts_with_kept"] == 2 and counts["prompts"] == 3


def test_written_traces_keep_the_think_tag_their_prompt_opened(tmp_path):
    """A teacher whose template ends the prompt with '<think>\\n' samples '...</think><answer>...': written without
    that tag, a student whose template opens nothing (distillation) trained on targets with no '<think>' and was
    graded format 0. Under the teacher's own template the SFT tokens stay those of the sampled completion."""
    from test_prompt_template import R1_DISTILL_LIKE

    from r1fast.rejection import _write_jsonl
    from r1fast.rewards.format import format_reward
    from r1fast.sft import tokenize_sft_records

    sampled = "1 plus 2 is 3</think>\n<answer>3</answer>"
    kept = [{**_trace(0, sampled), "prompt": "1+2", "answer": "3", "task": "addition", "id": "a0",
             "sample_index": 0, "seed": 0, "num_tokens": len(sampled), "finish_reason": "stop"}]
    out = tmp_path / "kept.jsonl"
    _write_jsonl(str(out), kept, RejectionConfig(checkpoint="c", data="d", out="o"), "chat", "<think>\n")
    row = json.loads(out.read_text())
    assert row["completion"] == "<think>\n" + sampled
    records = [({"prompt": row["prompt"]}, row["completion"])]
    student, teacher = CharTokenizer(), CharTokenizer(chat_template=R1_DISTILL_LIKE)
    (_, target), = tokenize_sft_records(records, student, "compact")
    assert format_reward("", student.decode(target), {}) == 1.0
    (_, target), = tokenize_sft_records(records, teacher, "chat")
    assert target == teacher.encode(sampled)
    by_prompt = lambda prompt: "<think>" if prompt.endswith("<think>") else ""  # noqa: E731  (template 'none')
    _write_jsonl(str(out), [kept[0], {**kept[0], "prompt": "1+2 <think>"}], RejectionConfig(checkpoint="c", data="d",
                 out="o"), "none", by_prompt)
    assert [json.loads(x)["completion"] for x in out.read_text().splitlines()] == [sampled, "<think>" + sampled]


def test_a_samples_language_column_sets_the_filters_target_as_it_sets_the_rewards():
    """The language reward takes a sample's "language" column over the configured target; the mixed_language
    filter read cfg.language alone, so an en/zh data set lost every correct zh trace (and cfg.language=zh still
    recorded consistency against en)."""
    from r1fast.rejection import config_score

    zh = "<think>三加四等于七</think><answer>7</answer>"
    samples = [{"prompt": "q0", "answer": "7", "language": "zh"}, {"prompt": "q1", "answer": "7"}]
    tok = SimpleNamespace(eos_id=1, vocab_size=2, decode=lambda ids: zh)  # every sample writes the zh trace

    class _Fixed(_Engine):
        def generate(self, prompts, n, seed=None, **kw):
            return [[Completion([0, 1], [0.0] * 2, "stop")] for _ in prompts]

    cfg = RejectionConfig(checkpoint="c", data="d", out="o", k=1, template="none")
    ids = {i: [0] for i in range(len(samples))}
    traces = sample_traces(_Fixed(tok), tok, samples, cfg, lambda s, t: [{"accuracy": 1.0, "format": 1.0}] * len(t),
                           prompt_ids=ids, completion_prefix="")
    assert [t["language"] for t in traces] == ["zh", None]
    kept, counts = filter_traces(traces, cfg)
    assert [t["prompt_index"] for t in kept] == [0] and counts["mixed_language"] == 1
    kept, counts = filter_traces(traces, RejectionConfig(checkpoint="c", data="d", out="o", language="zh"))
    assert len(kept) == 2 and counts["mixed_language"] == 0
    score = config_score(RejectionConfig(checkpoint="c", data="d", out="o", language="zh"))
    assert [r["language_consistency"] for r in score([{"answer": "7"}, {"answer": "7", "language": "en"}], [zh] * 2)] \
        == [1.0, 0.0]
