"""Held-out evaluation during training: greedy accuracy, pass@1 over k samples, format rate.

Each rank evaluates its shard of the held-out prompts with the rollout engine; counts are summed
across ranks, so the numbers do not depend on the number of ranks.
"""

from __future__ import annotations

import torch

from r1fast import distributed as D
from r1fast.seeding import sample_seeds
from r1fast.stage_io import stop_token_ids


def evaluate(engine, tokenizer, samples: list[dict], prompt_ids: list[list[int]], score_fn, *, max_new_tokens: int,
             k: int = 1, temperature: float = 0.6, top_p: float = 0.95, seed: int = 0) -> dict:
    """Greedy accuracy and (k > 1 or temperature > 0) pass@1 averaged over k samples, on the held-out set.

    ``score_fn(sample, completion_text) -> (correct: bool, well_formatted: bool)``. Sampling follows R1's
    evaluation (temperature 0.6, top-p 0.95); seeds depend only on the prompt's global index.
    """
    rank, world = D.rank(), D.world_size()
    mine = list(range(rank, len(samples), world))
    stop = stop_token_ids(tokenizer, engine.args)
    totals = torch.zeros(5, dtype=torch.float64)  # greedy correct, greedy formatted, sampled correct, n, length
    if mine:
        greedy = engine.generate([prompt_ids[i] for i in mine], n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                 stop_token_ids=stop)
        sampled = engine.generate([prompt_ids[i] for i in mine], n=k, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, stop_token_ids=stop,
                                  seed=sample_seeds(seed, mine, k))
        for idx, g, s in zip(mine, greedy, sampled, strict=True):
            ok, fmt = score_fn(samples[idx], tokenizer.decode(g[0].token_ids))
            totals[0] += ok
            totals[1] += fmt
            totals[2] += sum(score_fn(samples[idx], tokenizer.decode(c.token_ids))[0] for c in s) / k
            totals[3] += 1
            totals[4] += len(g[0].token_ids)
    D.all_reduce_sum(totals)
    n = max(totals[3].item(), 1.0)
    return {"greedy_accuracy": totals[0].item() / n, "format_rate": totals[1].item() / n,
            f"pass@1_k{k}": totals[2].item() / n, "num_prompts": int(totals[3].item()),
            "greedy_length_mean": totals[4].item() / n}
