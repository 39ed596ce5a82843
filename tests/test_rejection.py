"""r1fast.rejection_filters on crafted traces, and r1fast.rejection end to end on tiny checkpoints."""

import json
import re

import pytest

from r1fast import rejection_filters as F
from r1fast.config_io import ConfigError, DataError, load_config
from r1fast.data import generate_tasks, worked_solution
from r1fast.rejection import FILTER_STAGES, EmptyKeptSetError, RejectionConfig, filter_traces, run_rejection
from r1fast.sft import SFTConfig, run_sft

GOOD = "<think>3+4=7, 7+5=12</think><answer>12</answer>"


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")  # kernels have their own tests; these test the stage
    monkeypatch.setenv("R1FAST_PROGRESS", "0")


# ---- each filter on crafted traces ----------------------------------------------------------------


def test_words_and_ngrams():
    assert F.words("Wait, 12+35=47.") == ["wait", ",", "12", "+", "35", "=", "47", "."]
    assert F.ngrams(["a", "b", "c"], 2) == {("a", "b"), ("b", "c")}
    assert F.ngrams(["a"], 3) == {("a",)} and F.ngrams([], 2) == set()


def test_mixed_language():
    assert not F.mixed_language("<think>first add the tens then the ones</think><answer>5</answer>")
    # 4 English words, 2 Chinese characters: English share 2/3 < 0.95
    assert F.mixed_language("<think>add the 两 个 numbers now</think><answer>5</answer>")
    assert F.mixed_language("<think>add the 两个 numbers</think>", min_share=0.7)
    assert not F.mixed_language("<think>add the 两个 numbers</think>", min_share=0.6)
    assert not F.mixed_language("<think>3+4=7</think><answer>7</answer>")  # no words: nothing mixed
    # only the chain of thought counts when there is one
    assert not F.mixed_language("<think>add them</think><answer>答案</answer>")
    assert F.mixed_language("no think block, но по-русски", min_share=0.9)
    assert not F.mixed_language("<think>一 二 三</think>", language="zh")
    with pytest.raises(ValueError, match="min_share"):
        F.mixed_language("x", min_share=1.5)


def test_bad_length():
    assert F.bad_length(10, "length")  # truncated at max_new_tokens
    assert not F.bad_length(10, "stop", min_tokens=10, max_tokens=10)
    assert F.bad_length(9, "stop", min_tokens=10)
    assert F.bad_length(11, "stop", max_tokens=10)


def test_repetition():
    loop = "<think>" + "1+1=2, " * 12 + "</think><answer>2</answer>"
    assert F.repeated_ngram_fraction(GOOD) == 0.0
    assert F.repeated_ngram_fraction(loop) > 0.7 and F.too_repetitive(loop)
    assert not F.too_repetitive(GOOD)
    # 7 words, 4-grams: "a b a b a b a" has 4 grams, 2 distinct -> 2/4 repeated
    assert F.repeated_ngram_fraction("a b a b a b a", n=4) == pytest.approx(0.5)
    assert not F.too_repetitive("a b a b a b a", n=4, max_fraction=0.5)
    assert F.repeated_ngram_fraction("a b", n=4) == 0.0


def test_exact_and_near_duplicates():
    assert F.exact_key("1+2", "<think>x  y</think>") == F.exact_key(" 1+2", "<THINK>x y</think>\n")
    assert F.exact_key("1+2", "a") != F.exact_key("1+3", "a")
    a = F.ngrams(F.words("a b c d e"), 3)  # {abc, bcd, cde}
    b = F.ngrams(F.words("a b c d f"), 3)  # {abc, bcd, cdf}: Jaccard 2/4
    assert F.jaccard(a, b) == pytest.approx(0.5) and F.jaccard(set(), set()) == 1.0
    assert F.near_duplicate_of(b, [a], threshold=0.5) and not F.near_duplicate_of(b, [a], threshold=0.51)
    assert not F.near_duplicate_of(a, [], threshold=0.5)


def test_decontamination_index():
    index = F.NgramIndex(["sort 97 93 1 7", "What is the sum of the first ten positive odd integers plus one?"], n=8)
    assert len(index) == 2
    assert index.contaminated("Sort 97  93 1 7")  # a short eval prompt matches exactly (case/space ignored)
    assert not index.contaminated("sort 97 93 1 8")
    # an 8-gram of the long eval prompt inside a completion
    assert index.contaminated("make 3", "<think>recall: the sum of the first ten positive odd integers is 100</think>")
    assert not index.contaminated("the sum of the first five", "sum of the first ten")
    assert not F.NgramIndex(["", "x y"]).contaminated("", " ")  # empty texts never match


# ---- the filter pipeline: order and counts ---------------------------------------------------------


def _trace(i, completion, *, acc=1.0, fmt=1.0, tokens=20, finish="stop", prompt=None):
    return {"prompt": prompt or f"p{i}", "completion": completion, "prompt_index": i,
            "rewards": {"accuracy": acc, "format": fmt}, "num_tokens": tokens, "finish_reason": finish}


def test_filter_traces_counts_each_stage():
    long_think = "<think>one two three four five six seven eight nine ten eleven twelve</think><answer>1</answer>"
    traces = [
        _trace(0, GOOD),                                             # kept
        _trace(0, GOOD.upper().replace("<THINK>", "<think>")),       # exact duplicate (case-insensitive)
        _trace(0, "<think>3+4=7, 7+5=12 </think><answer>12</answer>"),  # near duplicate (same words)
        _trace(1, GOOD, acc=None),                                   # ungradable
        _trace(1, GOOD, acc=0.0),                                    # incorrect
        _trace(1, "12", fmt=0.0),                                    # incorrect: not in the template
        _trace(1, GOOD, finish="length"),                            # length: truncated
        _trace(1, GOOD, tokens=500),                                 # length: over max_tokens
        _trace(1, "<think>add the 两 个 numbers</think><answer>12</answer>"),  # mixed language
        _trace(1, "<think>" + "7+5=12 " * 10 + "</think><answer>12</answer>"),  # repetition
        _trace(2, GOOD, prompt="sort 97 93 1 7"),                    # contaminated prompt
        _trace(3, long_think),                                       # kept
        _trace(3, GOOD),                                             # over the per-prompt cap
        _trace(4, GOOD),                                             # kept: same text, other prompt
    ]
    cfg = RejectionConfig(checkpoint="c", data="d", out="o", max_tokens=100, max_per_prompt=1)
    kept, counts = filter_traces(traces, cfg, eval_texts=["sort 97 93 1 7"])
    assert [(t["prompt_index"], t["completion"]) for t in kept] == [(0, GOOD), (3, long_think), (4, GOOD)]
    assert counts == {"samples": 14, "ungradable": 1, "incorrect": 2, "length": 2, "mixed_language": 1,
                      "unreadable": 0, "repetition": 1, "contaminated": 1, "exact_duplicate": 1, "near_duplicate": 1,
                      "per_prompt_cap": 1, "kept": 3}
    assert set(FILTER_STAGES) | {"samples", "kept"} == set(counts)
    # without require_format the template-less correct trace survives
    cfg2 = RejectionConfig(checkpoint="c", data="d", out="o", require_format=False)
    assert len(filter_traces([_trace(0, "12", fmt=0.0)], cfg2)[0]) == 1


def test_length_filter_does_not_count_the_stop_token():
    from types import SimpleNamespace

    from r1fast.rejection import sample_traces, trace_tokens
    from r1fast.rollout import Completion
    from r1fast.tokenizer import CharTokenizer

    tok = CharTokenizer()
    eos = tok.eos_id
    outs = [Completion([eos], [-0.1], "stop"), Completion(tok.encode("12") + [eos], [-0.1] * 3, "stop"),
            Completion(tok.encode("123"), [-0.1] * 3, "length")]
    assert [trace_tokens(c) for c in outs] == [0, 2, 3]

    class Engine:  # returns the crafted completions; sample_traces only needs generate() and args
        args = SimpleNamespace(eos_token_id=eos, generation_config=None, vocab_size=tok.vocab_size)

        def generate(self, prompts, n, **kw):
            return [outs[:n] for _ in prompts]

    cfg = RejectionConfig(checkpoint="c", data="d", out="o", k=2, require_format=False, max_tokens=2)
    traces = sample_traces(Engine(), tok, [{"prompt": "1+1", "answer": "12"}], cfg,
                           score=lambda samples, texts: [{"accuracy": 1.0, "format": 0.0} for _ in texts])
    assert [(t["completion"], t["num_tokens"]) for t in traces] == [("", 0), ("12", 2)]
    kept, counts = filter_traces(traces, cfg)  # min_tokens=1 drops the EOS-only trace; max_tokens=2 keeps "12"
    assert [t["completion"] for t in kept] == ["12"] and counts["length"] == 1


# ---- end to end ---------------------------------------------------------------------------------------


def _prompts(path, n, seed=3):
    samples = generate_tasks("addition", n, seed=seed, min_digits=1, max_digits=1)
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    return str(path), samples


def _cfg(*overrides):
    return load_config(None, ["--template", "compact", "--max_new_tokens", "24", *overrides], schema=RejectionConfig)


def test_memorized_teacher_to_rejection_to_student_and_eval(tmp_path):
    """SFT a teacher until it knows 3 worked solutions; rejection sampling keeps its correct traces (and drops
    them all when the same prompts are an evaluation set); a fresh student trains on the kept JSONL; the
    teacher's evaluation shows the memorized answers."""
    from r1fast.eval import EvalConfig, run_eval

    data, samples = _prompts(tmp_path / "p.jsonl", 3)
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": s["prompt"], "completion": worked_solution(s)}) + "\n"
                                for s in samples))
    tiny = ["--model.num_layers", "1", "--model.hidden_size", "32", "--model.intermediate_size", "64",
            "--model.num_heads", "2", "--model.num_kv_heads", "1", "--model.max_seq_len", "64", "--template", "compact",
            "--out_dir", str(tmp_path)]
    teacher = run_sft(load_config(None, ["--data", str(sft_data), "--name", "teacher", "--steps", "60",
                                         "--batch_size", "3", "--lr", "1e-2", *tiny], schema=SFTConfig))
    out = tmp_path / "kept.jsonl"
    result = run_rejection(_cfg("--checkpoint", teacher["model_dir"], "--data", data, "--out", str(out), "--k", "4"))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert result["counts"]["kept"] == len(rows) >= 2 and result["counts"]["prompts_with_kept"] >= 2
    by_prompt = {s["prompt"]: s for s in samples}
    for r in rows:
        assert r["rewards"]["accuracy"] == 1.0 and r["rewards"]["format"] == 1.0
        assert r["completion"] == worked_solution(by_prompt[r["prompt"]])  # memorized, so exactly the solution
        p = r["provenance"]
        assert p["checkpoint"] == teacher["model_dir"] and p["finish_reason"] == "stop"
        assert p["sampling"] == {"k": 4, "temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_new_tokens": 24, "seed": 0}
        assert p["seed"] == p["sample_index"] + 4 * [s["prompt"] for s in samples].index(r["prompt"])
    assert json.loads((tmp_path / "kept.jsonl.stats.json").read_text())["counts"] == result["counts"]
    assert result["counts"]["exact_duplicate"] >= 1  # k=4 samples of a memorized answer repeat each other
    with pytest.raises(EmptyKeptSetError, match=r"\"contaminated\": [1-9]"):
        run_rejection(_cfg("--checkpoint", teacher["model_dir"], "--data", data, "--out", str(tmp_path / "x.jsonl"),
                           "--k", "4", "--decontaminate", data))
    def reject_all(batch, texts):  # a custom reward function replaces the default one
        return [{"accuracy": 0.0, "format": 1.0} for _ in texts]

    with pytest.raises(EmptyKeptSetError, match=r"\"incorrect\": 12"):
        run_rejection(_cfg("--checkpoint", teacher["model_dir"], "--data", data, "--out", str(tmp_path / "y.jsonl"),
                           "--k", "4"), score=reject_all)
    student = run_sft(load_config(None, ["--data", str(out), "--name", "student", "--steps", "2", "--batch_size", "2",
                                         *tiny], schema=SFTConfig))
    assert student["examples"] == len(rows)
    metrics = run_eval(load_config(None, ["--model", teacher["model_dir"], "--data", data, "--template", "compact",
                                          "--k", "2", "--max_new_tokens", "40", "--bootstrap_resamples", "10"],
                                   schema=EvalConfig))
    assert metrics["greedy_accuracy"] >= 2 / 3 and metrics["format_rate"] >= 2 / 3


def test_empty_kept_set_names_stage_and_counts(tmp_path, tiny_checkpoint):
    data, _ = _prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "kept.jsonl"
    cfg = _cfg("--checkpoint", tiny_checkpoint, "--data", data, "--out", str(out), "--k", "2")
    with pytest.raises(EmptyKeptSetError, match=r"rejection sampling from .*no trace survived.*\"incorrect\": 4"):
        run_rejection(cfg)  # a random model answers nothing correctly
    assert not out.exists()


def test_missing_inputs_fail_before_work(tmp_path, tiny_checkpoint, monkeypatch):
    import r1fast.rejection as rej

    data, _ = _prompts(tmp_path / "p.jsonl", 1)
    monkeypatch.setattr(rej, "load_jsonl", lambda *a, **k: pytest.fail("data read before the path checks"))
    with pytest.raises(FileNotFoundError, match="checkpoint: checkpoint directory"):
        run_rejection(_cfg("--checkpoint", str(tmp_path / "gone"), "--data", data, "--out", str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="decontaminate: file"):
        run_rejection(_cfg("--checkpoint", tiny_checkpoint, "--data", data, "--out", str(tmp_path / "o"),
                           "--decontaminate", str(tmp_path / "eval_missing.jsonl")))
    with pytest.raises(ConfigError, match="out: required"):
        _cfg("--checkpoint", tiny_checkpoint, "--data", data)


def test_bad_data_is_one_line_and_found_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import r1fast.rejection as rej

    monkeypatch.setattr(rej, "load_policy", lambda *a, **k: pytest.fail("model loaded before the data check"))
    good, _ = _prompts(tmp_path / "p.jsonl", 1)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n\n{"prompt": 3}\n')
    out = ["--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "kept.jsonl")]
    for args, match in ((["--data", str(tmp_path / "empty.jsonl")], r"data: '.*empty\.jsonl' holds no records"),
                        (["--data", str(tmp_path / "bad.jsonl")], r".*bad\.jsonl:3: field 'answer' missing"),
                        (["--data", good, "--decontaminate", str(tmp_path / "bad.jsonl")], r".*bad\.jsonl:3: ")):
        assert rej.main([*out, *args]) == 1, args
        err = capsys.readouterr().err
        assert re.match(f"r1fast.rejection: error: {match}", err) and err.count("\n") == 1, err
    with pytest.raises(DataError):  # programmatic callers get the same type (a ValueError)
        run_rejection(_cfg(*out, "--data", str(tmp_path / "empty.jsonl")))
    assert not (tmp_path / "kept.jsonl").exists()


def test_chat_template_missing_is_one_config_error(tmp_path, tiny_checkpoint):
    data, _ = _prompts(tmp_path / "p.jsonl", 1)
    cfg = _cfg("--checkpoint", tiny_checkpoint, "--data", data, "--out", str(tmp_path / "o"), "--template", "chat")
    with pytest.raises(ConfigError, match="^template=chat but the tokenizer has no chat_template"):
        run_rejection(cfg)  # was a bare ValueError from the first prompt's render


def test_an_unsupported_language_column_fails_before_sampling(tmp_path, tiny_checkpoint, monkeypatch):
    """The default score grades language consistency: a row's "language": "English" raised a bare ValueError
    after every prompt was sampled (train refuses the same data at load)."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+2", "answer": "3", "language": "English"}) + "\n")
    monkeypatch.setattr("r1fast.rejection.load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError, match="p.jsonl:1'?: reward 'language': language: unsupported target 'English'"):
        run_rejection(_cfg("--checkpoint", tiny_checkpoint, "--data", str(data), "--out", str(tmp_path / "o")))


def test_too_long_prompts_are_dropped_counted_and_reported(tmp_path, capsys):
    """One prompt past the model's 40 positions was a raw ValueError from the engine; now it is dropped,
    counted in the stats and on stderr, and the others keep their indices (and so their seeds)."""
    from conftest import save_char_checkpoint

    model = save_char_checkpoint(tmp_path / "m", max_position_embeddings=40)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["eos_token_id"] = list(range(config["vocab_size"]))  # every token stops: a random model's traces end
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    data, samples = _prompts(tmp_path / "p.jsonl", 3)
    rows = (tmp_path / "p.jsonl").read_text().splitlines()
    rows[1] = json.dumps({"prompt": " + ".join(["1"] * 20), "answer": "20"})  # 79 chars: past 40 positions
    (tmp_path / "p.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "kept.jsonl"
    cfg = _cfg("--checkpoint", model, "--data", data, "--out", str(out), "--k", "2", "--max_new_tokens", "6",
               "--require_format", "false", "--min_tokens", "0")
    result = run_rejection(cfg, score=lambda batch, texts: [{"accuracy": 1.0, "format": 1.0} for _ in texts])
    assert "r1fast.rejection: dropped 1 of 3 prompts of" in capsys.readouterr().err
    counts = json.loads((tmp_path / "kept.jsonl.stats.json").read_text())["counts"]
    assert counts == result["counts"] and counts["dropped_too_long"] == 1 and counts["prompts"] == 3
    assert counts["samples"] == 4  # k=2 samples of the 2 prompts that fit
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["prompt"] for r in kept} == {samples[0]["prompt"], samples[2]["prompt"]}
    assert all(r["provenance"]["seed"] in (0, 1, 4, 5) for r in kept)  # prompt 2 keeps seeds 2 * 2 + j
    (tmp_path / "long.jsonl").write_text(rows[1] + "\n")
    with pytest.raises(DataError, match=r"^data: all 1 prompts of '.*long\.jsonl' are too long"):
        run_rejection(_cfg("--checkpoint", model, "--data", str(tmp_path / "long.jsonl"), "--out", str(out)))


def test_one_word_evaluation_text_matches_by_equality_only():
    index = F.NgramIndex(["Hello", "74+91"])
    assert index.contaminated("hello") and index.contaminated("HELLO")
    assert not index.contaminated("hello world")
