"""Which text of a completion is the program the code reward runs: Markdown code fences, line by line.

A regex over the whole text (``` + optional tag + newline, lazily up to the next ```) picked the wrong
text in three common shapes: after a ```js block the js *closing* fence was read as an opening one (so
the prose between blocks ran), ```Python and CRLF fences were not recognised (the whole answer, fences
included, ran and died of a SyntaxError), and a ``` inside the code (``print("```")``) cut it short.

The rules, after CommonMark's fenced code blocks: newlines are normalised (``\\r\\n`` and ``\\r`` to
``\\n``, as Python's own tokenizer reads them); an opening fence is a line of 3+ backticks, indented by
at most 3 spaces, followed by an optional info string without backticks whose first word is the
language tag; the block ends at a line holding only backticks (at least as many as opened it) and
whitespace, or at the end of the text when never closed (a truncated completion). The program is the
LAST block whose tag is empty, ``python``, ``py`` or ``python3`` (any case).
"""

from __future__ import annotations

import re

from .format import extract_answer

__all__ = ["PYTHON_TAGS", "fenced_blocks", "extract_code"]

PYTHON_TAGS = frozenset({"", "python", "py", "python3"})

# The info string is split on whitespace, so its leading blanks need no pattern of their own: "[ \t]*([^`]*)"
# made a line of ``` + 32k blanks + ` backtrack quadratically (8.8 s).
_OPEN_RE = re.compile(r"( {0,3})(`{3,})([^`]*)")
_CLOSE_RE = re.compile(r" {0,3}(`{3,})[ \t]*")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(tag, body)`` of every fenced code block in ``text``, in order; ``tag`` is lower-cased."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[tuple[str, str]] = []
    k = 0
    while k < len(lines):
        opening = _OPEN_RE.fullmatch(lines[k])
        k += 1
        if opening is None:
            continue
        indent, fence, info = len(opening.group(1)), len(opening.group(2)), opening.group(3).split()
        body = []
        while k < len(lines):
            closing = _CLOSE_RE.fullmatch(lines[k])
            k += 1
            if closing is not None and len(closing.group(1)) >= fence:
                break
            # CommonMark: a fence indented by n spaces strips up to n spaces from each line of its body
            line = lines[k - 1]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
        blocks.append(((info[0] if info else "").lower(), "".join(line + "\n" for line in body)))
    return blocks


def extract_code(completion: str) -> str | None:
    """The program to run: the last Python block of the ``<answer>`` text (or of the whole completion
    when there is no well-formed answer block); the answer text itself when it holds no fence at all;
    None when there is nothing that could be a program (no answer, or only other languages' blocks)."""
    answer = extract_answer(completion)
    text = answer if answer is not None else completion
    blocks = fenced_blocks(text)
    python = [body for tag, body in blocks if tag in PYTHON_TAGS]
    if python:
        return python[-1]
    if not blocks and answer is not None and answer.strip():
        return answer
    return None
