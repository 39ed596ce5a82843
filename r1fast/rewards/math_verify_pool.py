"""The math-verify worker pool behind the math accuracy reward.

Parsing runs in a small pool of worker *processes* started with ``subprocess`` (``python -c``), one
JSON line per request. Why not ``multiprocessing``: fork from a trainer with live torch/gloo threads
can deadlock the child, and spawn/forkserver re-import the ``__main__`` module (the training script).
Each request has a wall-clock timeout; a worker that overruns it (sympy can take minutes on adversarial LaTeX)
is killed and replaced, and the sample scores 0. One that dies mid-request (a crash, the OOM killer) is no
overrun and never blames the gold: the request is repeated once on a fresh worker, and the sample scores 0
only when that one dies too; one found dead while idle is replaced before use. A gold whose own parse (with a
check against a trivial answer) overruns it is unparsable instead: the sample is skipped, like every later one
with that gold, which is remembered so no sample pays the timeout for it again. A worker's start-up
(interpreter, imports, a warm-up parse) has its own budget, ``startup_timeout_s``: the request's timeout
starts when the worker says it is ready, so a slow start never blacklists a gold.
Counters live in ``STATS``.
"""

from __future__ import annotations

import atexit
import functools
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

__all__ = ["STATS", "MathVerifier", "default_verifier"]

# "gold_unparsable" (skipped samples), "gold_timeout" (golds whose parse overran), "verify_timeout"
# (answers that overran, and workers that did not start within startup_timeout_s), "worker_restarts",
# "worker_died_retries" (requests repeated on a fresh worker after theirs died), "verify_died" (answers
# scored 0 because the retry's worker died too)
STATS: Counter = Counter()


# ---------------------------------------------------------------------------------------------------
# Worker side: runs in its own process. Writes {"ready"} once imported, then per {"gold", "pred"} line
# {"gold_ok"} as soon as the gold is parsed and, when it parsed, {"correct"}: the parent can tell a
# gold that hangs from an answer that hangs.
# ---------------------------------------------------------------------------------------------------

_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a word of 3+ letters that is no LaTeX command
# Text that marks its own math is parsed as it is. An escaped "\$" is a currency sign (MATH writes
# "\$18.90"), not a delimiter: such text is still wrapped in "$...$".
_DELIMITED_RE = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed")
# "\d+(?:\.\d*)?", not "\d+\.?\d*": that split a run of digits two ways at every position (a 20k-digit answer: 4.7 s)
_SCIENTIFIC_RE = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)\s*")


# A digit-group separator: a LaTeX space (\, \; \: \! "\ " ~), "{,}" or whitespace between a digit and a group
# of exactly three digits ("1\,000", "12 345", "0.123\,456"). math-verify reads "1\,000" as the product
# 1 * 000 = 0 and "12\,345" as 12 + 345: gold 1\,000 accepted "0" and rejected "1000".
_DIGIT_GROUP_RE = re.compile(r"(?<=\d)(?:\\[,;:! ]|~|\{,\}|\s)(?=\d{3}(?!\d))")


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
    text = _DIGIT_GROUP_RE.sub("", _expand_scientific(text))
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


def _comparable(gold_parsed: list) -> bool:
    """Whether math-verify can compare the gold with a trivial answer ("0") within its own timeout.

    Some golds parse at once but make every comparison hang: sympy expands "(x+1)^{100000}" against
    any answer but itself, so every sample would pay the full timeout and score 0. Such a gold can
    grade no sample: it is reported unparsable (the sample is skipped) rather than blamed on the answer.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        verify(gold_parsed, parse("$0$"), raise_on_error=True)
    except TimeoutException:
        return False
    except Exception:  # an error against "0" (e.g. a set against a number) says nothing of other answers
        pass
    return True


@functools.lru_cache(maxsize=1024)
def _parse_gold(gold: str) -> tuple:
    """The gold's parse, () when it cannot grade anything; cached: a GRPO group sends the same gold with
    every one of its samples."""
    parsed = _parse(gold)
    return tuple(parsed) if parsed and _comparable(parsed) else ()


def _grade_pred(gold_parsed: tuple, pred: str) -> bool:
    from math_verify import verify

    pred_parsed = _parse(pred)
    return bool(pred_parsed) and bool(verify(list(gold_parsed), pred_parsed))


def _serve() -> None:
    """Worker loop. stdout carries only protocol lines; anything printed by libraries goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    # Imports and one warm-up parse before "ready", so they are not charged to a gold: a fresh worker's
    # first parse took 43 ms against 1 ms warm (lazy LaTeX-grammar loading), 14% of a 0.3 s timeout.
    _grade_pred(tuple(_parse("$1$")), "1")
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            gold_parsed = _parse_gold(request["gold"])
        except Exception:  # a gold that makes the parser fail cannot be graded either
            gold_parsed = ()
        out.write(json.dumps({"gold_ok": bool(gold_parsed)}) + "\n")
        if not gold_parsed:
            continue
        try:
            correct = _grade_pred(gold_parsed, request["pred"])
        except Exception:  # a grading failure is a wrong answer, never a dead worker
            correct = False
        out.write(json.dumps({"correct": correct}) + "\n")


# ---------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------

class _Worker:
    command = [sys.executable, "-c", "from r1fast.rewards.math_verify_pool import _serve; _serve()"]
    """How a worker process is started (a class attribute, so a test can make the start-up slow)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C on the trainer's terminal is for the trainer
        )
        self.buffer = b""
        self.ready = False  # set once the worker has said it finished importing
        self.died = False  # set when the worker exited on its own (EOF), rather than being killed for overrunning

    def _read_line(self, deadline: float) -> dict | None:
        """The next protocol line, or None after killing the worker when it overran ``deadline`` or died."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self.kill()
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # worker died
                self.kill()
                self.died = True
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def request(self, gold: str, pred: str, timeout_s: float, on_gold=None, startup_timeout_s: float = 120.0) -> dict:
        """``{"gold_ok"}`` from the worker, with ``"correct"`` when the gold parsed; ``on_gold(gold_ok)`` is
        called as soon as the gold is parsed. When the worker does not answer in time it is killed and the
        result is ``{"timeout": stage}``: "start" (sending, interpreter, imports: ``startup_timeout_s``),
        "gold" or "pred" (the answer: ``timeout_s``, counted from the worker's "ready"). A worker that exits before
        it is ready raises RuntimeError (a broken environment, not a wrong answer)."""
        stage = "start"
        try:
            self.proc.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
            self.proc.stdin.flush()
            if not self.ready:
                if self._read_line(time.monotonic() + startup_timeout_s) is None:
                    if self.died:  # not slow but broken: every math answer would score 0 without an error
                        raise RuntimeError(f"math-verify worker exited (code {self.proc.returncode}) during start-up: "
                                           f"can {self.command[0]} import math_verify and r1fast?")
                    return {"timeout": stage}
                self.ready = True
            # The worker may have begun parsing a moment before "ready" reached us: the gold gets at least
            # its timeout, never less (charging it the start-up blacklisted 22 of 50 valid golds in a soak).
            deadline = time.monotonic() + timeout_s
            stage = "gold"
            gold_line = self._read_line(deadline)
            if gold_line is None:  # a death (a crash, the OOM killer) is no overrun: the gold is not blamed
                return {"died": stage} if self.died else {"timeout": stage}
            if on_gold is not None:
                on_gold(gold_line["gold_ok"])
            if not gold_line["gold_ok"]:
                return {"gold_ok": False}
            stage = "pred"
            result = self._read_line(deadline)
        except (BrokenPipeError, OSError):
            self.kill()
            return {"timeout": stage}
        return {"timeout": stage} if result is None else {"gold_ok": True, "correct": bool(result["correct"])}

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

    ``timeout_s`` bounds one request's gold parse and answer check; ``startup_timeout_s`` bounds a fresh
    worker's start-up on its own (0.3 s on an idle machine, seconds on a loaded many-rank node; 120 s only
    catches a worker that never starts, and a request it fails scores 0 without blaming the gold).

    ``check(golds, preds)`` returns, per pair, True/False for correct/wrong and None when the gold
    answer is unparsable (math-verify finds nothing in it, or parsing it overruns the timeout).
    Workers start on first use and are reused; ``close()`` stops them.

    Each gold's fate is remembered (one bool per distinct gold, so bounded by the data set): a bad gold
    is never sent again, and while a gold is parsed for the first time, the other samples with that
    gold wait for that parse rather than each paying for it (or for its timeout) in parallel.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, *, startup_timeout_s: float = 120.0) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: expected an int >= 1, got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s: expected > 0, got {startup_timeout_s!r}")
        self.num_workers, self.timeout_s, self.startup_timeout_s = num_workers, timeout_s, startup_timeout_s
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._started = False
        self._golds: dict[str, bool | threading.Event] = {}  # parsed ok / bad / first parse in flight
        self._golds_lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="math-verify")

    def _start(self) -> None:
        with self._lock:
            if not self._started:
                for _ in range(self.num_workers):
                    self._idle.put(_Worker())
                self._started = True

    def _gold_known(self, gold: str) -> bool | None:
        """True / False once ``gold`` is known to parse / not to; None: the caller parses it first."""
        while True:
            with self._golds_lock:
                state = self._golds.get(gold)
                if state is None:
                    self._golds[gold] = threading.Event()
                    return None
            if isinstance(state, bool):
                return state
            state.wait()  # another sample is parsing this gold right now

    def _settle_gold(self, gold: str, ok: bool | None) -> None:
        """Record the first parse of ``gold`` (None: it never got to run; the next sample tries again)."""
        with self._golds_lock:
            state = self._golds.get(gold)
            if not isinstance(state, threading.Event):
                return
            if ok is None:
                del self._golds[gold]
            else:
                self._golds[gold] = ok
        state.set()

    def _request(self, gold: str, pred: str) -> dict:
        """One request on an idle worker (replaced when found dead or left dead): the worker's result, or
        {"known_bad_gold": True} for a gold already found unparsable."""
        first = self._gold_known(gold)
        if first is False:
            return {"known_bad_gold": True}
        settle = functools.partial(self._settle_gold, gold) if first is None else None
        worker = self._idle.get()
        if not worker.alive():  # it died while idle: its request would read as an overrun of this gold
            STATS["worker_restarts"] += 1
            worker.kill()
            worker = _Worker()
        result = {"timeout": "start"}
        try:
            # A fresh worker's start-up has its own budget; only an overrun of the gold's own parse is a bad gold.
            result = worker.request(gold, pred, self.timeout_s, on_gold=settle,
                                    startup_timeout_s=self.startup_timeout_s)
        finally:
            if settle is not None:  # a no-op when on_gold already settled it
                settle(False if result.get("timeout") == "gold" else None)
            if not worker.alive():
                STATS["worker_restarts"] += 1
                worker = _Worker()
            self._idle.put(worker)
        return result

    def _check_one(self, gold: str, pred: str) -> bool | None:
        result = self._request(gold, pred)
        if "died" in result:
            # A death is rarely the answer's doing (the OOM killer picks the largest process, not the culprit):
            # one retry on a fresh worker; an answer that kills its worker twice scores 0
            STATS["worker_died_retries"] += 1
            result = self._request(gold, pred)
        if result.get("known_bad_gold"):
            STATS["gold_unparsable"] += 1
            return None
        if result.get("timeout") == "gold":
            STATS["gold_timeout"] += 1
            STATS["gold_unparsable"] += 1
            return None
        if "died" in result:  # twice
            STATS["verify_died"] += 1
            return False
        if "timeout" in result:
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
