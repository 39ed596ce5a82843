"""The pipeline's data handling: the data stage's files and the mixed data set of a multi-input sft stage.

R1's second SFT round trains on one set that mixes reasoning traces (rejection-sampled) with non-reasoning
data; a recipe lists them as ``data = [...]`` and ``mix_sft_inputs`` joins them into the stage's
``train.jsonl``. A ``limit`` then applies to each input in proportion to its size (``split_limit``), never
to the joined file, where it would keep the first input alone; the stage summary records, per input, how
many records it had and how many were used (``sources``).
"""

from __future__ import annotations

import os
import random

from r1fast import distributed as D
from r1fast.data import generate_tasks, worked_solution
from r1fast.data.jsonl import iter_json_objects
from r1fast.pipeline_recipe import DataGenConfig, Stage, data_files
from r1fast.stage_io import data_errors, write_jsonl

__all__ = ["non_reasoning_examples", "run_data_stage", "split_limit", "mix_sft_inputs"]


def non_reasoning_examples(n: int, *, digits: tuple[int, int], seed: int) -> list[dict]:
    """'repeat 4821' -> '<answer>4821</answer>': answered directly, without a chain of thought."""
    rng, rows = random.Random(f"non_reasoning|{seed}"), []
    for i in range(n):
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(*digits)))
        rows.append({"prompt": f"repeat {text}", "completion": f"<answer>{text}</answer>", "answer": text,
                     "task": "non_reasoning", "id": f"non_reasoning-{seed}-{i}"})
    return rows


def run_data_stage(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    """The data stage: generated task files (cold_start with worked solutions) and non-reasoning examples."""
    c: DataGenConfig = stage.config
    files = {name: generate_tasks(c.task, n, seed=seed, split=split, **params)
             for name, (n, split, seed, params) in data_files(c).items()}
    files["cold_start"] = [{**s, "completion": worked_solution(s)} for s in files["cold_start"]]
    files["non_reasoning"] = non_reasoning_examples(c.non_reasoning_size, digits=c.non_reasoning_digits, seed=c.seed)
    outputs = {name: os.path.join(stage_dir, f"{name}.jsonl") for name in files}
    if D.rank() == 0:
        for name, rows in files.items():
            write_jsonl(outputs[name], rows)
    return outputs, {name: len(rows) for name, rows in files.items()}


def split_limit(sizes: list[int], limit: int | None) -> list[int]:
    """How many records to take from each input so that they total ``min(limit, sum(sizes))``.

    Proportional to the sizes (largest remainder), and every non-empty input keeps at least one record
    while ``limit`` allows it: 10 traces + 10 non-reasoning examples under limit=10 give 5 + 5, where
    truncating the joined file gave 10 + 0.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected >= 1 or None, got {limit}")
    total = sum(sizes)
    if limit is None or limit >= total:
        return list(sizes)
    exact = [limit * n / total for n in sizes]
    take = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (take[i] - exact[i], i))
    for i in by_remainder[:limit - sum(take)]:
        take[i] += 1
    for i, n in enumerate(sizes):  # a small input rounded to 0: one record from the largest share
        if n and not take[i] and max(take) > 1:
            take[take.index(max(take))] -= 1
            take[i] = 1
    return take


def mix_sft_inputs(paths: list[str], refs: list[str], out: str, limit: int | None) -> list[dict]:
    """Join the data inputs ``paths`` (declared as ``refs``) into ``out`` (rank 0 writes), at most ``limit``
    records in all, split by ``split_limit``; returns per input {"ref", "records": available, "used": taken}.

    Every rank reads the inputs (a bad line names path:line, as r1fast.sft would) and returns the counts.
    """
    with data_errors():
        inputs = [[rec for _, rec in iter_json_objects(path)] for path in paths]
    take = split_limit([len(rows) for rows in inputs], limit)
    if D.rank() == 0:
        write_jsonl(out, [rec for rows, n in zip(inputs, take, strict=True) for rec in rows[:n]])
    D.barrier()
    return [{"ref": ref, "records": len(rows), "used": n} for ref, rows, n in zip(refs, inputs, take, strict=True)]
