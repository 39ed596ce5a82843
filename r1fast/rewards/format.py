"""Format reward for the R1 template ``<think>…</think><answer>…</answer>``, and tag extraction.

Strict rule (all-or-nothing, as DeepSeek-R1-Zero's format reward): the completion is, up to
surrounding whitespace, exactly one think block followed by exactly one answer block, and neither
block contains a tag. Nested tags (``<think><think>…</think></think>``), unclosed tags, tags in the
wrong order and text outside the blocks all fail.

Partial credit (option): 0.25 for each well-formed block (its tag opens exactly once and closes exactly
once, after the opening) plus 0.5 when the strict rule holds, so scores are 0, 0.25, 0.5 or 1. A tiny
model gets a gradient toward the template before it can produce all of it.
"""

from __future__ import annotations

import re

__all__ = ["format_reward", "format_reward_partial", "format_score", "extract_answer", "extract_think",
           "block_well_formed", "open_think_tail", "prefix_for", "continue_open_think"]

_ANY_TAG = r"</?(?:think|answer)>"
_BODY = rf"(?:(?!{_ANY_TAG}).)*"  # any text without a think/answer tag in it
_TEMPLATE_RE = re.compile(rf"\s*<think>({_BODY})</think>\s*<answer>({_BODY})</answer>\s*", re.DOTALL)


def block_well_formed(completion: str, tag: str) -> bool:
    """True when ``<tag>`` and ``</tag>`` each occur exactly once, the opening one first."""
    opened, closed = f"<{tag}>", f"</{tag}>"
    if completion.count(opened) != 1 or completion.count(closed) != 1:
        return False
    return completion.index(opened) < completion.index(closed)


def _block_body(completion: str, tag: str, strip: bool = True) -> str | None:
    if not isinstance(completion, str) or not block_well_formed(completion, tag):
        return None
    start = completion.index(f"<{tag}>") + len(tag) + 2
    body = completion[start:completion.index(f"</{tag}>")]
    if re.search(_ANY_TAG, body):  # e.g. an answer block inside the think block
        return None
    return body.strip() if strip else body


def extract_answer(completion: str) -> str | None:
    """The stripped text of the one well-formed ``<answer>`` block, or None."""
    return _block_body(completion, "answer")


def extract_think(completion: str, *, strip: bool = True) -> str | None:
    """The text of the one well-formed ``<think>`` block (stripped unless ``strip=False``: the rejection filters
    read layout, such as a code block indented on the block's first line), or None."""
    return _block_body(completion, "think", strip)


def format_reward(prompt: str, completion: str, meta: dict) -> float:
    """1.0 when the completion follows the R1 template exactly (see module docstring), else 0.0."""
    return 1.0 if _TEMPLATE_RE.fullmatch(completion) else 0.0


def format_reward_partial(prompt: str, completion: str, meta: dict) -> float:
    """0.25 per well-formed think/answer block, plus 0.5 when the whole template holds."""
    score = 0.25 * block_well_formed(completion, "think") + 0.25 * block_well_formed(completion, "answer")
    return score + 0.5 * format_reward(prompt, completion, meta)


def format_score(prompt: str, completion: str, meta: dict, *, partial: bool = False) -> float:
    """The registry's 'format' reward: strict by default, partial credit with ``partial=True``."""
    return (format_reward_partial if partial else format_reward)(prompt, completion, meta)


def open_think_tail(rendered_prompt: str) -> str:
    """The part of a rendered prompt that opens the completion's think block: ``"<think>\\n"`` for a chat
    template that ends the generation prompt with it (DeepSeek-R1-Distill, QwQ), else ``""``. The model then
    writes only ``…</think><answer>…</answer>``, so rewards score this tail + the completion: without it a
    completion that follows such a template exactly scored format 0 and language 0."""
    start = rendered_prompt.rfind("<think>")
    if start < 0 or rendered_prompt[start + len("<think>"):].strip():
        return ""
    return rendered_prompt[start:]


def prefix_for(prefix, prompt: str) -> str:
    """The completion prefix of one prompt: ``prefix`` itself, or for a callable (``stage_io.completion_prefix``
    under template 'none', where each prompt is its own rendering) ``prefix(prompt)``."""
    return prefix(prompt) if callable(prefix) else prefix


def continue_open_think(completion: str, prefix: str) -> str:
    """The training target for a prompt that ends with ``prefix`` (``open_think_tail``): without a ``<think>``
    of its own, so the sequence reads as one think block. A target that opens one itself (r1fast's worked
    solutions, the usual R1-Distill data "<think>\\n...") loses that tag: trained verbatim, the model learned to
    write "<think>\\n<think>", and every stage graded it format 0. A target with no think block at all (a
    non-reasoning answer) gets the opened block closed empty first, as R1-Distill's own data does."""
    if not prefix:
        return completion
    body = completion.lstrip()
    if body.startswith("<think>"):
        rest, tail = body[len("<think>"):], prefix[len("<think>"):]
        return rest[len(tail):] if rest.startswith(tail) else rest
    if "</think>" not in completion:
        return "\n</think>\n\n" + body
    return completion
