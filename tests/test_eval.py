"""r1fast.eval_metrics against hand-computed values, and r1fast.eval end to end on a tiny checkpoint."""

import json
import math
import random
import re

import pytest

from r1fast.config_io import ConfigError, DataError, load_config
from r1fast.data import generate_tasks
from r1fast.eval import EvalConfig, main, run_eval
from r1fast.eval_metrics import (
    bootstrap_std,
    majority_vote,
    markdown_table,
    normalize_answer,
    pass_at_k,
    reflection_stats,
    summarize,
)


def test_pass_at_k_hand_computed():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    # n=4, c=1, k=3: 1 - C(3,3)/C(4,3) = 1 - 1/4
    assert pass_at_k(4, 1, 3) == pytest.approx(0.75, abs=1e-15)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # k=1 is c/n
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(6, 4, 3) == 1.0  # n - c < k: every draw holds a correct sample


def test_pass_at_k_equals_binomial_formula_on_random_inputs():
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 60)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k, match", [(4, 5, 1, "c:"), (4, 1, 5, "k:"), (4, 1, 0, "k:"), (4.0, 1, 1, "n:")])
def test_pass_at_k_bad_input(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_majority_vote_winner_ties_and_missing_answers():
    # clear winner "7" (3 votes) even though it appears after "5"
    assert majority_vote(["5", "7", "7", None, "7"], [False, True, True, False, True]) == ("7", True)
    # tie 2-2: the tied answer seen first wins ("5" at index 0), whatever the order of the rest
    assert majority_vote(["5", "7", "7", "5"], [False, True, True, False]) == ("5", False)
    assert majority_vote(["7", "5", "5", "7"], [True, False, False, True]) == ("7", True)
    # missing answers do not vote, even when they are the most common outcome
    assert majority_vote([None, None, None, "3"], [False, False, False, True]) == ("3", True)
    assert majority_vote([None, ""], [False, False]) == (None, False)
    # whitespace runs become one space (deleting them made "1 3 12" and "13 12" one answer); case is folded
    assert normalize_answer(" 1  2\t3 ") == "1 2 3" and normalize_answer("X") == "x"
    # answers graded correct share one vote whatever their text: "1 2" (seen first) and "12" outvote "3"
    assert majority_vote(["1 2", "3", "12"], [True, False, True]) == ("1 2", True)
    with pytest.raises(ValueError, match="differ in length"):
        majority_vote(["1"], [True, False])


def test_reflection_stats_whole_words_case_insensitive():
    texts = ["Wait, wait. Let me verify.", "awaits checking", "no reflection"]
    stats = reflection_stats(texts, ("wait", "verify", "check"))
    assert stats["reflect_wait_per_response"] == pytest.approx(2 / 3)
    assert stats["reflect_verify_per_response"] == pytest.approx(1 / 3)
    assert stats["reflect_check_per_response"] == 0.0  # "checking" is another word
    assert stats["reflection_rate"] == pytest.approx(1 / 3)


def test_bootstrap_std_matches_standard_error():
    assert bootstrap_std([0.5] * 20) == 0.0
    assert bootstrap_std([1.0]) == 0.0
    values = [float(i % 2) for i in range(100)]  # population std 0.5: standard error 0.05
    assert bootstrap_std(values, num_resamples=4000, seed=1) == pytest.approx(0.05, rel=0.08)
    assert bootstrap_std(values, seed=3) == bootstrap_std(values, seed=3)


def _record(correct, answers, formatted, lengths, greedy=None, texts=None):
    rec = {"correct": correct, "answers": answers, "formatted": formatted, "lengths": lengths,
           "texts": texts or [""] * len(correct)}
    if greedy is not None:
        rec.update(greedy_correct=greedy, greedy_formatted=greedy, greedy_length=5)
    return rec


def test_summarize_hand_computed():
    records = [
        _record([True, False, False, True], ["4", "5", "5", "4"], [True, True, False, True], [10, 20, 30, 40], True,
                ["wait", "", "", ""]),
        _record([False, False, False, False], ["1", None, "2", "2"], [False] * 4, [4, 4, 4, 4], False),
        _record([True, True, True, False], ["9", "9", "9", "8"], [True] * 4, [1, 2, 3, 4], True),
    ]
    out = summarize(records, ks=(1, 2, 4, 8), num_resamples=50)
    assert out["num_prompts"] == 3 and out["samples_per_prompt"] == 4
    assert out["pass@1"] == pytest.approx((0.5 + 0.0 + 0.75) / 3)
    # pass@2: 1 - C(2,2)/C(4,2) = 5/6; 0; 1 - C(1,2)/C(4,2) = 1
    assert out["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in out  # k above the number of samples is not reported
    # cons@4: prompt 1 ties 4 vs 5 -> "4" (seen first) is correct; prompt 2 -> "2" wrong; prompt 3 -> "9" right
    assert out["cons@4"] == pytest.approx(2 / 3)
    assert out["format_rate"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert out["response_length_mean"] == pytest.approx((100 + 16 + 10) / 12)
    assert out["greedy_accuracy"] == pytest.approx(2 / 3) and out["greedy_length_mean"] == 5
    assert out["reflect_wait_per_response"] == pytest.approx(1 / 12)
    assert out["pass@1_std"] > 0
    table = markdown_table(out, title="t")
    assert "| pass@1 | 0.4167 ± " in table and "| num_prompts | 3 |" in table
    with pytest.raises(ValueError, match="same, positive number"):
        summarize([records[0], _record([True], ["1"], [True], [1])])


def _heldout(path, n=3):
    with open(path, "w") as f:
        for s in generate_tasks("addition", n, seed=0, split="heldout", max_digits=1):
            f.write(json.dumps(s) + "\n")
    return str(path)


def test_run_eval_end_to_end(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    data = _heldout(tmp_path / "heldout.jsonl")
    overrides = ["--model", tiny_checkpoint, "--data", data, "--template", "compact", "--k", "3",
                 "--max_new_tokens", "6", "--bootstrap_resamples", "20", "--out", str(tmp_path / "ev")]
    cfg = load_config(None, overrides, schema=EvalConfig)
    assert (cfg.temperature, cfg.top_p) == (0.6, 0.95)  # R1's evaluation settings by default
    metrics = run_eval(cfg)
    assert metrics["num_prompts"] == 3 and metrics["samples_per_prompt"] == 3 and metrics["skipped_prompts"] == 0
    for key in ("pass@1", "pass@2", "cons@3", "greedy_accuracy", "format_rate", "response_length_mean",
                "reflection_rate", "pass@1_std"):
        assert key in metrics, key
    assert 0 < metrics["response_length_mean"] <= 6
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["metrics"] == metrics and saved["settings"]["k"] == 3
    assert "| pass@1 |" in (tmp_path / "ev" / "eval.md").read_text()
    rows = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all(len(r["texts"]) == 3 for r in rows)
    assert run_eval(load_config(None, overrides, schema=EvalConfig)) == metrics  # seeded: same samples


def test_missing_checkpoint_fails_before_work(tmp_path, monkeypatch, capsys):
    data = _heldout(tmp_path / "heldout.jsonl", n=1)
    import r1fast.eval as ev

    monkeypatch.setattr(ev, "load_jsonl", lambda *a, **k: pytest.fail("data was read before the checkpoint check"))
    with pytest.raises(FileNotFoundError, match="model: checkpoint directory"):
        run_eval(load_config(None, ["--model", str(tmp_path / "nope"), "--data", data], schema=EvalConfig))
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--data", data]) == 1  # the CLI: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("r1fast.eval: error: ") and "no config.json" in err and err.strip().count("\n") == 0
    assert main(["--model", str(tmp_path / "empty"), "--data", data, "--block_size", "24"]) == 2
    assert "block_size=24 must be a power of two" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model: a checkpoint directory is required"):
        load_config(None, ["--data", data], schema=EvalConfig)
    with pytest.raises(ConfigError, match="k: 0 is out of range"):
        load_config(None, ["--model", "m", "--data", data, "--k", "0"], schema=EvalConfig)


def test_an_out_that_cannot_be_a_directory_fails_before_work(tmp_path, monkeypatch, capsys):
    """eval.json and the rest are written after the evaluation: a file at --out was a FileExistsError traceback
    then, the whole evaluation lost."""
    data = _heldout(tmp_path / "heldout.jsonl", n=1)
    for out in (data, f"{data}/sub"):  # the file itself, or a path through it
        assert main(["--model", str(tmp_path / "nope"), "--data", data, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"r1fast.eval: error: out: {data!r} is a file;") and err.strip().count("\n") == 0


def test_missing_data_file_fails_before_model_load(tmp_path, tiny_checkpoint, monkeypatch):
    import r1fast.eval as ev

    monkeypatch.setattr(ev, "load_policy", lambda *a, **k: pytest.fail("model loaded before the data check"))
    with pytest.raises(FileNotFoundError, match="data: file"):
        run_eval(load_config(None, ["--model", tiny_checkpoint, "--data", str(tmp_path / "x.jsonl")],
                             schema=EvalConfig))


def test_bad_data_is_one_line_and_found_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import r1fast.eval as ev

    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    load_policy = ev.load_policy
    monkeypatch.setattr(ev, "load_policy", lambda *a, **k: pytest.fail("model loaded before the data check"))
    cases = {"empty.jsonl": ("\n", r"data: '.*empty\.jsonl' holds no records"),
             "bad.jsonl": ('{"prompt": "1+1", "answer": "2"}\n{oops\n', r".*bad\.jsonl:2: malformed JSON"),
             "noans.jsonl": ('{"prompt": "1+1"}\n', r".*noans\.jsonl:1: field 'answer' missing")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["--model", tiny_checkpoint, "--data", str(tmp_path / name)]) == 1, name
        err = capsys.readouterr().err
        assert re.match(f"r1fast.eval: error: {match}", err) and err.count("\n") == 1, err
    with pytest.raises(DataError):  # programmatic callers get the same type (a ValueError)
        run_eval(load_config(None, ["--model", tiny_checkpoint, "--data", str(tmp_path / "bad.jsonl")],
                             schema=EvalConfig))
    # no gold answer math-verify can parse: found after sampling, still one line
    monkeypatch.setattr(ev, "load_policy", load_policy)
    (tmp_path / "unparsable.jsonl").write_text('{"prompt": "1+1", "answer": "\\\\frac{"}\n')
    assert main(["--model", tiny_checkpoint, "--data", str(tmp_path / "unparsable.jsonl"), "--template", "compact",
                 "--k", "1", "--max_new_tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("r1fast.eval: error: data: none of the 1 prompts") and err.count("\n") == 1


def test_pass_k_above_k_is_rejected_and_the_default_fits_k():
    with pytest.raises(ConfigError, match=r"pass_k: 8 exceeds k=2"):
        load_config(None, ["--model", "m", "--data", "d", "--k", "2", "--pass_k", "8"], schema=EvalConfig)
    assert load_config(None, ["--model", "m", "--data", "d", "--k", "8", "--pass_k", "2,8"],
                       schema=EvalConfig).pass_ks() == (2, 8)
    assert EvalConfig(model="m", data="d", k=6).pass_ks() == (1, 2, 4)  # none: the powers of two that fit
    assert EvalConfig(model="m", data="d", k=64).pass_ks() == (1, 2, 4, 8, 16, 32, 64)


def test_too_long_prompts_are_dropped_counted_and_reported(tmp_path, monkeypatch, capsys):
    """One prompt longer than the model's 40 positions was a raw ValueError from the engine; now it is
    dropped, counted in eval.json and on stderr, and the rest are evaluated with their own indices."""
    from conftest import save_char_checkpoint

    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    model = save_char_checkpoint(tmp_path / "m", max_position_embeddings=40)
    data = _heldout(tmp_path / "heldout.jsonl")
    rows = (tmp_path / "heldout.jsonl").read_text().splitlines()
    rows[1] = json.dumps({"prompt": " + ".join(["1"] * 20), "answer": "20"})  # 79 chars: past 40 positions
    (tmp_path / "heldout.jsonl").write_text("\n".join(rows) + "\n")
    args = ["--model", model, "--data", data, "--template", "compact", "--k", "1", "--max_new_tokens", "6",
            "--bootstrap_resamples", "2", "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "r1fast.eval: dropped 1 of 3 prompts of" in err and "max_new_tokens=6 exceeds the 40 tokens" in err
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]
    assert saved["dropped_too_long"] == 1 and saved["num_prompts"] == 2
    assert "| dropped_too_long | 1 |" in (tmp_path / "ev" / "eval.md").read_text()
    kept = [json.loads(x)["index"] for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert kept == [0, 2]
    (tmp_path / "long.jsonl").write_text(rows[1] + "\n")  # nothing left to evaluate: one line naming the file
    assert main([*args[:2], "--data", str(tmp_path / "long.jsonl"), *args[4:]]) == 1
    err = capsys.readouterr().err
    assert re.match(r"r1fast.eval: error: data: all 1 prompts of '.*long\.jsonl' are too long", err), err
    assert err.count("\n") == 1


def test_chat_template_missing_is_one_config_error(tmp_path, tiny_checkpoint, capsys):
    data = _heldout(tmp_path / "heldout.jsonl", n=1)
    args = ["--model", tiny_checkpoint, "--data", data, "--template", "chat", "--k", "1", "--max_new_tokens", "2"]
    with pytest.raises(ConfigError, match="^template=chat but the tokenizer has no chat_template"):
        run_eval(load_config(None, args, schema=EvalConfig))  # was a bare ValueError from the first render
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1fast.eval: error: template=chat") and err.count("\n") == 1, err


@pytest.mark.parametrize("stage", ["eval", "rejection"])
def test_sampling_temperature_and_dtype_are_checked_when_the_config_is_read(stage):
    """A temperature in (0, 1e-5) passed the config and died after the model was loaded (the engine's traceback);
    --dtype was free text ('bogus' raised in stage_io)."""
    if stage == "eval":
        base = dict(model="m", data="d.jsonl")
        make = EvalConfig
    else:
        from r1fast.rejection import RejectionConfig as make

        base = dict(checkpoint="m", data="d.jsonl", out="o.jsonl")
    with pytest.raises(ConfigError, match=r"^temperature=1e-06 is below 1e-05.*use 0 for greedy"):
        make(**base, temperature=1e-6).validate()
    make(**base, temperature=0.0).validate()
    with pytest.raises(ConfigError, match=r"^dtype: 'bogus' is not allowed"):
        make(**base, dtype="bogus").validate()


def test_bootstrap_std_uses_ddof_one():
    # values [0, 1], two resamples: each resample mean is 0, 0.5 or 1, so the ddof-1 std of the two means is
    # |m1 - m2| / sqrt(2) in {0, 0.5/sqrt(2), 1/sqrt(2)} (ddof 0 would give |m1 - m2| / 2)
    allowed = (0.0, 0.5 / math.sqrt(2), 1 / math.sqrt(2))
    seen = set()
    for seed in range(30):
        got = bootstrap_std([0.0, 1.0], num_resamples=2, seed=seed)
        match = [a for a in allowed if math.isclose(got, a, rel_tol=1e-12, abs_tol=1e-15)]
        assert match, (seed, got)
        seen.add(match[0])
    assert len(seen - {0.0}) >= 1


def test_eval_says_when_the_template_is_not_the_one_the_checkpoint_learned(tmp_path, tiny_checkpoint, monkeypatch,
                                                                            capsys):
    """Training, SFT and rejection said it; r1fast.eval scored a 'compact'-trained policy on bare prompts
    without a word (a low score read as the model's, not the format's)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    (tmp_path / "ckpt" / "r1fast_prompt.json").write_text('{"prompt_template": "compact"}')
    data = _heldout(tmp_path / "heldout.jsonl", n=1)
    for template, said in (("auto", False), ("none", True)):
        run_eval(load_config(None, ["--model", tiny_checkpoint, "--data", data, "--template", template, "--k", "1",
                                    "--max_new_tokens", "2", "--out", str(tmp_path / template)], schema=EvalConfig))
        assert ("but the checkpoint was trained with 'compact'" in capsys.readouterr().err) == said
        settings = json.loads((tmp_path / template / "eval.json").read_text())["settings"]
        assert settings["template_used"] == ("compact" if template == "auto" else "none")
