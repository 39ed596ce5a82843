"""Offline reasoning tasks with exact verifiers: addition, chain sums, countdown, sorting.

Each sample is a dict ``{"prompt", "answer", "task", "id"}``; countdown samples also carry
``"numbers"`` and ``"target"`` so the verifier need not parse the prompt. Generation is a pure
function of (task, seed, split, params): the RNG is seeded from those, never from global state.

Train and held-out sets are disjoint by construction: a sample's split is decided by the hash of its
content (task + prompt), so the same question can never land in both, whatever the seeds are.
A generator draws candidates and keeps the ones whose hash falls in the requested split.

Countdown targets are built from a random expression tree over the drawn numbers, so every
instance is solvable; answers are checked by ``safe_eval``, an ``ast`` walker that accepts only
decimal integer literals, + - * / and parentheses, refuses ``**`` (``9**9**9`` would never finish) and
any literal or intermediate value beyond ``max_abs``, and computes with exact fractions. A generator
keeps only samples whose reference answer passes the task's own verifier, so no generated sample is
one that even its worked solution fails.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

__all__ = [
    "TASKS", "UnsafeExpression", "safe_eval", "content_hash", "split_of", "generate_tasks",
    "verify_answer", "canonical_answer", "worked_solution",
]

# ---------------------------------------------------------------------------------------------------
# Safe arithmetic evaluator (countdown answers are model-written expressions)
# ---------------------------------------------------------------------------------------------------


class UnsafeExpression(ValueError):
    """An expression the safe evaluator refuses: bad syntax, a forbidden operator, a huge number."""


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def safe_eval(expr: str, *, max_abs: int = 10**9, max_len: int = 256, literals: list | None = None) -> Fraction:
    """Evaluate ``+ - * /`` over non-negative decimal integer literals exactly; raise UnsafeExpression otherwise.

    ``max_abs`` bounds every literal, every intermediate value and every denominator, so no input
    can make the evaluator slow or huge. When ``literals`` is a list, the integer literals are
    appended to it in order (countdown checks that each given number is used exactly once).
    """
    if not isinstance(expr, str):
        raise UnsafeExpression(f"expression must be a str, got {type(expr).__name__}")
    if len(expr) > max_len:
        raise UnsafeExpression(f"expression longer than {max_len} characters")
    source = expr.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes, over-long int literals
        raise UnsafeExpression(f"not an arithmetic expression: {exc}") from None

    def check(value: Fraction) -> Fraction:
        if abs(value) > max_abs or value.denominator > max_abs:
            raise UnsafeExpression(f"value exceeds {max_abs}")
        return value

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            written = ast.get_source_segment(source, node) or ""
            if not (written.isascii() and written.isdigit()):  # "0x3" would count as using a 3
                raise UnsafeExpression(f"literal {written!r} is not written in plain decimal digits")
            if node.value > max_abs:
                raise UnsafeExpression(f"literal {node.value} exceeds {max_abs}")
            if literals is not None:
                literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                raise UnsafeExpression("'**' is not allowed")
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise UnsafeExpression(f"operator {type(node.op).__name__} is not allowed")
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise UnsafeExpression("division by zero")
            return check(op(left, right))
        raise UnsafeExpression(f"{type(node).__name__} is not allowed")

    return walk(tree.body)


# ---------------------------------------------------------------------------------------------------
# Generators: rng -> (prompt, answer, extra fields)
# ---------------------------------------------------------------------------------------------------


def _check_range(name: str, low: int, high: int, floor: int) -> None:
    if not (isinstance(low, int) and isinstance(high, int)) or low < floor or high < low:
        raise ValueError(f"{name}: need integers {floor} <= min <= max, got {low}..{high}")


def _gen_addition(rng: random.Random, min_digits: int = 1, max_digits: int = 3) -> tuple[str, str, dict]:
    _check_range("digits", min_digits, max_digits, 1)

    def number() -> int:
        digits = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    a, b = number(), number()
    return f"{a}+{b}", str(a + b), {}


def _gen_chain_sum(rng: random.Random, min_terms: int = 3, max_terms: int = 4, max_value: int = 20) -> tuple[str, str, dict]:
    _check_range("terms", min_terms, max_terms, 2)
    _check_range("max_value", 1, max_value, 1)
    terms = [rng.randint(0, max_value) for _ in range(rng.randint(min_terms, max_terms))]
    return "+".join(map(str, terms)), str(sum(terms)), {}


def _gen_countdown(rng: random.Random, num_count: int = 3, max_number: int = 12, max_target: int = 100) -> tuple[str, str, dict]:
    _check_range("num_count", num_count, num_count, 2)
    _check_range("max_number", 1, max_number, 1)
    if max_number > _COUNTDOWN_MAX_ABS:
        raise ValueError(f"max_number: at most {_COUNTDOWN_MAX_ABS} (the verifier's bound on any number), "
                         f"got {max_number}")
    refused = 0
    for _ in range(1000):
        numbers = [rng.randint(1, max_number) for _ in range(num_count)]
        # Each node: (value, expression text, is_leaf). Combine random pairs until one remains;
        # keep intermediates positive integers, as in the Countdown game.
        nodes = [(Fraction(n), str(n), True) for n in numbers]
        while len(nodes) > 1:
            i, j = rng.sample(range(len(nodes)), 2)
            (va, ea, la), (vb, eb, lb) = nodes[i], nodes[j]
            if va < vb:
                (va, ea, la), (vb, eb, lb) = (vb, eb, lb), (va, ea, la)
            choices = ["+", "*"] + (["-"] if va > vb else []) + (["/"] if vb > 1 and va % vb == 0 else [])
            op = rng.choice(choices)
            value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb}[op]
            text = f"{ea if la else f'({ea})'}{op}{eb if lb else f'({eb})'}"
            nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [(value, text, False)]
        target, expr = nodes[0][0], nodes[0][1]
        if 1 <= target <= max_target and target.denominator == 1:
            extra = {"numbers": numbers, "target": int(target)}
            # Products of large numbers can pass the verifier's bound on intermediates (10**9), and many
            # numbers its length bound: such a puzzle's own answer would be refused, so it is drawn again.
            if not _verify_countdown(extra, expr):
                refused += 1
                continue
            return f"make {int(target)} with {' '.join(map(str, numbers))}", expr, extra
    if refused:
        raise ValueError(f"num_count, max_number: {refused} of the puzzles drawn for {num_count} numbers <= "
                         f"{max_number} had answers beyond the verifier's bounds (values <= {_COUNTDOWN_MAX_ABS}, "
                         f"{_COUNTDOWN_MAX_LEN} characters); lower them")
    raise ValueError(f"max_target: no target in 1..{max_target} found for {num_count} numbers <= {max_number}")


def _gen_sorting(rng: random.Random, min_len: int = 3, max_len: int = 5, max_value: int = 99) -> tuple[str, str, dict]:
    _check_range("len", min_len, max_len, 1)
    _check_range("max_value", 0, max_value, 0)
    values = [rng.randint(0, max_value) for _ in range(rng.randint(min_len, max_len))]
    return "sort " + " ".join(map(str, values)), " ".join(map(str, sorted(values))), {}


# ---------------------------------------------------------------------------------------------------
# Verifiers: (sample, answer text) -> bool. Never raise on model output.
# ---------------------------------------------------------------------------------------------------

# ASCII digits only (the sorting verifier takes no others either), commas only between groups of three;
# no length cap: answers are compared as digit strings, so a 70-digit sum is as checkable as a 2-digit one.
_INT_RE = re.compile(r"[+-]?(?:[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+)")
_COUNTDOWN_MAX_ABS = 10**9  # safe_eval's defaults, which the countdown verifier uses
_COUNTDOWN_MAX_LEN = 256


def _canonical_integer(text: str) -> str:
    """'+0,047' -> '47', '-0' -> '0': the digits without sign noise, separators or leading zeros."""
    digits = text.lstrip("+-").replace(",", "").lstrip("0") or "0"
    return f"-{digits}" if text.startswith("-") and digits != "0" else digits


def _is_integer_text(text: str, answer: str) -> bool:
    """Whether ``text`` writes the integer ``answer``; strings are compared, so no length makes int() raise."""
    return bool(_INT_RE.fullmatch(text)) and _canonical_integer(text) == _canonical_integer(answer)


def _verify_integer(sample: dict, text: str) -> bool:
    return _is_integer_text(text.strip(), sample["answer"])


def _split_equation(text: str) -> tuple[str, str | None] | None:
    """A countdown answer "expr" or "expr = value" as (expr, stripped value or None); None for two "="."""
    expr, *rest = text.split("=")
    if len(rest) > 1:
        return None
    return expr, (rest[0].strip() if rest else None)


def _sort_tokens(text: str) -> list[str]:
    """A sorting answer's numbers, split on whitespace and commas: "1, 3 12" -> ["1", "3", "12"]."""
    return [t for t in re.split(r"[\s,]+", text) if t]


def _verify_countdown(sample: dict, text: str) -> bool:
    # "expr" or "expr = target"; a right side that is not the target makes a false equation
    parts = _split_equation(text.strip())
    if parts is None or (parts[1] is not None and not _is_integer_text(parts[1], str(sample["target"]))):
        return False
    expr = parts[0]
    used: list[int] = []
    try:
        value = safe_eval(expr, literals=used, max_abs=_COUNTDOWN_MAX_ABS, max_len=_COUNTDOWN_MAX_LEN)
    except UnsafeExpression:
        return False
    return value == sample["target"] and Counter(used) == Counter(sample["numbers"])


def _verify_sorting(sample: dict, text: str) -> bool:
    return _sort_tokens(text.strip()) == sample["answer"].split()


# ---------------------------------------------------------------------------------------------------
# Worked solutions for the cold-start SFT
# ---------------------------------------------------------------------------------------------------


def _solve_addition(sample: dict) -> str:
    """Column addition right to left with carries: '47+385: 7+5=12, 4+8+1=13, 3+1=4'."""
    a, b = sample["prompt"].split("+")
    steps, carry = [], 0
    for k in range(max(len(a), len(b))):
        terms = [int(s[-1 - k]) for s in (a, b) if k < len(s)] + ([carry] if carry else [])
        total = sum(terms)
        steps.append(f"{'+'.join(map(str, terms))}={total}")
        carry = total // 10
    return f"<think>{sample['prompt']}: {', '.join(steps)}</think><answer>{sample['answer']}</answer>"


def _solve_chain_sum(sample: dict) -> str:
    """Running total: '3+14=17, 17+7=24'."""
    terms = [int(t) for t in sample["prompt"].split("+")]
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return f"<think>{', '.join(steps)}</think><answer>{sample['answer']}</answer>"


def _solve_countdown(sample: dict) -> str:
    """The reference expression's operations innermost first: '12-3=9, 9*4=36'."""
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        value = _BINOPS[type(node.op)](left, right)
        symbol = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        steps.append(f"{left}{symbol}{right}={value}")
        return value

    walk(ast.parse(sample["answer"], mode="eval").body)
    return f"<think>{', '.join(steps)}</think><answer>{sample['answer']}</answer>"


def _solve_sorting(sample: dict) -> str:
    """Smallest first, one pick at a time."""
    return f"<think>{', '.join(sample['answer'].split())}</think><answer>{sample['answer']}</answer>"


# task name -> (generator, verifier, worked-solution builder)
TASKS: dict[str, tuple[Callable, Callable[[dict, str], bool], Callable[[dict], str]]] = {
    "addition": (_gen_addition, _verify_integer, _solve_addition),
    "chain_sum": (_gen_chain_sum, _verify_integer, _solve_chain_sum),
    "countdown": (_gen_countdown, _verify_countdown, _solve_countdown),
    "sorting": (_gen_sorting, _verify_sorting, _solve_sorting),
}
# Mixtures: name -> sub-tasks drawn uniformly per sample ("arithmetic" is the config's default task).
MIXTURES = {"arithmetic": ("addition", "chain_sum")}


def content_hash(task: str, prompt: str) -> str:
    """SHA-256 of the sample's content; decides its split and names it."""
    return hashlib.sha256(f"{task}\x00{prompt}".encode()).hexdigest()


def _canonical(task: str, prompt: str) -> str:
    """The prompt with its order-free parts sorted: "4+63" is "63+4", "make 85 with 9 10 5" is
    "make 85 with 10 5 9". Splitting on the raw text put 10% of held-out countdown puzzles (20 of 200)
    in the held-out set with the same numbers, reordered, in train."""
    words = prompt.split()
    if task in ("addition", "chain_sum") and re.fullmatch(r"\d+(\+\d+)*", prompt):
        return "+".join(sorted(prompt.split("+"), key=int))
    if task == "countdown" and len(words) > 3 and words[0] == "make" and words[2] == "with":
        return " ".join(words[:3] + sorted(words[3:], key=int))
    if task == "sorting" and words[:1] == ["sort"]:
        return " ".join(["sort", *sorted(words[1:], key=int)])
    return prompt


def split_of(task: str, prompt: str, heldout_fraction: float) -> str:
    """'heldout' for the hash-chosen ``heldout_fraction`` of all possible samples, else 'train'; a
    reordering of a sample's numbers that leaves its answer alone lands in the sample's split."""
    key = content_hash(task, _canonical(task, prompt))
    return "heldout" if int(key[:8], 16) < heldout_fraction * 2**32 else "train"


def generate_tasks(task: str, n: int, *, seed: int = 0, split: str = "train", heldout_fraction: float = 0.2,
                   **params) -> list[dict]:
    """``n`` distinct samples of ``task`` in ``split`` ('train' or 'heldout'), deterministic in ``seed``.

    ``params`` are the task's difficulty knobs (e.g. ``min_digits=3, max_digits=4`` for addition);
    for a mixture they go to every sub-task, so use them only for knobs the sub-tasks share.
    """
    subtasks = MIXTURES.get(task, (task,))
    for name in subtasks:
        if name not in TASKS:
            raise ValueError(f"task: unknown task {task!r}; known: {sorted(TASKS) + sorted(MIXTURES)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: expected a value in (0, 1), got {heldout_fraction!r}")
    rng = random.Random(f"{task}|{seed}|{split}|{sorted(params.items())}")
    samples: dict[str, dict] = {}
    for _ in range(max(2000, 100 * n)):
        if len(samples) == n:
            break
        name = rng.choice(subtasks)
        try:
            prompt, answer, extra = TASKS[name][0](rng, **params)
        except TypeError as exc:  # unknown difficulty knob
            raise ValueError(f"params: {exc}") from None
        if split_of(name, prompt, heldout_fraction) != split:
            continue
        sample_id = f"{name}-{content_hash(name, prompt)[:16]}"
        samples.setdefault(sample_id, {"prompt": prompt, "answer": answer, "task": name, "id": sample_id, **extra})
    if len(samples) < n:
        raise ValueError(f"n: only {len(samples)} distinct {task} samples found in split {split!r} "
                         f"with {params or 'default params'}; lower n or widen the difficulty params")
    return list(samples.values())


def _generated_task(sample: dict) -> str:
    """The sample's task name; ValueError when it is not a generated task."""
    task = sample.get("task")
    if task not in TASKS:
        raise ValueError(f"sample: task {task!r} is not a generated task; known: {sorted(TASKS)}")
    return task


def verify_answer(sample: dict, answer_text: str) -> bool:
    """Exact check of a model's answer text (the contents of <answer>) against a generated sample."""
    task = _generated_task(sample)
    if not isinstance(answer_text, str):
        return False
    return TASKS[task][1](sample, answer_text)


def canonical_answer(sample: dict, answer_text: str | None) -> str | None:
    """The form the task's verifier compares, so answers it cannot tell apart get one key (majority voting):
    integers without sign noise, separators or leading zeros ("+07" -> "7"), a sorting as its numbers joined
    by one space ("1, 3, 12" -> "1 3 12"), a countdown expression as its parsed tree written back ("((2+3))*4"
    -> "(2 + 3) * 4"). None when the text is not in the task's answer form (callers fall back to the text)."""
    task = _generated_task(sample)
    if not isinstance(answer_text, str):
        return None
    text = answer_text.strip()
    if task in ("addition", "chain_sum"):
        return _canonical_integer(text) if _INT_RE.fullmatch(text) else None
    if task == "sorting":
        return " ".join(_sort_tokens(text)) or None
    parts = _split_equation(text)  # countdown: "expr" or "expr = value", as its verifier reads it
    if parts is None or (parts[1] is not None and not _INT_RE.fullmatch(parts[1])):
        return None
    expr, value = parts
    try:
        safe_eval(expr, max_abs=_COUNTDOWN_MAX_ABS, max_len=_COUNTDOWN_MAX_LEN)
    except UnsafeExpression:
        return None
    tree = ast.unparse(ast.parse(expr.strip(), mode="eval"))  # one spacing, no redundant parentheses
    return tree + (f"={_canonical_integer(value)}" if value is not None else "")


def worked_solution(sample: dict) -> str:
    """The cold-start SFT target: '<think>steps</think><answer>answer</answer>' for a generated sample."""
    task = _generated_task(sample)
    return TASKS[task][2](sample)
