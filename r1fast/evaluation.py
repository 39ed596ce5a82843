"""Held-out evaluation during training: greedy accuracy, pass@1 over k samples, greedy format rate.

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

    ``score_fn(samples, completion_texts) -> [(correct: bool | None, well_formatted: bool), ...]`` grades this
    rank's completions in one call (``Scorer.check_batch``: code samples' programs run together in the sandbox
    pool; one by one, each hung program cost a timeout: 32 s of a 40 s code run); correct None means
    the sample cannot be graded (an unparsable gold): the prompt is skipped and counted in
    ``skipped_prompts``, as ``r1fast.eval`` does, so both report the same accuracy for the same checkpoint
    and data. Sampling follows R1's evaluation (temperature 0.6, top-p 0.95); seeds depend only on the
    prompt's global index. Counts are integers summed across ranks and divided once, so the numbers do
    not depend on the rank count or order; with no graded prompt (``num_prompts`` 0) the rates are 0.
    """
    rank, world = D.rank(), D.world_size()
    mine = list(range(rank, len(samples), world))
    stop = stop_token_ids(tokenizer, engine.args)
    # greedy correct, greedy formatted, sampled correct (of k each), graded prompts, greedy length, skipped
    totals = torch.zeros(6, dtype=torch.int64)
    if mine:
        greedy = engine.generate([prompt_ids[i] for i in mine], n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                 stop_token_ids=stop)
        sampled = engine.generate([prompt_ids[i] for i in mine], n=k, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, stop_token_ids=stop,
                                  seed=sample_seeds(seed, mine, k))
        # per prompt: the greedy completion, then its k samples
        flat = [(idx, c) for idx, g, s in zip(mine, greedy, sampled, strict=True) for c in (g[0], *s)]
        grades = score_fn([samples[idx] for idx, _ in flat], [tokenizer.decode(c.token_ids) for _, c in flat])
        for j, g in enumerate(greedy):
            first = j * (k + 1)
            (ok, fmt), sampled_ok = grades[first], [c for c, _ in grades[first + 1:first + k + 1]]
            if ok is None or any(c is None for c in sampled_ok):  # the gold, not the answer, is ungradable
                totals[5] += 1
                continue
            totals[0] += bool(ok)
            totals[1] += bool(fmt)
            totals[2] += sum(map(bool, sampled_ok))
            totals[3] += 1
            totals[4] += len(g[0].token_ids)
    D.all_reduce_sum(totals)
    greedy_ok, greedy_fmt, sampled_ok, graded, length, skipped = (int(v) for v in totals.tolist())
    n = max(graded, 1)
    # greedy_format_rate: of the greedy completions, as r1fast.eval's key (its format_rate is over the samples)
    return {"greedy_accuracy": greedy_ok / n, "greedy_format_rate": greedy_fmt / n,
            f"pass@1_k{k}": sampled_ok / (n * k),
            "num_prompts": graded, "skipped_prompts": skipped, "greedy_length_mean": length / n}
