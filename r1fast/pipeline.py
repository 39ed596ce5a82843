"""The multi-stage DeepSeek-R1 recipe as one resumable run: ``python -m r1fast.pipeline --recipe FILE``.

Also ``torchrun --nproc_per_node N -m r1fast.pipeline --recipe FILE``: every stage runs on all ranks
(the trainers shard the work); rank 0 writes the pipeline's own files. A recipe (TOML) declares:

    [pipeline]        name, out_dir, template                               (PipelineSection)
    [models.<family>] r1fast.config.ModelConfig fields of a model family (teacher, student, ...)
    [eval]            the held-out evaluation run after every stage that makes a model (EvalSection)
    [comparison]      distilled = [stages], rl_only = [stages]: same total optimizer steps, checked on load
    [[stages]]        name, kind, inputs = {role = ref | [refs]}, config = {the kind's config fields}

Kinds, their input roles and outputs:
    data       -                              cold_start, prompts, heldout, non_reasoning (JSONL)
    sft        model, data (list)             model            (r1fast.sft.SFTConfig)
    rl         model, prompts                 model            (r1fast.config.Config; GRPO, train.sft_steps = 0)
    rejection  model, prompts, decontaminate  kept             (r1fast.rejection.RejectionConfig)
A reference is ``base:<family>`` (the family's seeded initial weights, so every use is the same base
model), ``<stage>:<output>`` (an earlier stage's output) or ``file:<path>`` (a checkpoint or data file
from outside the pipeline). Keys the pipeline sets from inputs (paths, template, output names) may not
appear in a stage's config.

Outputs under ``<out_dir>/<name>/``: one directory per stage (its trainer's files, ``eval/`` with the
held-out evaluation, ``DONE.json`` written atomically last), ``lineage.json`` and the report
(``report.md``, ``report.json``, see ``r1fast.pipeline_report``).

Resume: a stage is skipped when its DONE.json exists, its outputs exist and its declaration is unchanged
(fingerprint); a stage that runs makes every stage downstream of it run again. An interrupted rl stage
continues from its newest checkpoint (``train.checkpoint_every``). Before any work, every external input
of a stage that will run is checked: a missing checkpoint or file stops the pipeline at once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time

from r1fast import distributed as D
from r1fast.config import Config
from r1fast.config_io import ConfigError
from r1fast.data import generate_tasks, worked_solution
from r1fast.eval import EvalConfig
from r1fast.pipeline_recipe import (  # noqa: F401  (re-exported: the recipe API)
    FORCED_KEYS,
    KINDS,
    OPTIONAL_ROLES,
    ComparisonSection,
    DataGenConfig,
    EvalSection,
    PipelineError,
    PipelineSection,
    Recipe,
    Stage,
    _check_comparison,
    _check_ref,
    _family,
    _model_section,
    _section,
    _stage_config,
    load_recipe,
    optimizer_steps,
)
from r1fast.rejection import EmptyKeptSetError
from r1fast.sft import SFTConfig
from r1fast.stage_io import check_checkpoint, check_file

# ---------------------------------------------------------------------------------------------------
# Stage runners. Each returns (outputs: name -> path, summary dict); rank 0 writes the pipeline's files.
# ---------------------------------------------------------------------------------------------------


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def non_reasoning_examples(n: int, *, digits: tuple[int, int], seed: int) -> list[dict]:
    """'repeat 4821' -> '<answer>4821</answer>': answered directly, without a chain of thought."""
    rng, rows = random.Random(f"non_reasoning|{seed}"), []
    for i in range(n):
        text = "".join(rng.choice("0123456789") for _ in range(rng.randint(*digits)))
        rows.append({"prompt": f"repeat {text}", "completion": f"<answer>{text}</answer>", "answer": text,
                     "task": "non_reasoning", "id": f"non_reasoning-{seed}-{i}"})
    return rows


def _run_data(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    c: DataGenConfig = stage.config
    cold = [{**s, "completion": worked_solution(s)}
            for s in generate_tasks(c.task, c.cold_start_size, seed=c.seed + 1, split="train", **c.cold_start_params)]
    files = {"cold_start": cold,
             "prompts": generate_tasks(c.task, c.prompts_size, seed=c.seed, split="train", **c.params),
             "heldout": generate_tasks(c.task, c.heldout_size, seed=c.seed, split="heldout", **c.params),
             "non_reasoning": non_reasoning_examples(c.non_reasoning_size, digits=c.non_reasoning_digits, seed=c.seed)}
    outputs = {name: os.path.join(stage_dir, f"{name}.jsonl") for name in files}
    if D.rank() == 0:
        for name, rows in files.items():
            _write_jsonl(outputs[name], rows)
    return outputs, {name: len(rows) for name, rows in files.items()}


def _run_sft(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    from r1fast.sft import run_sft

    cfg: SFTConfig = stage.config
    extra = {}
    if len(stage.inputs["data"]) > 1:  # R1's SFT mixes reasoning traces and non-reasoning data in one set
        if D.rank() == 0:
            rows = [json.loads(line) for path in stage.resolved_inputs["data"]
                    for line in open(path, encoding="utf-8") if line.strip()]
            _write_jsonl(cfg.data, rows)
        D.barrier()
        extra["train_data"] = cfg.data
    summary = run_sft(cfg)
    return {"model": os.path.abspath(summary["model_dir"]), **extra}, summary


def _run_rl(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    from r1fast.train import run
    from r1fast.train_state import latest_checkpoint

    cfg: Config = copy.deepcopy(stage.config)
    cfg.train.resume = "latest" if latest_checkpoint(stage_dir) else None  # an interrupted stage continues
    summary = D.broadcast_object(run(cfg))  # only rank 0 fills in the checkpoint path
    # the trainer's own evaluations ran on no prompts (data.eval_size = 0): the pipeline evaluates instead
    summary = {k: v for k, v in summary.items() if not k.startswith("eval_") and k != "greedy_accuracy_gain_points"}
    return {"model": os.path.abspath(summary["final_checkpoint"])}, summary


def _run_rejection(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    from r1fast.rejection import run_rejection

    try:
        result = run_rejection(stage.config)
    except EmptyKeptSetError as err:
        raise PipelineError(f"stage {stage.name!r} (rejection) kept no trace: {err}") from err
    return {"kept": os.path.abspath(result["out"])}, result["counts"]


RUNNERS = {"data": _run_data, "sft": _run_sft, "rl": _run_rl, "rejection": _run_rejection}


def _evaluate(recipe: Recipe, model_dir: str, heldout: str, out: str) -> dict:
    from r1fast.eval import run_eval

    e = recipe.eval
    cfg = EvalConfig(model=model_dir, data=heldout, template=recipe.pipeline.template, k=e.k, pass_k=(1, e.k),
                     temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                     bootstrap_resamples=e.bootstrap_resamples, out=out)
    return run_eval(cfg)


# ---------------------------------------------------------------------------------------------------
# Runner: plan (skip / run), check external inputs, run, mark, lineage, report.
# ---------------------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(recipe: Recipe, stage: Stage) -> str:
    """Hash of everything that decides the stage's outputs: its declaration, model families, template, eval."""
    families = sorted({f for refs in stage.inputs.values() for r in refs if (f := _family(recipe, r))})
    decl = {"kind": stage.kind, "inputs": stage.inputs, "config": stage.table, "template": recipe.pipeline.template,
            "models": {f: recipe.raw["models"][f] for f in families}, "eval": recipe.raw.get("eval", {})}
    return hashlib.sha256(json.dumps(decl, sort_keys=True, default=str).encode()).hexdigest()


def _marker(recipe: Recipe, stage: Stage) -> dict | None:
    path = os.path.join(recipe.run_dir, stage.name, "DONE.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def plan(recipe: Recipe) -> list[str]:
    """Names of the stages to run: unfinished, changed, or downstream of one that runs."""
    to_run: list[str] = []
    for stage in recipe.stages:
        done = _marker(recipe, stage)
        upstream = {r.partition(":")[0] for refs in stage.inputs.values() for r in refs}
        if "model" in KINDS[stage.kind][1]:
            upstream.add(recipe.eval.data.partition(":")[0])
        fresh = (done is not None and done["fingerprint"] == fingerprint(recipe, stage)
                 and all(os.path.exists(_abs(recipe, o["path"])) for o in done["outputs"].values())
                 and not upstream & set(to_run))
        if not fresh:
            to_run.append(stage.name)
    return to_run


def _abs(recipe: Recipe, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(recipe.run_dir, path)


def _rel(recipe: Recipe, path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, recipe.run_dir) if path.startswith(recipe.run_dir + os.sep) else path


def check_external_inputs(recipe: Recipe, to_run: list[str]) -> None:
    """FileNotFoundError naming the stage for a missing file: or pretrained base input of a stage that will run."""
    for stage in recipe.stages:
        if stage.name not in to_run:
            continue
        for role, refs in stage.inputs.items():
            for ref in refs:
                source, _, what = ref.partition(":")
                key = f"stages.{stage.name}.inputs.{role}"
                if source == "file":
                    (check_checkpoint if role == "model" else check_file)(what, key)
                elif source == "base" and recipe.models[what].name_or_path != "tiny":
                    check_checkpoint(recipe.models[what].name_or_path, f"models.{what}.name_or_path")


def _resolve(recipe: Recipe, markers: dict[str, dict], ref: str) -> str:
    source, _, what = ref.partition(":")
    if source == "base":
        return ref
    if source == "file":
        return os.path.abspath(what)
    return _abs(recipe, markers[source]["outputs"][what]["path"])


def _artifact(recipe: Recipe, ref: str, path: str, role: str) -> dict:
    rec = {"ref": ref, "path": path if ref.startswith("base:") else _rel(recipe, path),
           "kind": "checkpoint" if role == "model" else "data"}
    if rec["kind"] == "data":
        rec["sha256"] = sha256_file(path)
    return rec


def run_stage(recipe: Recipe, stage: Stage, markers: dict[str, dict]) -> dict:
    """Run one stage (and its held-out evaluation); returns the DONE record, written atomically by rank 0."""
    stage_dir, fp = os.path.join(recipe.run_dir, stage.name), fingerprint(recipe, stage)
    started = os.path.join(stage_dir, "STARTED.json")
    # Same declaration and the very same upstream outputs (their DONE times): only then may GRPO resume.
    key = {"fingerprint": fp, "upstream": {src: markers[src]["finished_at"] for refs in stage.inputs.values()
                                           for r in refs if (src := r.partition(":")[0]) in markers}}
    if D.rank() == 0:
        keep = stage.kind == "rl" and os.path.isfile(started) and json.load(open(started)) == key
        if keep:  # an interrupted GRPO run continues from its newest checkpoint
            shutil.rmtree(os.path.join(stage_dir, "eval"), ignore_errors=True)
            if os.path.exists(os.path.join(stage_dir, "DONE.json")):
                os.remove(os.path.join(stage_dir, "DONE.json"))
        else:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(stage_dir)
            with open(started, "w") as f:
                json.dump(key, f)
    D.barrier()
    paths = {r: _resolve(recipe, markers, r) for refs in stage.inputs.values() for r in refs}
    stage.config = _stage_config(recipe, stage, paths)
    stage.resolved_inputs = {role: [paths[r] for r in refs] for role, refs in stage.inputs.items()}
    start = time.perf_counter()
    outputs, summary = RUNNERS[stage.kind](stage, stage_dir)
    D.barrier()  # rank 0 writes the data files every rank hashes next
    train_s = time.perf_counter() - start
    metrics = None
    if "model" in outputs:
        heldout = _resolve(recipe, markers, recipe.eval.data)
        metrics = _evaluate(recipe, outputs["model"], heldout, os.path.join(stage_dir, "eval"))
    record = {
        "stage": stage.name, "kind": stage.kind, "fingerprint": fp,
        "family": _family(recipe, stage.inputs["model"][0]) if "model" in stage.inputs else None,
        "inputs": {role: [_artifact(recipe, r, paths[r], role) for r in refs] for role, refs in stage.inputs.items()},
        "outputs": {name: {"path": _rel(recipe, p), "kind": "checkpoint" if name == "model" else "data",
                           **({} if name == "model" else {"sha256": sha256_file(p)})} for name, p in outputs.items()},
        "config": dataclasses.asdict(stage.config), "summary": summary, "eval": metrics,
        "optimizer_steps": optimizer_steps(stage) if stage.kind != "sft" else summary["steps"],
        "train_s": train_s, "wall_s": time.perf_counter() - start, "finished_at": time.time(),
    }
    if D.rank() == 0:
        path = os.path.join(stage_dir, "DONE.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=2, default=str)
        os.replace(path + ".tmp", path)
    D.barrier()
    return record


def write_lineage(recipe: Recipe, markers: dict[str, dict]) -> dict:
    """lineage.json: per artifact, the stage, checkpoints and data (with sha256) that made it, and its config."""
    artifacts = {}
    for name in (s.name for s in recipe.stages if s.name in markers):
        m = markers[name]
        made_from = {"checkpoints": [], "data": []}
        for role, refs in m["inputs"].items():
            for ref in refs:
                made_from["checkpoints" if ref["kind"] == "checkpoint" else "data"].append({**ref, "role": role})
        for out_name, out in m["outputs"].items():
            artifacts[out["path"]] = {**out, "stage": name, "output": out_name, "made_from": made_from,
                                      "config": m["config"]}
    lineage = {"run_dir": recipe.run_dir, "recipe": os.path.abspath(recipe.path),
               "stages": [s.name for s in recipe.stages], "artifacts": artifacts}
    with open(os.path.join(recipe.run_dir, "lineage.json.tmp"), "w") as f:
        json.dump(lineage, f, indent=2, default=str)
    os.replace(os.path.join(recipe.run_dir, "lineage.json.tmp"), os.path.join(recipe.run_dir, "lineage.json"))
    return lineage


def run_pipeline(recipe_path: str, *, out_dir: str | None = None) -> dict:
    """Run every stage that is not already done; returns the report dict. Bad input fails before any work."""
    from r1fast.pipeline_report import write_report

    recipe = load_recipe(recipe_path, out_dir=out_dir)
    D.init_distributed()
    to_run = D.broadcast_object(plan(recipe) if D.rank() == 0 else None)
    check_external_inputs(recipe, to_run)
    if D.rank() == 0:
        os.makedirs(recipe.run_dir, exist_ok=True)
    markers = {s.name: _marker(recipe, s) for s in recipe.stages if s.name not in to_run}
    for stage in recipe.stages:
        if D.rank() == 0:
            print(f"r1fast.pipeline: {stage.name}: {'running' if stage.name in to_run else 'done, skipped'}",
                  file=sys.stderr)
        if stage.name not in to_run:
            continue
        markers[stage.name] = run_stage(recipe, stage, markers)
        if D.rank() == 0:
            write_lineage(recipe, markers)
    report = None
    if D.rank() == 0:
        write_lineage(recipe, markers)
        report = write_report(recipe, [markers[s.name] for s in recipe.stages], ran=to_run)
    D.barrier()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1fast.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe TOML (e.g. recipes/tiny_r1.toml)")
    parser.add_argument("--out_dir", default=None, help="override [pipeline].out_dir")
    args = parser.parse_args(argv)
    try:
        report = run_pipeline(args.recipe, out_dir=args.out_dir)
    except (ConfigError, PipelineError, FileNotFoundError) as err:
        print(f"r1fast.pipeline: error: {err}", file=sys.stderr)
        D.shutdown()
        return 2 if isinstance(err, ConfigError) else 1
    if D.rank() == 0:
        print(report["markdown"])
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
