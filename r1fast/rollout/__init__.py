"""In-process rollout generation on the trainer's live weights: paged KV cache, continuous batching,
group-shared prompts, CUDA-graph decode. ``Engine(model).generate(prompts, n=G, max_new_tokens=...)``."""

from .engine import Completion, Engine

__all__ = ["Completion", "Engine"]
