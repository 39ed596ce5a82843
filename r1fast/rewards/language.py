"""Language-consistency reward (DeepSeek-R1): the share of chain-of-thought words in the target language.

Words are found by script, with no model or download: a run of Latin letters is one English word
(accented ones included: "Poincaré" and "naïve" in an English proof are English words; telling French
from English would need a language model, and R1's concern is Chinese/English mixing), each CJK ideograph
is one Chinese word (Chinese has no spaces; R1 counts characters the same way), and a run of other
letters (Cyrillic, Greek, kana, Hangul, ...) is one word of another language.
Digits, symbols and punctuation are not words, so ``12+35=47`` neither helps nor hurts.

Score: target words / all words in the ``<think>`` block. A completion without a well-formed think
block, or with an empty one, scores 0 (there is no chain of thought to credit, and crediting an empty
block would reward skipping the reasoning); a think block with content but no words (only digits and
symbols) scores 1 (nothing in it is in the wrong language).
"""

from __future__ import annotations

import re
import unicodedata

from .format import extract_think

__all__ = ["SUPPORTED_LANGUAGES", "count_words_by_language", "language_consistency_reward"]

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
# a CJK character is a word of its own; any other run of letters is one word, English when all of its letters
# are Latin ("café" is one English word, not an English word plus a stray letter)
_WORD_RE = re.compile(rf"(?P<zh>[{_CJK}])|(?P<word>[^\W\d_{_CJK}]+)")

SUPPORTED_LANGUAGES = ("en", "zh")


def _is_latin(word: str) -> bool:
    return word.isascii() or all(c.isascii() or unicodedata.name(c, "").startswith("LATIN") for c in word)


def count_words_by_language(text: str) -> dict[str, int]:
    """``{"en": n, "zh": n, "other": n}`` word counts of ``text`` by script."""
    counts = {"en": 0, "zh": 0, "other": 0}
    for match in _WORD_RE.finditer(text):
        if match.lastgroup == "zh":
            counts["zh"] += 1
        else:
            counts["en" if _is_latin(match.group()) else "other"] += 1
    return counts


def language_consistency_reward(prompt: str, completion: str, meta: dict, *, language: str = "en") -> float:
    """Share of the think block's words in ``meta['language']`` (default ``language``), in [0, 1]."""
    target = meta.get("language", language) if isinstance(meta, dict) else language
    _check_params(language=target)
    think = extract_think(completion)
    if not think:
        return 0.0
    counts = count_words_by_language(think)
    total = sum(counts.values())
    return 1.0 if total == 0 else counts[target] / total


def _check_params(*, language: str = "en") -> None:
    if language not in SUPPORTED_LANGUAGES:
        raise ValueError(f"language: unsupported target {language!r}; supported: {list(SUPPORTED_LANGUAGES)}")


language_consistency_reward.check_params = _check_params  # checked when a run is configured
