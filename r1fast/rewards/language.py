"""Language-consistency reward (DeepSeek-R1): the share of chain-of-thought words in the target language.

Words are found by script, with no model or download: a word is a run of letters (``str.isalpha``,
with the combining accents that follow them); everything else separates words. A word of Latin letters
is one English word (accented ones included: "Poincaré" and "naïve" in an English proof are English
words; telling French from English would need a language model, and R1's concern is Chinese/English
mixing); a letter is Latin when its compatibility form (NFKC) is, so fullwidth "ＡＢＣ" and math italic
"𝑥" are Latin too. Each CJK ideograph is one Chinese word (Chinese has no spaces; R1 counts characters
the same way), and a run of other letters (Cyrillic, Greek, kana, Hangul, ...) is one word of another
language. Digits of any kind (superscripts, fractions, circled numbers), symbols and punctuation are not
words, so ``12+35=47`` and ``x² + y² = z²`` neither help nor hurt: "x²" is the English word "x".

Score: target words / all words in the ``<think>`` block. A completion without a well-formed think
block, or with an empty one, scores 0 (there is no chain of thought to credit, and crediting an empty
block would reward skipping the reasoning); a think block with content but no words (only digits and
symbols) scores 1 (nothing in it is in the wrong language).
"""

from __future__ import annotations

import functools
import re
import unicodedata

from .format import extract_think

__all__ = ["SUPPORTED_LANGUAGES", "count_words_by_language", "language_consistency_reward"]

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_CJK_RE = re.compile(f"[{_CJK}]")
_ASCII_WORD_RE = re.compile(r"[A-Za-z]+")  # the common case, ASCII text, without a per-character loop

SUPPORTED_LANGUAGES = ("en", "zh")


@functools.lru_cache(maxsize=4096)
def _is_latin_letter(letter: str) -> bool:
    # NFKC maps fullwidth "Ａ", math italic "𝑥" and ligature "ﬁ" to plain Latin letters
    return all("LATIN" in unicodedata.name(c, "") for c in unicodedata.normalize("NFKC", letter) if c.isalpha())


def _words(text: str):
    """``(word, is_cjk)`` for each word of ``text``: a CJK ideograph alone, or a run of letters with their
    combining marks."""
    word: list[str] = []
    for c in text:
        if _CJK_RE.match(c):
            if word:
                yield "".join(word), False
                word = []
            yield c, True
        elif c.isalpha() or (word and unicodedata.category(c) in ("Mn", "Mc")):
            word.append(c)  # a combining accent continues its word ("cafe\u0301" is one word)
        elif word:
            yield "".join(word), False
            word = []
    if word:
        yield "".join(word), False


def count_words_by_language(text: str) -> dict[str, int]:
    """``{"en": n, "zh": n, "other": n}`` word counts of ``text`` by script."""
    if text.isascii():
        return {"en": len(_ASCII_WORD_RE.findall(text)), "zh": 0, "other": 0}
    counts = {"en": 0, "zh": 0, "other": 0}
    for word, is_cjk in _words(text):
        if is_cjk:
            counts["zh"] += 1
        else:
            latin = all(_is_latin_letter(c) for c in word if c.isalpha())
            counts["en" if latin else "other"] += 1
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


def _check_meta(meta: dict) -> None:
    """A sample's own ``language`` (a data column overrides the configured target) must be a supported one:
    "English" or null scored 0 on every sample of the row, with only warnings, instead of failing at load."""
    if "language" in meta:
        _check_params(language=meta["language"])


language_consistency_reward.check_params = _check_params  # checked when a run is configured
language_consistency_reward.check_meta = _check_meta  # checked on every sample when the data loads
