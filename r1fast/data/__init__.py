"""Prompts for GRPO: generated reasoning tasks with exact verifiers, a JSONL loader, templates."""

from .jsonl import load_jsonl
from .tasks import (
    MIXTURES,
    TASKS,
    UnsafeExpression,
    content_hash,
    generate_tasks,
    safe_eval,
    split_of,
    verify_answer,
    worked_solution,
)
from .templates import COMPACT_TEMPLATE, R1_ZERO_TEMPLATE, TEMPLATES, apply_template

__all__ = [
    "COMPACT_TEMPLATE", "MIXTURES", "R1_ZERO_TEMPLATE", "TASKS", "TEMPLATES", "UnsafeExpression",
    "apply_template", "content_hash", "generate_tasks", "load_jsonl", "safe_eval", "split_of",
    "verify_answer", "worked_solution",
]
