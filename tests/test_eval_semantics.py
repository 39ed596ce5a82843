"""Evaluation semantics the black-box probes got wrong: cons@k votes grouped by the grader's equivalence,
ungradable prompts skipped the same way in training and in r1fast.eval, exact pass@1 sums, and the
pipeline report's notes and paired bootstrap."""

import functools
import operator
import random
from fractions import Fraction
from types import SimpleNamespace

import pytest

import r1fast.eval as eval_mod
import r1fast.rewards.accuracy as accuracy
from r1fast.data.tasks import canonical_answer, verify_answer
from r1fast.eval_metrics import majority_vote, summarize
from r1fast.evaluation import evaluate
from r1fast.pipeline_report import build_report
from r1fast.rewards_setup import Scorer
from r1fast.tokenizer import CharTokenizer


def _graded(sample, answers):
    return [verify_answer(sample, a) for a in answers]


# ---------------------------------------------------------------------------------------------------
# cons@k: one vote per grader-equivalence class
# ---------------------------------------------------------------------------------------------------

SORT = {"prompt": "sort 12 3 1", "answer": "1 3 12", "task": "sorting", "id": "s"}
ADD = {"prompt": "3+4", "answer": "7", "task": "addition", "id": "a"}


@pytest.mark.parametrize("answers, solved", [
    (["13 12", "1 3 12", "1 3 12"], True),    # 2 of 3 right: the wrong "13 12" came first but has one vote
    (["1 3 12", "13 12", "13 12"], False),   # 2 of 3 wrong: "1 3 12" must not absorb the "13 12" votes
])
def test_cons_never_merges_answers_the_grader_tells_apart(answers, solved):
    correct = _graded(SORT, answers)
    keys = [canonical_answer(SORT, a) for a in answers]
    assert majority_vote(answers, correct)[1] is solved
    assert majority_vote(answers, correct, keys)[1] is solved


def test_cons_groups_answers_the_grader_accepts():
    answers = ["8", "8", "7", "07", "+7"]  # 3 of 5 right, written three ways
    assert majority_vote(answers, _graded(ADD, answers)) == ("7", True)
    # wrong answers the verifier reads as one integer are one vote too: "8", "08", "+8" (3) beat "7", "07" (2);
    # only the task's canonical form sees it (as text they are three single votes)
    answers = ["7", "07", "8", "08", "+8"]
    correct = _graded(ADD, answers)
    keys = eval_mod._vote_keys(ADD, answers, correct)
    assert keys[2:] == ["8", "8", "8"]
    assert majority_vote(answers, correct, keys) == ("8", False)
    assert majority_vote(answers, correct) == ("7", True)
    # summarize takes the keys from the record
    rec = {"correct": correct, "answers": answers, "formatted": [True] * 5, "lengths": [1] * 5, "texts": [""] * 5}
    assert summarize([rec], num_resamples=2)["cons@5"] == 1.0
    assert summarize([{**rec, "vote_keys": keys}], num_resamples=2)["cons@5"] == 0.0


def test_cons_tie_goes_to_the_group_seen_first():
    # 2 correct ("7", "07") vs 2 wrong ("8", "+8"): the group of the first voting sample wins
    assert majority_vote([None, "8", "7", "07", "+8"], [False, False, True, True, False],
                         ["x", "8", "7", "7", "8"]) == ("8", False)
    assert majority_vote(["07", "8", "+8", "7"], [True, False, False, True]) == ("07", True)
    with pytest.raises(ValueError, match="keys"):
        majority_vote(["7"], [True], [])


def test_canonical_answer_per_task():
    assert canonical_answer(SORT, " 1, 3,12 ") == "1 3 12" and canonical_answer(SORT, "13 12") == "13 12"
    assert canonical_answer(ADD, "+0,007") == "7" and canonical_answer(ADD, "seven") is None
    cd = {"prompt": "make 20 with 2 3 4", "answer": "(2+3)*4", "task": "countdown", "numbers": [2, 3, 4], "target": 20}
    assert canonical_answer(cd, "((2+3))*4") == canonical_answer(cd, "(2 + 3) * 4") == "(2 + 3) * 4"
    assert canonical_answer(cd, "2+3*4 = 014") == "2 + 3 * 4=14" and canonical_answer(cd, "2**3") is None
    with pytest.raises(ValueError, match="sample"):
        canonical_answer({"task": "math"}, "1")


def test_math_answers_are_grouped_by_math_verify():
    gold = {"prompt": "p", "answer": "1/3"}
    answers = ["1/2", "0.5", "\\frac{1}{2}", "1/3", "1/3"]  # 2 right; 3 wrong ones that are one number
    correct = [False, False, False, True, True]
    keys = eval_mod._vote_keys(gold, answers, correct)
    assert keys == ["1/2", "1/2", "1/2", None, None]
    assert majority_vote(answers, correct, keys) == ("1/2", False)


class _CountingVerifier:
    def __init__(self):
        self.calls = 0

    def check(self, golds, preds):
        self.calls += len(golds)
        return [g.strip("0") == p.strip("0") for g, p in zip(golds, preds, strict=True)]


def test_math_grouping_cost_is_bounded_and_skipped_when_it_cannot_matter(monkeypatch):
    fake = _CountingVerifier()
    monkeypatch.setattr(accuracy, "default_verifier", lambda: fake)
    gold = {"prompt": "p", "answer": "9"}
    # 1 wrong answer against 2 right ones: no grouping of wrong answers can win, so nothing is compared
    assert eval_mod._vote_keys(gold, ["1", "9", "9"], [False, True, True]) == ["1", None, None]
    assert fake.calls == 0
    # distinct wrong answers cost 0+1+2+3+4 comparisons for "1".."5", 5 more for "50" (the fake finds it
    # equal to "5"); "6" would need 5 more: past the budget (15) it keeps its own text as key
    answers = ["1", "2", "3", "4", "5", "50", "6"]
    monkeypatch.setattr(eval_mod, "MAX_VOTE_COMPARISONS", 15)
    assert eval_mod._vote_keys(gold, answers, [False] * 7) == ["1", "2", "3", "4", "5", "5", "6"]
    assert fake.calls == 15
    monkeypatch.setattr(eval_mod, "MAX_VOTE_COMPARISONS", 10)  # spent before "50": it is not compared at all
    assert eval_mod._vote_keys(gold, answers, [False] * 7) == answers and fake.calls == 25


# ---------------------------------------------------------------------------------------------------
# Ungradable prompts: skipped, never counted wrong, in training's evaluation as in r1fast.eval
# ---------------------------------------------------------------------------------------------------

class _FakeEngine:
    """Every prompt's completions are ``text``; generate() answers like Engine.generate."""

    args = SimpleNamespace(eos_token_id=None, generation_config=None, vocab_size=64)

    def __init__(self, tokenizer, text):
        self.ids = tokenizer.encode(text)

    def generate(self, prompts, *, n=1, **kwargs):
        return [[SimpleNamespace(token_ids=list(self.ids)) for _ in range(n)] for _ in prompts]


def test_training_evaluation_skips_ungradable_prompts_like_r1fast_eval():
    tok = CharTokenizer()
    samples = [{"prompt": "what is 1+2?", "answer": "3"}, {"prompt": "name it", "answer": "ornithopter"}]
    text = "<think>t</think><answer>3</answer>"
    scores = accuracy.accuracy_batch([s["prompt"] for s in samples], [text, text], samples)
    assert scores == [1.0, None]  # r1fast.eval grades prompt 0 and skips prompt 1
    out = evaluate(_FakeEngine(tok, text), tok, samples, [tok.encode(s["prompt"]) for s in samples], Scorer(None).check_batch,
                   max_new_tokens=8, k=3)
    assert out["num_prompts"] == 1 and out["skipped_prompts"] == 1
    assert out["greedy_accuracy"] == out["pass@1_k3"] == out["greedy_format_rate"] == 1.0


def test_scorer_check_raises_errors_other_than_skip(monkeypatch):
    sample = {"prompt": "p", "answer": "ornithopter"}
    assert Scorer(None).check(sample, "<think>t</think><answer>3</answer>") == (None, True)

    def broken(*args, **kwargs):
        raise RuntimeError("grader bug")

    monkeypatch.setattr("r1fast.rewards_setup.accuracy_reward", broken)
    with pytest.raises(RuntimeError, match="grader bug"):
        Scorer(None).check({"prompt": "p", "answer": "3"}, "<answer>3</answer>")


# ---------------------------------------------------------------------------------------------------
# Exact pass@1 and the pipeline report
# ---------------------------------------------------------------------------------------------------

def _records(counts, n):
    return [{"correct": [i < c for i in range(n)], "answers": ["1"] * n, "formatted": [i < c for i in range(n)],
             "lengths": [1] * n, "texts": [""] * n} for c in counts]


def test_pass1_is_exact_and_independent_of_prompt_order():
    rng = random.Random(0)
    n, counts = 3, [rng.randint(0, 3) for _ in range(200)]
    shuffled = counts[:]
    rng.shuffle(shuffled)
    a, b = summarize(_records(counts, n), num_resamples=2), summarize(_records(shuffled, n), num_resamples=2)
    exact = float(Fraction(sum(counts), n * len(counts)))
    assert a["pass@1"] == b["pass@1"] == exact and a["format_rate"] == b["format_rate"] == exact
    # a plain left-to-right float sum of c/3 in these two orders differs (what made "+0.0 points" a verdict);
    # reduce, not sum(): Python 3.12's sum() of floats is compensated (Neumaier) and gives both orders 95.333...
    def plain_sum(values):
        return functools.reduce(operator.add, values, 0.0)

    assert plain_sum(c / n for c in counts) != plain_sum(c / n for c in shuffled)


def _stage(name, metrics):
    return {"stage": name, "kind": "rl", "family": "s", "optimizer_steps": 1, "train_s": 1.0, "wall_s": 1.0,
            "summary": {"steps": 1}, "eval": {**metrics, "greedy_accuracy": 0.5, "greedy_accuracy_std": 0.01}}


HELDOUT = {"num_prompts": 200, "path": "h", "sha256": "0" * 64}


def test_report_equal_scores_tie_and_gap_std_is_paired():
    rng = random.Random(1)
    counts = [rng.randint(0, 3) for _ in range(200)]
    shuffled = counts[:]
    rng.shuffle(shuffled)
    d, r = summarize(_records(counts, 3), num_resamples=50), summarize(_records(shuffled, 3), num_resamples=50)
    records, arms = [_stage("d", d), _stage("r", r)], {"distilled": ["d"], "rl_only": ["r"]}
    unpaired = build_report(records, comparison=arms, heldout=HELDOUT, eval_settings={"k": 3}, ran=[])["comparison"]
    assert unpaired["pass@1_gap"] == 0.0 and not unpaired["distillation_beat_rl"]
    assert unpaired["sentence"].startswith("Distillation tied with RL alone")
    assert "independent" in unpaired["pass@1_gap_std_method"] and "independent" in unpaired["sentence"]
    # per-prompt results: the arms differ by one correct sample on every 10th prompt, so the paired std is
    # far below the independent-arms one (which is about sqrt(2) x each arm's std)
    a = {i: c / 3 for i, c in enumerate(counts)}
    b = {i: (c + (i % 10 == 0 and c < 3)) / 3 for i, c in enumerate(counts)}
    paired = build_report(records, comparison=arms, heldout=HELDOUT, eval_settings={"k": 3, "bootstrap_resamples": 200},
                          ran=[], per_prompt={"d": a, "r": b})["comparison"]
    assert paired["pass@1_gap_std_method"] == "paired bootstrap over 200 shared prompts"
    assert 0 < paired["pass@1_gap_std"] < unpaired["pass@1_gap_std"] / 5


def test_report_notes_prompts_a_stage_did_not_score():
    base = {"pass@1": 0.5, "pass@1_std": 0.01, "samples_per_prompt": 4, "format_rate": 1.0}
    records = [_stage("full", {**base, "num_prompts": 200}),
               _stage("skips", {**base, "num_prompts": 150, "skipped_prompts": 50}),
               _stage("both", {**base, "num_prompts": 185, "dropped_too_long": 10, "skipped_prompts": 5})]
    md = build_report(records, comparison={}, heldout=HELDOUT, eval_settings={"k": 4}, ran=[])["markdown"]
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "scored" not in rows["full"]
    assert "scored 150 of 200 prompts (50 skipped: gold answer ungradable)" in rows["skips"]
    assert "scored 185 of 200 prompts (10 too long for the model, 5 skipped: gold answer ungradable)" in rows["both"]
    assert "different subsets" in md


def test_report_gap_over_one_shared_prompt_has_no_known_spread():
    # one paired difference has nothing to resample: a std of 0 would call any gap "beyond 2 sigma"
    d = summarize(_records([3, 0], 3), num_resamples=50)
    r = summarize(_records([0, 0], 3), num_resamples=50)
    records, arms = [_stage("d", d), _stage("r", r)], {"distilled": ["d"], "rl_only": ["r"]}
    out = build_report(records, comparison=arms, heldout=HELDOUT, eval_settings={"k": 3}, ran=[],
                       per_prompt={"d": {0: 1.0, 1: 0.0}, "r": {0: 0.0, 5: 0.0}})["comparison"]
    assert out["pass@1_gap"] > 0 and out["pass@1_gap_std"] is None and not out["significant_2sigma"]
    assert "one shared prompt" in out["pass@1_gap_std_method"]
    assert "not known to be beyond 2 sigma" in out["sentence"] and "gap - (" in out["sentence"]
