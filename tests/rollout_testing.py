"""Shared pieces of the rollout tests: the tiny random fp32 model the engine runs on CPU and random prompts."""

import torch

from r1fast.model import Transformer
from r1fast.model_config import ModelArgs

VOCAB = 101


def tiny_model(seed: int = 1, **overrides) -> Transformer:
    """2 layers, hidden 64, 4 query heads over 2 KV heads of dim 16 (GQA), vocabulary VOCAB."""
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16)
    return Transformer.from_config(ModelArgs(**{**args, **overrides}), seed=seed)


def prompts_of(lengths, seed: int = 0) -> list[list[int]]:
    """One random prompt of each length in ``lengths`` (token ids in [0, VOCAB))."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]
