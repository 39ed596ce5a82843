"""Prompt templates: the DeepSeek-R1-Zero template verbatim, and a compact one for the tiny model.

``R1_ZERO_TEMPLATE`` is Table 1 of the DeepSeek-R1 paper (arXiv 2501.12948v1) word for word, with
``{prompt}`` where the paper writes "prompt". (The later Nature version capitalizes "User" and
"Assistant" inside the sentence and writes "<think>...</think>"; we ship the arXiv wording, which is
the one open reproductions such as SimpleRL-Zoo use.) Worked solutions for the cold-start SFT of the
generated tasks live in ``r1fast.data.tasks.worked_solution``.
"""

from __future__ import annotations

__all__ = ["R1_ZERO_TEMPLATE", "COMPACT_TEMPLATE", "TEMPLATES", "apply_template"]

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant:"
)

# The tiny character-level model pays for every prompt character in every rollout and has no use
# for the instructions (it learns the format from the cold-start SFT), so it keeps only the turn
# markers of the R1-Zero template.
COMPACT_TEMPLATE = "User: {prompt}. Assistant:"

TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "compact": COMPACT_TEMPLATE, "none": "{prompt}"}


def apply_template(prompt: str, template: str = "r1_zero") -> str:
    """Wrap a task prompt in a named template ('r1_zero', 'compact', 'none')."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a str, got {type(prompt).__name__}")
    if template not in TEMPLATES:
        raise ValueError(f"template: unknown template {template!r}; known: {sorted(TEMPLATES)}")
    # str.replace, not str.format: user prompts (JSONL math) contain braces such as \frac{1}{2}.
    return TEMPLATES[template].replace("{prompt}", prompt)
