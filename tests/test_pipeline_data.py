"""Data integrity across the pipeline and rejection sampling: a multi-input sft stage's limit splits across its
inputs (and records per-input counts), an output edited after its stage finished makes it stale on resume,
the readability filter (code blocks, long paragraphs), decontamination against held-out prompts shorter than
the n-gram size, and a failed rejection run leaving no earlier output behind."""

import json
import os

import pytest
from pipeline_testing import pipeline_header

from r1fast import pipeline as P
from r1fast import rejection_filters as F
from r1fast.config_io import ConfigError
from r1fast.data import generate_tasks, worked_solution
from r1fast.pipeline_data import split_limit
from r1fast.rejection import EmptyKeptSetError, RejectionConfig, filter_traces, run_rejection


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")  # kernels have their own tests; these test the data paths
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


# ---- an sft stage's limit over several inputs --------------------------------------------------------


def test_split_limit_is_proportional_and_keeps_every_input():
    assert split_limit([10, 10], 10) == [5, 5]  # the joined file's first 10 were 10 + 0
    assert split_limit([30, 10], 8) == [6, 2]
    assert split_limit([1000, 1], 10) == [9, 1]  # rounded to 0, the small input still gets one record
    assert split_limit([3, 4], None) == [3, 4] and split_limit([3, 4], 50) == [3, 4]
    assert sum(split_limit([7, 5, 3], 10)) == 10
    with pytest.raises(ValueError, match="limit"):
        split_limit([3], 0)


RECIPE = pipeline_header("t", "student") + """
[eval]
data = "data:heldout"
k = 1
max_new_tokens = 4
bootstrap_resamples = 2
[[stages]]
name = "data"
kind = "data"
config = {{ params = {{ min_digits = 1, max_digits = 1 }}, prompts_size = 4, heldout_size = 2, cold_start_size = 10, cold_start_params = {{ min_digits = 1, max_digits = 1 }}, non_reasoning_size = 10, non_reasoning_digits = [1, 2] }}
[[stages]]
name = "mix"
kind = "sft"
inputs = {{ model = "base:student", data = ["data:cold_start", "data:non_reasoning"] }}
config = {{ steps = 1, batch_size = 2, limit = 10 }}
"""


def test_sft_limit_splits_inputs_and_an_edited_output_is_stale(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(out=tmp_path / "runs"))
    P.run_pipeline(str(recipe))
    run = tmp_path / "runs" / "t"
    done = json.loads((run / "mix" / "DONE.json").read_text())
    assert done["summary"]["sources"] == [{"ref": "data:cold_start", "records": 10, "used": 5},
                                          {"ref": "data:non_reasoning", "records": 10, "used": 5}]
    trained = [json.loads(line) for line in (run / "mix" / "train.jsonl").read_text().splitlines()]
    assert sum(r["prompt"].startswith("repeat ") for r in trained) == 5 and done["summary"]["examples"] == 10
    assert done["config"]["limit"] == 10  # the declared limit is what the record shows

    loaded = P.load_recipe(str(recipe))
    assert P.plan(loaded) == []
    cold = run / "data" / "cold_start.jsonl"
    st = os.stat(cold)
    os.utime(cold, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: still done
    assert P.plan(loaded) == []
    cold.write_text("".join(cold.read_text().splitlines(keepends=True)[:3]))  # trimmed by hand
    assert P.plan(loaded) == ["data", "mix"]
    cold.write_text("x" * st.st_size)  # same size, other bytes (a new mtime): the sha256 decides
    assert P.plan(loaded) == ["data", "mix"]


# ---- readability ------------------------------------------------------------------------------------


def _trace(i, completion):
    return {"prompt": f"p{i}", "completion": completion, "prompt_index": i,
            "rewards": {"accuracy": 1.0, "format": 1.0}, "num_tokens": 20, "finish_reason": "stop"}


def test_unreadable_code_blocks_and_long_paragraphs():
    fenced = "<think>```python\nprint(74+91)\n```</think><answer>165</answer>"
    indented = "<think>compute it:\n\n    x = 74 + 91\n    print(x)</think><answer>165</answer>"
    prose = [f"w{i}" for i in range(320)]  # distinct words: the repetition filter keeps them
    long_para = "<think>" + " ".join(prose) + "</think><answer>165</answer>"
    split_para = f"<think>{' '.join(prose[:160])}\n\n{' '.join(prose[160:])}</think><answer>1</answer>"
    assert F.unreadable(fenced) and F.unreadable(indented) and F.unreadable(long_para)
    assert not F.unreadable(split_para)  # 160 + 160 words in two paragraphs
    assert not F.unreadable("<think>step one\n  then step two, indented after no blank line</think><answer>1</answer>")
    assert not F.unreadable("<think>the code `x+1` inline</think><answer>1</answer>")
    # code on the think block's first line (an open-think template: the model writes right after "<think>\n")
    assert F.unreadable("<think>\n    x = 74 + 91\n    print(x)\n</think><answer>165</answer>")
    assert not F.unreadable(fenced, code_blocks=False) and not F.unreadable(long_para, max_paragraph_words=None)
    assert F.unreadable(split_para, max_paragraph_words=100)
    with pytest.raises(ValueError, match="max_paragraph_words"):
        F.unreadable("x", max_paragraph_words=0)

    cfg = RejectionConfig(checkpoint="c", data="d", out="o")
    kept, counts = filter_traces([_trace(0, fenced), _trace(1, long_para), _trace(2, split_para)], cfg)
    assert counts["unreadable"] == 2 and [t["prompt_index"] for t in kept] == [2]
    off = RejectionConfig(checkpoint="c", data="d", out="o", filter_code_blocks=False, max_paragraph_words=None)
    assert filter_traces([_trace(0, fenced), _trace(1, long_para)], off)[1]["unreadable"] == 0


def test_worked_solutions_are_readable():
    """The tiny recipe's traces (its cold-start worked solutions: up to 3 digits here) survive the filter."""
    tasks = generate_tasks("addition", 200, seed=0, min_digits=1, max_digits=3)
    assert not any(F.unreadable(worked_solution(s)) for s in tasks)


# ---- decontamination of short held-out prompts ------------------------------------------------------


def test_short_heldout_prompt_inside_a_training_text_is_contaminated():
    index = F.NgramIndex(["74+91", "hello"], n=8)
    assert index.contaminated("What is 74+91?")
    assert index.contaminated("p", "<think>74 + 91: 4+1=5, 7+9=16</think><answer>165</answer>")
    assert not index.contaminated("What is 174+91?", "74+9")  # "174" is one word: not the held-out "74"
    assert not index.contaminated("say hello there")  # one word: equality only
    assert index.contaminated("Hello")
    cfg = RejectionConfig(checkpoint="c", data="d", out="o")
    kept, counts = filter_traces([_trace(0, "<think>74+91</think><answer>165</answer>")], cfg, eval_texts=["74+91"])
    assert not kept and counts["contaminated"] == 1


# ---- a failed rejection run leaves no earlier output -------------------------------------------------


def test_failed_rejection_removes_the_previous_output(tmp_path, tiny_checkpoint):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+2", "answer": "3"}) + "\n")
    out = tmp_path / "kept.jsonl"
    out.write_text('{"prompt": "stale"}\n')
    (tmp_path / "kept.jsonl.stats.json").write_text("{}")
    cfg = RejectionConfig(checkpoint=tiny_checkpoint, data=str(data), out=str(out), k=1, max_new_tokens=4,
                          template="compact")
    with pytest.raises(EmptyKeptSetError):
        run_rejection(cfg, score=lambda s, t: [{"accuracy": 0.0, "format": 1.0}] * len(t))
    assert not out.exists() and not (tmp_path / "kept.jsonl.stats.json").exists()
    with pytest.raises(ConfigError, match="out: .* is also the data input"):
        RejectionConfig(checkpoint=tiny_checkpoint, data=str(data), out=str(data)).validate()
    with pytest.raises(ConfigError, match="decontaminate input"):
        RejectionConfig(checkpoint="c", data="d", out=str(data), decontaminate=(str(data),)).validate()


def test_largest_remainder_gets_the_leftover():
    # exact shares 2.5, 1.5, 1.0: the leftover record goes to a .5 remainder (the first), never to the 0
    assert split_limit([5, 3, 2], 5) == [3, 1, 1]


def test_rescue_never_empties_the_larger_input():
    # limit 1 cannot give every input a record: the larger input keeps it
    assert split_limit([5, 1], 1) == [1, 0]
    assert split_limit([97, 1, 2], 10) == [8, 1, 1]
