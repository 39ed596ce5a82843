"""The math-verify worker pool: a worker's start-up is never charged to a gold's parse budget."""

import sys

import pytest

from r1fast.rewards.math_verify_pool import STATS, MathVerifier, _Worker

# A worker whose start-up takes START_S more than its interpreter and imports (0.3 s idle here), and whose every
# gold parse takes GOLD_S: GOLD_S fits TIMEOUT_S (0.5 s of slack for a loaded 2-core box), the start-up plus
# GOLD_S does not. With one deadline for start-up + gold, the gold timed out and was blacklisted (or, when the
# interpreter took over 0.6 s, the start-up itself timed out and the sample scored 0).
START_S, GOLD_S, TIMEOUT_S = 0.3, 0.4, 0.9
_SLOW_WORKER = (
    f"import time; time.sleep({START_S}); import r1fast.rewards.math_verify_pool as pool; "
    f"parse_gold = pool._parse_gold; pool._parse_gold = lambda gold: (time.sleep({GOLD_S}), parse_gold(gold))[1]; "
    "pool._serve()"
)


def _counts():
    return {key: STATS[key] for key in ("gold_timeout", "gold_unparsable", "verify_timeout", "worker_restarts")}


def test_a_slow_worker_start_does_not_blacklist_a_valid_gold(monkeypatch):
    """A soak with timeout_s=0.3 lost 22 of 50 plain-integer golds this way, for the whole run."""
    monkeypatch.setattr(_Worker, "command", [sys.executable, "-c", _SLOW_WORKER])
    verifier = MathVerifier(num_workers=1, timeout_s=TIMEOUT_S)
    before = _counts()
    try:
        assert verifier.check(["17"], ["\\boxed{17}"]) == [True]
        # An answer that overruns (math-verify's own limit is 5 s) kills the worker; its replacement starts
        # slowly too, and a new gold on it still gets its whole budget.
        assert verifier.check(["17"], ["(x+1)^{100000}"]) == [False]
        assert verifier.check(["18"], ["18"]) == [True]
    finally:
        verifier.close()
    after = _counts()
    assert after["gold_timeout"] == before["gold_timeout"] and after["gold_unparsable"] == before["gold_unparsable"]
    assert after["verify_timeout"] == before["verify_timeout"] + 1
    assert after["worker_restarts"] == before["worker_restarts"] + 1


def test_a_worker_that_never_starts_times_out_on_its_own_budget(monkeypatch):
    """The start-up budget still bounds a stuck start: the sample scores 0 and its gold is not blamed."""
    monkeypatch.setattr(_Worker, "command", [sys.executable, "-c", "import time; time.sleep(60)"])
    verifier = MathVerifier(num_workers=1, timeout_s=30.0, startup_timeout_s=0.3)
    before = _counts()
    try:
        assert verifier.check(["5"], ["5"]) == [False]
        assert verifier._golds == {}  # "5" is not remembered as bad: the next sample tries it again
    finally:
        verifier.close()
    after = _counts()
    assert after["verify_timeout"] == before["verify_timeout"] + 1 and after["gold_timeout"] == before["gold_timeout"]
    with pytest.raises(ValueError, match="startup_timeout_s"):
        MathVerifier(startup_timeout_s=0)


# A worker that starts, says it is ready, then dies on its first request (a segfault, the OOM killer).
_DYING_WORKER = "import sys; print('{\"ready\": true}', flush=True); sys.stdin.readline(); sys.exit(1)"


def test_a_worker_that_dies_does_not_blacklist_a_valid_gold(monkeypatch):
    """A death is not an overrun: read as a gold parse timeout, it marked the gold unparsable for the whole run
    (every later sample with gold "3" skipped), and an idle worker killed between batches did the same."""
    monkeypatch.setattr(_Worker, "command", [sys.executable, "-c", _DYING_WORKER])
    verifier = MathVerifier(num_workers=1, timeout_s=30.0)
    before = _counts()
    try:
        assert verifier.check(["3"], ["3"]) == [False]  # died mid-request: scored 0, the gold not blamed
        assert "3" not in verifier._golds
        monkeypatch.undo()
        for _ in range(2):  # the idle worker dies between batches (the dying replacement, then a real one)
            (worker,) = verifier._idle.queue
            worker.proc.kill()
            worker.proc.wait()
            assert verifier.check(["3"], ["3"]) == [True]  # it was replaced before use, not read as a timeout
    finally:
        verifier.close()
    after = _counts()
    assert after["gold_timeout"] == before["gold_timeout"] and after["gold_unparsable"] == before["gold_unparsable"]


def test_a_request_whose_worker_died_is_repeated_once_on_a_fresh_worker(monkeypatch, tmp_path):
    """A worker killed mid-request (the OOM killer picks the largest process, not the culprit) scored a correct
    answer 0; the request is now repeated once, and only an answer whose worker dies twice scores 0."""
    marker = str(tmp_path / "died-once")
    dies_once = (f"import os, sys\nif not os.path.exists({marker!r}):\n    open({marker!r}, 'w').close()\n"
                 f"    {_DYING_WORKER.replace('; ', chr(10) + '    ')}\n{_Worker.command[2]}")
    monkeypatch.setattr(_Worker, "command", [sys.executable, "-c", dies_once])
    verifier = MathVerifier(num_workers=1, timeout_s=30.0)
    before = STATS["worker_died_retries"]
    try:
        assert verifier.check(["3", "4"], ["3", "5"]) == [True, False]
    finally:
        verifier.close()
    assert STATS["worker_died_retries"] == before + 1


def test_answers_the_verifier_failed_on_are_counted_in_the_reward_batch(monkeypatch):
    """An answer whose worker died twice (or whose check overran) scored 0 like a wrong one, and nothing in the
    logged metrics told a slow or failing verifier from a model that answers wrong."""
    from r1fast.rewards import accuracy, combine

    monkeypatch.setattr(_Worker, "command", [sys.executable, "-c", _DYING_WORKER])
    verifier = MathVerifier(num_workers=1, timeout_s=30.0)
    monkeypatch.setattr(accuracy, "default_verifier", lambda: verifier)
    try:
        graded = combine({"math_accuracy": 1.0}).score(["p"] * 2, ["<answer>3</answer>"] * 2, [{"answer": "3"}] * 2)
    finally:
        verifier.close()
    assert graded.total == [0.0, 0.0] and graded.verify_failures == 2 and not any(graded.skipped)


def test_a_worker_that_cannot_start_is_an_error_not_a_wrong_answer(monkeypatch):
    """A worker that exits before "ready" (math_verify or r1fast not importable by the child interpreter) made every
    math answer score 0 with no error, and the load-time gold check passed: the run trained on format alone."""
    monkeypatch.setattr(_Worker, "command", [sys.executable, "-c", "import a_module_that_does_not_exist"])
    verifier = MathVerifier(num_workers=1, timeout_s=30.0)
    try:
        with pytest.raises(RuntimeError, match="math-verify worker exited .* start-up"):
            verifier.check(["5"], ["5"])
        assert verifier._golds == {}  # nothing is remembered about the gold
    finally:
        verifier.close()
    # at load, on every rank (rank 0 alone raising left the others waiting in its broadcast): a DataError
    from r1fast.config import Config
    from r1fast.config_io import DataError
    from r1fast.rewards import math_verify_pool
    from r1fast.rewards_setup import build_scorer
    from r1fast.train_checks import check_golds

    monkeypatch.setattr(math_verify_pool, "_DEFAULT", MathVerifier(num_workers=1))
    try:
        with pytest.raises(DataError, match="math-verify worker exited"):
            check_golds(build_scorer(Config()), [{"prompt": "1+1", "answer": "2"}], "f.jsonl")
    finally:
        math_verify_pool._DEFAULT.close()
