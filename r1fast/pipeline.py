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

Resume: a stage is skipped when its DONE.json and outputs exist (data outputs unedited: size and mtime as
recorded, else the recorded sha256) and neither its declaration (fingerprint) nor what it consumed changed
(DONE.json ``consumed``: upstream stages' finished_at and output sha256, file: inputs' sha256, external
checkpoints' listings); a stage that runs makes its downstream run, now or after an interruption. [eval]
has its own fingerprint (with the held-out data's identity): changing it re-runs only evaluations. An
interrupted rl stage continues from its newest checkpoint; SIGTERM stops it after one with exit status 143
(130 after a Ctrl-C). Before any work, the external inputs of stages that will run, a file: [eval] data and
the sizes data stages ask of their tasks are checked: a missing file or an impossible size stops it at once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time

from r1fast import distributed as D
from r1fast.config import Config
from r1fast.config_io import ConfigError, DataError
from r1fast.eval import EvalConfig
from r1fast.pipeline_checks import check_batch_splits, check_data_sizes, check_external_inputs
from r1fast.pipeline_data import mix_sft_inputs, run_data_stage
from r1fast.pipeline_recipe import (  # noqa: F401  (re-exported: the recipe API)
    FORCED_KEYS,
    INTERRUPTED_EXIT_CODE,
    KINDS,
    OPTIONAL_ROLES,
    ComparisonSection,
    DataGenConfig,
    EvalSection,
    PipelineError,
    PipelineSection,
    Recipe,
    Stage,
    StageInterrupted,
    _check_comparison,
    _check_ref,
    _family,
    _model_section,
    _section,
    _stage_config,
    data_files,
    load_recipe,
    optimizer_steps,
)
from r1fast.rejection import EmptyKeptSetError
from r1fast.run_dir import lock_run_dir, read_json
from r1fast.safe_write import remove_tree, write_file
from r1fast.sft import SFTConfig
from r1fast.stage_io import checkpoint_identity, sha256_file
from r1fast.train_state import finish_interrupted_saves, latest_checkpoint

# ---------------------------------------------------------------------------------------------------
# Stage runners. Each returns (outputs: name -> path, summary dict); rank 0 writes the pipeline's files.
# ---------------------------------------------------------------------------------------------------


def _run_sft(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    from r1fast.sft import run_sft

    cfg: SFTConfig = stage.config
    extra, sources = {}, None
    if len(stage.inputs["data"]) > 1:  # R1's SFT mixes reasoning traces and non-reasoning data in one set
        # the limit applies per input (pipeline_data.split_limit): on the joined file it kept the first alone
        sources = mix_sft_inputs(stage.resolved_inputs["data"], stage.inputs["data"], cfg.data, cfg.limit)
        cfg = dataclasses.replace(cfg, limit=None)  # stage.config (recorded in DONE.json) keeps the limit
        extra["train_data"] = cfg.data
    summary = run_sft(cfg)
    if sources is not None:
        summary["sources"] = sources
    return {"model": os.path.abspath(summary["model_dir"]), **extra}, summary


def _run_rl(stage: Stage, stage_dir: str) -> tuple[dict, dict]:
    from r1fast.train import run

    cfg: Config = copy.deepcopy(stage.config)
    cfg.train.resume = "latest" if latest_checkpoint(stage_dir) else None  # an interrupted stage continues
    summary = D.broadcast_object(run(cfg))  # only rank 0 fills in the checkpoint path
    if "final_checkpoint" not in summary:  # the trainer saw SIGTERM, saved a checkpoint and returned early
        raise StageInterrupted(f"stage {stage.name!r} interrupted (its trainer saved a checkpoint); "
                               "rerun the same command to resume", summary.get("exit_status", INTERRUPTED_EXIT_CODE))
    if summary.get("stopped_after_finish"):  # the signal came in the final evaluation or save: stop all the same
        raise StageInterrupted(f"stage {stage.name!r} interrupted after its trainer's final checkpoint; rerun the "
                               "same command to finish it (no training step is repeated)", summary["stopped_after_finish"])
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


RUNNERS = {"data": run_data_stage, "sft": _run_sft, "rl": _run_rl, "rejection": _run_rejection}


def _evaluate(recipe: Recipe, model_dir: str, heldout: str, out: str) -> dict:
    from r1fast.eval import run_eval

    e = recipe.eval
    cfg = EvalConfig(model=model_dir, data=heldout, template=recipe.pipeline.template, k=e.k, pass_k=(1, e.k),
                     temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                     bootstrap_resamples=e.bootstrap_resamples, require_answer_tag=e.require_answer_tag, out=out)
    return run_eval(cfg)


# ---------------------------------------------------------------------------------------------------
# Runner: plan (skip / run), check external inputs, run, mark, lineage, report.
# ---------------------------------------------------------------------------------------------------


def fingerprint(recipe: Recipe, stage: Stage) -> str:
    """Hash of the stage's declaration: kind, inputs, config, model families, template. [eval] is not in it:
    an evaluation change re-runs evaluations only (``eval_fingerprint``)."""
    families = sorted({f for refs in stage.inputs.values() for r in refs if (f := _family(recipe, r))})
    decl = {"kind": stage.kind, "inputs": stage.inputs, "config": stage.table, "template": recipe.pipeline.template,
            "models": {f: recipe.raw["models"][f] for f in families}}
    return hashlib.sha256(json.dumps(decl, sort_keys=True, default=str).encode()).hexdigest()


def input_identity(recipe: Recipe, markers: dict[str, dict], ref: str, role: str) -> dict | None:
    """What ``ref`` is now (None: missing or not made yet): an earlier stage's run (its finished_at) and the
    output's sha256, a file's sha256, a checkpoint directory's listing; {} for a tiny base (its section is
    in the fingerprint)."""
    source, _, what = ref.partition(":")
    if source == "base":
        path = recipe.models[what].name_or_path
        return {} if path == "tiny" else checkpoint_identity(path)
    if source == "file":
        if role == "model":
            return checkpoint_identity(what)
        return {"sha256": sha256_file(what)} if os.path.isfile(what) else None
    m = markers.get(source)
    if m is None or what not in m["outputs"]:
        return None
    return {"finished_at": m["finished_at"], **{k: v for k, v in m["outputs"][what].items() if k == "sha256"}}


def consumed(recipe: Recipe, stage: Stage, markers: dict[str, dict]) -> dict:
    """ref -> identity of every input of ``stage`` (recorded in DONE.json, compared on resume)."""
    return {r: input_identity(recipe, markers, r, role) for role, refs in stage.inputs.items() for r in refs}


def eval_fingerprint(recipe: Recipe, markers: dict[str, dict]) -> str:
    """Hash of what decides a held-out evaluation besides the model: [eval], template, the held-out data."""
    decl = {"eval": recipe.raw.get("eval", {}), "template": recipe.pipeline.template,
            "data": input_identity(recipe, markers, recipe.eval.data, "data")}
    return hashlib.sha256(json.dumps(decl, sort_keys=True, default=str).encode()).hexdigest()


def _marker(recipe: Recipe, stage: Stage) -> dict | None:
    path = os.path.join(recipe.run_dir, stage.name, "DONE.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def plan(recipe: Recipe) -> list[str]:
    """Names of the stages to run: unfinished, changed, downstream of one that runs, or made from inputs that
    changed since (an earlier stage re-ran, e.g. in an interrupted invocation, or a file: input was edited)."""
    to_run: list[str] = []
    markers: dict[str, dict] = {}
    for stage in recipe.stages:
        done = _marker(recipe, stage)
        upstream = {r.partition(":")[0] for refs in stage.inputs.values() for r in refs}
        fresh = (done is not None and done["fingerprint"] == fingerprint(recipe, stage)
                 and all(_output_intact(recipe, o) for o in done["outputs"].values())
                 and not upstream & set(to_run)
                 and done.get("consumed") == consumed(recipe, stage, markers))  # no record (older run): stale
        if fresh:
            markers[stage.name] = done
        else:
            to_run.append(stage.name)
    return to_run


def data_identity(path: str) -> dict:
    """A data output's identity in DONE.json: its sha256, and size and mtime for ``_output_intact``'s fast check."""
    st = os.stat(path)
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _output_intact(recipe: Recipe, out: dict) -> bool:
    """Whether a finished stage's output is still what it made: a checkpoint directory exists; a data file
    has the recorded size and mtime, or else (touched, copied, or a record without them) the recorded sha256.
    Without it an output edited in place kept its stage, and those trained on it, done."""
    path = _abs(recipe, out["path"])
    if out["kind"] != "data" or "sha256" not in out:
        return os.path.exists(path)
    if not os.path.isfile(path):
        return False
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) == (out.get("size"), out.get("mtime_ns")):
        return True
    return st.st_size == out.get("size", st.st_size) and sha256_file(path) == out["sha256"]


def _abs(recipe: Recipe, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(recipe.run_dir, path)


def _rel(recipe: Recipe, path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, recipe.run_dir) if path.startswith(recipe.run_dir + os.sep) else path


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


def _write_done(stage_dir: str, record: dict) -> dict:
    """DONE.json, written atomically by rank 0; every rank gets rank 0's record (one finished_at)."""
    if D.rank() == 0:
        write_file(os.path.join(stage_dir, "DONE.json"), json.dumps(record, indent=2, default=str))
    D.barrier()
    return D.broadcast_object(record)


def run_stage(recipe: Recipe, stage: Stage, markers: dict[str, dict]) -> dict:
    """Run one stage (and its held-out evaluation); returns the DONE record, written atomically by rank 0."""
    stage_dir, fp = os.path.join(recipe.run_dir, stage.name), fingerprint(recipe, stage)
    started = os.path.join(stage_dir, "STARTED.json")
    inputs_now = consumed(recipe, stage, markers)
    # Same declaration and the very same inputs (upstream runs, file hashes): only then may GRPO resume.
    key = json.loads(json.dumps({"fingerprint": fp, "consumed": inputs_now}))
    if D.rank() == 0:
        # Only a stage with a checkpoint to resume is kept: a GRPO run killed before its first checkpoint
        # starts over here, not in r1fast.train (which would set the directory, STARTED.json with it,
        # aside as an earlier run, and the next invocation would then delete a later checkpoint).
        # A symlinked stage directory (a downloaded run) is never kept: a GRPO run would resume into its target.
        keep = stage.kind == "rl" and not os.path.islink(stage_dir) and read_json(started) == key
        if keep:  # a kill between a replaced checkpoint's two renames left it as step_<N>.tmp
            finish_interrupted_saves(stage_dir)
        keep = keep and latest_checkpoint(stage_dir) is not None
        if keep:  # an interrupted GRPO run continues from its newest checkpoint
            remove_tree(os.path.join(stage_dir, "eval"), ignore_errors=True)  # a symlink: unlinked, not followed
            if os.path.exists(os.path.join(stage_dir, "DONE.json")):
                os.remove(os.path.join(stage_dir, "DONE.json"))
        else:
            remove_tree(stage_dir, ignore_errors=True)
            os.makedirs(stage_dir)
            write_file(started, json.dumps(key))  # atomically: a torn file would stop every later invocation
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
        "stage": stage.name, "kind": stage.kind, "fingerprint": fp, "consumed": inputs_now,
        "eval_fingerprint": eval_fingerprint(recipe, markers) if "model" in outputs else None,
        "family": _family(recipe, stage.inputs["model"][0]) if "model" in stage.inputs else None,
        "inputs": {role: [_artifact(recipe, r, paths[r], role) for r in refs] for role, refs in stage.inputs.items()},
        "outputs": {name: {"path": _rel(recipe, p), "kind": "checkpoint" if name == "model" else "data",
                           **({} if name == "model" else data_identity(p))} for name, p in outputs.items()},
        "config": dataclasses.asdict(stage.config), "summary": summary, "eval": metrics,
        "optimizer_steps": optimizer_steps(stage) if stage.kind != "sft" else summary["steps"],
        "train_s": train_s, "wall_s": time.perf_counter() - start, "finished_at": time.time(),
    }
    return _write_done(stage_dir, record)


def reevaluate(recipe: Recipe, stage: Stage, record: dict, markers: dict[str, dict]) -> dict:
    """Only the held-out evaluation of a finished stage whose [eval] or held-out data changed; finished_at
    stays, so the stages made from its model stay done."""
    stage_dir = os.path.join(recipe.run_dir, stage.name)
    if D.rank() == 0:  # a symlinked eval/ is unlinked: rmtree left it, and the evaluation wrote into its target
        remove_tree(os.path.join(stage_dir, "eval"), ignore_errors=True)
    D.barrier()
    start = time.perf_counter()
    metrics = _evaluate(recipe, _abs(recipe, record["outputs"]["model"]["path"]),
                        _resolve(recipe, markers, recipe.eval.data), os.path.join(stage_dir, "eval"))
    eval_s = time.perf_counter() - start
    return _write_done(stage_dir, {**record, "eval": metrics, "eval_fingerprint": eval_fingerprint(recipe, markers),
                                   "wall_s": record["train_s"] + eval_s, "evaluated_at": time.time()})


def run_pipeline(recipe_path: str, *, out_dir: str | None = None) -> dict:
    """Run every stage that is not already done (and the evaluations whose settings or held-out data changed);
    returns the report dict. Bad input fails before any work."""
    from r1fast.pipeline_report import write_lineage, write_report

    recipe = load_recipe(recipe_path, out_dir=out_dir)
    D.init_distributed()
    lock = lock_run_dir(recipe.run_dir, PipelineError) if D.rank() == 0 else None
    to_run = D.broadcast_object(plan(recipe) if D.rank() == 0 else None)
    check_external_inputs(recipe, to_run)
    check_data_sizes(recipe, to_run)
    check_batch_splits(recipe, to_run, D.world_size())
    if D.rank() == 0:
        os.makedirs(recipe.run_dir, exist_ok=True)
    markers = {s.name: _marker(recipe, s) for s in recipe.stages if s.name not in to_run}
    for stage in recipe.stages:
        done = markers.get(stage.name)
        stale_eval = done is not None and "model" in done["outputs"] and \
            done.get("eval_fingerprint") != eval_fingerprint(recipe, markers)
        if D.rank() == 0:
            status = "running" if done is None else "done, re-evaluating" if stale_eval else "done, skipped"
            print(f"r1fast.pipeline: {stage.name}: {status}", file=sys.stderr)
        if done is None:
            markers[stage.name] = run_stage(recipe, stage, markers)
        elif stale_eval:
            markers[stage.name] = reevaluate(recipe, stage, done, markers)
        else:
            continue
        if D.rank() == 0:
            write_lineage(recipe, markers)
    report = None
    if D.rank() == 0:
        write_lineage(recipe, markers)
        report = write_report(recipe, [markers[s.name] for s in recipe.stages], ran=to_run)
    D.barrier()
    if lock is not None:  # (an exception drops it with the frame)
        lock.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1fast.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe TOML (e.g. recipes/tiny_r1.toml)")
    parser.add_argument("--out_dir", default=None, help="override [pipeline].out_dir")
    args = parser.parse_args(argv)
    try:
        report = run_pipeline(args.recipe, out_dir=args.out_dir)
    except StageInterrupted as err:
        print(f"r1fast.pipeline: {err}", file=sys.stderr)
        D.shutdown()
        return err.exit_status  # 143 after SIGTERM, 130 after Ctrl-C, as r1fast.train
    except (ConfigError, DataError, PipelineError, FileNotFoundError, PermissionError) as err:
        print(f"r1fast.pipeline: error: {err}", file=sys.stderr)
        D.shutdown()
        return 2 if isinstance(err, ConfigError) else 1
    if D.rank() == 0:
        print(report["markdown"])
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
