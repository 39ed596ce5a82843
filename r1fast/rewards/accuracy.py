"""Accuracy rewards: math answers through math-verify, exact match for the generated tasks.

Math: the gold answer is parsed first; if math-verify finds nothing in it, the sample cannot be
graded, so the reward raises ``SkipSample`` (the registry marks the sample skipped and counts it)
instead of scoring a wrong 0. The model's answer is the text of its ``<answer>`` block; without a
well-formed block the reward is 0 (``require_answer_tag=False`` grades the whole completion instead).

Parsing runs in a small pool of worker *processes* started with ``subprocess`` (``python -c``), one
JSON line per request. Why not ``multiprocessing``: fork from a trainer with live torch/gloo threads
can deadlock the child, and spawn/forkserver re-import the ``__main__`` module (the training script).
Each request has a wall-clock timeout; a worker that overruns it (sympy can take minutes on
adversarial LaTeX) is killed and replaced, and the sample scores 0. Counters live in ``STATS``.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from ..data.tasks import TASKS, verify_answer
from .format import extract_answer

__all__ = [
    "STATS", "SkipSample", "MathVerifier", "math_accuracy_reward", "task_accuracy_reward", "accuracy_reward",
    "default_verifier", "math_accuracy_batch", "accuracy_batch",
]

STATS: Counter = Counter()  # "gold_unparsable", "verify_timeout", "worker_restarts"


class SkipSample(Exception):
    """Raised by a reward when the sample itself cannot be graded (e.g. an unparsable gold answer)."""


# ---------------------------------------------------------------------------------------------------
# Worker side: runs in its own process, reads {"gold", "pred"} lines, writes {"gold_ok", "correct"}
# ---------------------------------------------------------------------------------------------------

_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a word of 3+ letters that is no LaTeX command
_DELIMITED_RE = re.compile(r"\$|\\\(|\\\[|\\boxed")  # text that marks its own math: parsed as it is
_SCIENTIFIC_RE = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)[eE]([+-]?\d+)\s*")


def _expand_scientific(text: str) -> str:
    """"1e-05" -> "0.00001": math-verify reads E-notation as arithmetic with Euler's e (1e-05 -> e - 5,
    1e+16 -> 1 + 16). Exponents beyond 100 stay as written rather than become hundred-digit strings."""
    match = _SCIENTIFIC_RE.fullmatch(text)
    if match is None or abs(int(match.group(1))) > 100:
        return text
    return format(Decimal(text.strip()), "f")


def _parse(text: str) -> list:
    from math_verify import parse

    # Bare LaTeX (how MATH exports store gold answers, how a model writes inside <answer>) is read whole
    # only between math delimiters: parsed as it stands, "2\pi" gives the number 2 and "3\sqrt{2}" gives
    # 3, so a wrong "2" would match a gold "2\pi". Such text is parsed as "$text$" first. Prose is not
    # (its words would parse as products of letters); it and delimited text take math-verify's own search.
    text = _expand_scientific(text)
    parsed = []
    if text.strip() and not _DELIMITED_RE.search(text) and not _PROSE_RE.search(text):
        parsed = parse(f"${text.strip()}$")
    if not _is_expression(parsed):
        parsed = parse(text)
    return parsed if _is_expression(parsed) else []


def _is_expression(parsed: list) -> bool:
    # math_verify returns [expression, source string]; when nothing parsed into an expression (e.g. "???",
    # "x+") it returns only the string, which verify would then compare as text: that is no parse
    return bool(parsed) and not all(isinstance(p, str) for p in parsed)


def _grade(gold: str, pred: str) -> dict:
    from math_verify import verify

    gold_parsed = _parse(gold)
    if not gold_parsed:
        return {"gold_ok": False, "correct": False}
    pred_parsed = _parse(pred)
    return {"gold_ok": True, "correct": bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed))}


def _serve() -> None:
    """Worker loop. stdout carries only protocol lines; anything printed by libraries goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = _grade(request["gold"], request["pred"])
        except Exception as exc:  # a grading failure is a wrong answer, never a dead worker
            result = {"gold_ok": True, "correct": False, "error": repr(exc)}
        out.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from r1fast.rewards.accuracy import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C on the trainer's terminal is for the trainer
        )
        self.buffer = b""

    def request(self, gold: str, pred: str, timeout_s: float) -> dict | None:
        """The worker's answer, or None after killing it when it did not answer in time."""
        deadline = time.monotonic() + timeout_s
        try:
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            self.proc.stdin.flush()
            fd = self.proc.stdout.fileno()
            while b"\n" not in self.buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    self.kill()
                    return None
                chunk = os.read(fd, 65536)
                if not chunk:  # worker died
                    self.kill()
                    return None
                self.buffer += chunk
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathVerifier:
    """A pool of ``num_workers`` math-verify processes with a per-request timeout.

    ``check(golds, preds)`` returns, per pair, True/False for correct/wrong and None when the gold
    answer is unparsable. Workers start on first use and are reused; ``close()`` stops them.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._started = False
        self._threads = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="math-verify")

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                for _ in range(self.num_workers):
                    self._idle.put(_Worker())
                self._started = True

    def _check_one(self, gold: str, pred: str) -> bool | None:
        worker = self._idle.get()
        try:
            # The first request of a fresh worker also pays for its interpreter and imports.
            result = worker.request(gold, pred, self.timeout_s)
        finally:
            if not worker.alive():
                STATS["worker_restarts"] += 1
                worker = _Worker()
            self._idle.put(worker)
        if result is None:
            STATS["verify_timeout"] += 1
            return False
        if not result["gold_ok"]:
            STATS["gold_unparsable"] += 1
            return None
        return result["correct"]

    def check(self, golds: list[str], preds: list[str]) -> list[bool | None]:
        if len(golds) != len(preds):
            raise ValueError(f"preds: expected {len(golds)} items to match golds, got {len(preds)}")
        self._start()
        return list(self._threads.map(self._check_one, map(str, golds), map(str, preds)))

    def close(self) -> None:
        with self._lock:
            while not self._idle.empty():
                self._idle.get().kill()
            self._started = False


_DEFAULT: MathVerifier | None = None


def default_verifier() -> MathVerifier:
    """The process-wide verifier used by the reward functions (2 workers, 10 s timeout)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MathVerifier()
        atexit.register(_DEFAULT.close)
    return _DEFAULT


def _math_pred(completion: str, require_answer_tag: bool) -> str | None:
    answer = extract_answer(completion)
    if answer is None and not require_answer_tag:
        answer = completion
    return answer


def math_accuracy_batch(prompts, completions, metas, *, require_answer_tag: bool = True) -> list[float | None]:
    """Batched math accuracy: 1.0 / 0.0 per sample, None for a skipped sample (unparsable gold)."""
    scores: list[float | None] = [0.0] * len(completions)
    todo = [(i, _math_pred(c, require_answer_tag)) for i, c in enumerate(completions)]
    todo = [(i, pred) for i, pred in todo if pred]
    # The gold is parsed even when the prediction is missing, so an ungradable sample is always
    # reported as skipped rather than sometimes as a plain 0.
    have_pred = {i for i, _ in todo}
    todo += [(i, "") for i in range(len(completions)) if i not in have_pred]
    results = default_verifier().check([metas[i]["answer"] for i, _ in todo], [p for _, p in todo])
    for (i, pred), ok in zip(todo, results, strict=True):
        scores[i] = None if ok is None else float(bool(ok) and bool(pred))
    return scores


def math_accuracy_reward(prompt: str, completion: str, meta: dict, *, require_answer_tag: bool = True) -> float:
    """1.0 when math-verify finds the answer equal to ``meta['answer']``; SkipSample if the gold is unparsable."""
    score = math_accuracy_batch([prompt], [completion], [meta], require_answer_tag=require_answer_tag)[0]
    if score is None:
        raise SkipSample(f"unparsable gold answer {meta['answer']!r}")
    return score


math_accuracy_reward.batch = math_accuracy_batch


def task_accuracy_reward(prompt: str, completion: str, meta: dict) -> float:
    """Exact-match accuracy for the generated tasks: the ``<answer>`` text checked by the task's verifier."""
    answer = extract_answer(completion)
    return 0.0 if answer is None else float(verify_answer(meta, answer))


def accuracy_batch(prompts, completions, metas, *, require_answer_tag: bool = True) -> list[float | None]:
    """Generated tasks by exact match, everything else through math-verify (batched)."""
    scores: list[float | None] = [0.0] * len(completions)
    math_idx = [i for i, m in enumerate(metas) if m.get("task") not in TASKS]
    for i, m in enumerate(metas):
        if m.get("task") in TASKS:
            scores[i] = task_accuracy_reward(prompts[i], completions[i], m)
    if math_idx:
        sub = math_accuracy_batch([prompts[i] for i in math_idx], [completions[i] for i in math_idx],
                                  [metas[i] for i in math_idx], require_answer_tag=require_answer_tag)
        for i, s in zip(math_idx, sub, strict=True):
            scores[i] = s
    return scores


def accuracy_reward(prompt: str, completion: str, meta: dict, *, require_answer_tag: bool = True) -> float:
    """Exact match when ``meta['task']`` is a generated task, math-verify otherwise."""
    if meta.get("task") in TASKS:
        return task_accuracy_reward(prompt, completion, meta)
    return math_accuracy_reward(prompt, completion, meta, require_answer_tag=require_answer_tag)


accuracy_reward.batch = accuracy_batch
