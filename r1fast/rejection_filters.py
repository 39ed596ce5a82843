"""Filters for rejection-sampled reasoning traces, as pure functions (no model, no I/O).

DeepSeek-R1 (section 2.3.3) kept only correct samples and "filtered out chain-of-thought with mixed
languages, long paragraphs, and code blocks"; open distillation sets (OpenThoughts, OpenR1-Math) also
drop truncated, repetitive and duplicated traces and decontaminate against the evaluation sets. Each
predicate here returns True when a trace must be **dropped**, so ``r1fast.rejection`` can count what
each stage removed.

Text is split into "words" by ``words``: runs of letters/digits, and every other non-space character
on its own, so ``12+35=47`` is five words and n-gram checks work on arithmetic as well as prose.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

from r1fast.rewards.format import extract_think
from r1fast.rewards.language import count_words_by_language

__all__ = [
    "words", "ngrams", "mixed_language", "unreadable", "bad_length", "repeated_ngram_fraction", "too_repetitive",
    "exact_key", "jaccard", "near_duplicate_of", "NgramIndex",
]

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (letter/digit runs; other non-space characters one by one)."""
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The set of ``n``-grams of ``tokens``; a text shorter than n gives its whole token tuple (if any)."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _chain_of_thought(completion: str) -> str:
    """The ``<think>`` block of ``completion`` as written (an indented code block on its first line stays
    indented: stripped, it read as prose), or the whole completion when there is none."""
    think = extract_think(completion, strip=False)
    return think if think is not None else completion


def mixed_language(completion: str, *, language: str = "en", min_share: float = 0.95) -> bool:
    """True when fewer than ``min_share`` of the chain of thought's words are in ``language``.

    The chain of thought is the ``<think>`` block (the whole completion when there is none). Words are
    counted by script as the language-consistency reward counts them; a text without words passes.
    """
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share: expected a value in [0, 1], got {min_share}")
    counts = count_words_by_language(_chain_of_thought(completion))
    if language not in counts:
        raise ValueError(f"language: expected one of {sorted(k for k in counts if k != 'other')}, got {language!r}")
    total = sum(counts.values())
    return total > 0 and counts[language] / total < min_share


_FENCE_RE = re.compile(r"^[ \t]*(```|~~~)", re.MULTILINE)
_INDENTED_RE = re.compile(r"(?:\A(?:[ \t]*\n)*|\n[ \t]*\n)(?: {4}|\t)[ \t]*\S")  # markdown: after a blank line
_PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t]*\n")


def unreadable(completion: str, *, code_blocks: bool = True, max_paragraph_words: int | None = 300) -> bool:
    """True when the chain of thought holds a code block (a ``` or ~~~ fence, or a markdown indented block)
    when ``code_blocks``, or a paragraph (text between blank lines) of more than ``max_paragraph_words``
    whitespace-separated words (None: no limit): R1's readability filter (section 2.3.3).

    The chain of thought is the ``<think>`` block (the whole completion when there is none).
    """
    if max_paragraph_words is not None and max_paragraph_words < 1:
        raise ValueError(f"max_paragraph_words: expected >= 1 or None, got {max_paragraph_words}")
    text = _chain_of_thought(completion)
    if code_blocks and (_FENCE_RE.search(text) or _INDENTED_RE.search(text)):
        return True
    return max_paragraph_words is not None and any(
        len(p.split()) > max_paragraph_words for p in _PARAGRAPH_BREAK_RE.split(text))


def bad_length(num_tokens: int, finish_reason: str, *, min_tokens: int = 1, max_tokens: int | None = None) -> bool:
    """True for a truncated trace (finish_reason 'length') or one outside [min_tokens, max_tokens] tokens
    (``num_tokens`` counts the trace's text, not the stop token that ended it: ``rejection.trace_tokens``)."""
    if finish_reason == "length":
        return True
    return num_tokens < min_tokens or (max_tokens is not None and num_tokens > max_tokens)


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one (0 = no repetition; < n words: 0)."""
    tokens = words(text)
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(tokens[i:i + n]) for i in range(total)})
    return (total - distinct) / total


def too_repetitive(text: str, *, n: int = 4, max_fraction: float = 0.5) -> bool:
    """True when more than ``max_fraction`` of the word n-grams are repeats (degenerate loops)."""
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction: expected a value in [0, 1], got {max_fraction}")
    return repeated_ngram_fraction(text, n) > max_fraction


def exact_key(prompt: str, completion: str) -> str:
    """Key of exact-duplicate detection: (prompt, completion) with case and whitespace runs normalized."""
    norm = " ".join(completion.lower().split())
    return hashlib.sha256(f"{' '.join(prompt.lower().split())}\x00{norm}".encode()).hexdigest()


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def near_duplicate_of(shingles: set, kept: Iterable[set], *, threshold: float = 0.8) -> bool:
    """True when ``shingles`` has Jaccard similarity >= ``threshold`` with any already-kept trace."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a value in (0, 1], got {threshold}")
    return any(jaccard(shingles, other) >= threshold for other in kept)


class NgramIndex:
    """Word n-grams of evaluation texts, for decontamination (n-gram overlap, as GPT-3 / OpenThoughts).

    A training text is contaminated when any of its word n-grams occurs in an evaluation text, when it
    equals an evaluation text after normalization, or when it contains an evaluation text shorter than n
    words as a contiguous run of words (every 2-digit addition prompt, ``74+91``, is 3 words < the default
    8: without this, "What is 74+91?" passed). A one-word evaluation text is matched by equality only:
    one word (a number, "hello") occurs in unrelated text by chance.
    """

    MIN_EMBEDDED_WORDS = 2
    """Shortest evaluation text (in words) searched for inside training texts."""

    def __init__(self, texts: Iterable[str], *, n: int = 8):
        if n < 1:
            raise ValueError(f"n: expected >= 1, got {n}")
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.whole: set[tuple[str, ...]] = set()
        self.short: dict[int, set[tuple[str, ...]]] = {}  # length -> evaluation texts of that many words (< n)
        for text in texts:
            tokens = words(text)
            if not tokens:  # an empty evaluation text would otherwise match every empty training text
                continue
            self.whole.add(tuple(tokens))
            if len(tokens) >= n:
                self.grams |= ngrams(tokens, n)
            elif len(tokens) >= self.MIN_EMBEDDED_WORDS:
                self.short.setdefault(len(tokens), set()).add(tuple(tokens))

    def __len__(self) -> int:
        return len(self.whole)

    def contaminated(self, *texts: str) -> bool:
        """True when any of ``texts`` shares an n-gram with, equals, or contains (shorter than n words) an
        indexed evaluation text. Linear in the text's length: one set lookup per window and short length."""
        for text in texts:
            tokens = words(text)
            if tokens and tuple(tokens) in self.whole:
                return True
            if len(tokens) >= self.n and not self.grams.isdisjoint(ngrams(tokens, self.n)):
                return True
            for length, seqs in self.short.items():
                if not seqs.isdisjoint(ngrams(tokens, length)):
                    return True
        return False
