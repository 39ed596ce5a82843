"""The multi-stage DeepSeek-R1 recipe as one resumable run: ``python -m r1fast.pipeline --recipe FILE``.

Also ``torchrun --nproc_per_node N -m r1fast.pipeline --recipe FILE``: every stage runs on all ranks
(the trainers shard the work); rank 0 writes the pipeline's own files. A recipe (TOML) declares:

    [pipeline]        name, out_dir, template, seed                         (PipelineSection)
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
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

from r1fast import distributed as D
from r1fast.config import Config, ModelConfig
from r1fast.config_io import ConfigError, _apply_table, _check_tree, bounded
from r1fast.data import generate_tasks, worked_solution
from r1fast.eval import EvalConfig
from r1fast.rejection import EmptyKeptSetError, RejectionConfig
from r1fast.sft import SFTConfig, check_checkpoint, check_file

KINDS = {  # kind -> (input roles: True = a list of refs, outputs)
    "data": ({}, ("cold_start", "prompts", "heldout", "non_reasoning")),
    "sft": ({"model": False, "data": True}, ("model",)),
    "rl": ({"model": False, "prompts": False}, ("model",)),
    "rejection": ({"model": False, "prompts": False, "decontaminate": True}, ("kept",)),
}
OPTIONAL_ROLES = {"decontaminate"}
FORCED_KEYS = {  # set from inputs and [pipeline]; a stage's config may not set them
    "sft": ("data", "name", "out_dir", "template", "model"),
    "rl": ("model", "data.task", "data.template", "data.eval_size", "train.out_dir", "train.name", "train.resume"),
    "rejection": ("checkpoint", "data", "out", "template", "decontaminate"),
    "data": (),
}


class PipelineError(RuntimeError):
    """A stage failed for a reason the recipe's author must fix; the message names the stage."""


@dataclass
class PipelineSection:
    """Where the run goes and what every stage shares."""

    name: str = "tiny_r1"
    """Run name; outputs go to out_dir/name."""
    out_dir: str = "runs"
    """Directory holding one subdirectory per pipeline run."""
    template: str = "compact"
    """Prompt template of every stage (training, sampling and evaluation must agree)."""


@dataclass
class DataGenConfig:
    """The data stage: generated task files (R1's cold-start, RL prompts, held-out, non-reasoning data)."""

    task: str = "addition"
    """Built-in generated task (r1fast.data.TASKS) of the cold-start, prompt and held-out files."""
    params: dict[str, int] = field(default_factory=dict)
    """Difficulty knobs of the RL / rejection prompts and of the held-out set."""
    prompts_size: int = bounded(2000, ge=1)
    """RL and rejection-sampling prompts (train split)."""
    heldout_size: int = bounded(200, ge=1)
    """Held-out prompts every stage is evaluated on (heldout split: disjoint from all training data)."""
    cold_start_params: dict[str, int] = field(default_factory=dict)
    """Difficulty knobs of the cold-start worked solutions."""
    cold_start_size: int = bounded(2000, ge=1)
    """Cold-start worked solutions ({"prompt", "completion"} with <think> steps)."""
    non_reasoning_size: int = bounded(500, ge=0)
    """Non-reasoning examples: 'repeat <digits>' answered directly, without <think> (R1 mixes such data in)."""
    non_reasoning_digits: tuple[int, int] = bounded((2, 6), ge=1)
    """Shortest and longest digit string of the non-reasoning examples."""
    seed: int = 0
    """Seed of every generated file."""


@dataclass
class EvalSection:
    """Held-out evaluation after every model-producing stage: the same prompts, seeds and settings each time."""

    data: str = "data:heldout"
    """Reference to the held-out JSONL."""
    k: int = bounded(4, ge=1)
    """Samples per prompt for pass@1 (averaged over k) and pass@k."""
    temperature: float = bounded(0.6, gt=0)
    """Sampling temperature (R1 evaluated at 0.6)."""
    top_p: float = bounded(0.95, gt=0, le=1)
    """Nucleus mass (R1: 0.95)."""
    max_new_tokens: int = bounded(64, ge=1)
    """Longest completion."""
    bootstrap_resamples: int = bounded(200, ge=2)
    """Bootstrap resamples for the standard deviations."""


@dataclass
class ComparisonSection:
    """Distillation vs RL alone for the student, at the same total optimizer steps."""

    distilled: list[str] = field(default_factory=list)
    """Stages of the distilled student, in order (the last one's evaluation is compared)."""
    rl_only: list[str] = field(default_factory=list)
    """Stages of the RL-alone student (cold-start SFT + GRPO), in order."""


@dataclass
class Stage:
    name: str
    kind: str
    inputs: dict[str, list[str]]
    table: dict
    config: object = None
    resolved_inputs: dict[str, list[str]] = field(default_factory=dict)
    """role -> paths, set right before the stage runs."""


@dataclass
class Recipe:
    path: str
    pipeline: PipelineSection
    models: dict[str, ModelConfig]
    eval: EvalSection
    comparison: ComparisonSection
    stages: list[Stage]
    raw: dict

    @property
    def run_dir(self) -> str:
        return os.path.abspath(os.path.join(self.pipeline.out_dir, self.pipeline.name))


# ---------------------------------------------------------------------------------------------------
# Recipe: parse and check everything before any work.
# ---------------------------------------------------------------------------------------------------


def _section(schema: type, table: dict, key: str, where: str):
    if not isinstance(table, dict):
        raise ConfigError(f"{key} must be a table{where}")
    obj = schema()
    _apply_table(obj, table, f"{key}.", where)
    _check_tree(obj, "")
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_recipe(path: str, *, out_dir: str | None = None) -> Recipe:
    """Parse and validate ``path``: sections, stage kinds, references, configs, the comparison's budget."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path!r}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
    where = f" (in {path})"
    unknown = set(raw) - {"pipeline", "models", "eval", "comparison", "stages"}
    if unknown:
        raise ConfigError(f"unknown recipe section {sorted(unknown)[0]!r}{where}; allowed: pipeline, models, eval, "
                          "comparison, stages")
    pipe = _section(PipelineSection, raw.get("pipeline", {}), "pipeline", where)
    if out_dir is not None:
        pipe.out_dir = out_dir
    models = {name: _section(ModelConfig, t, f"models.{name}", where) for name, t in raw.get("models", {}).items()}
    recipe = Recipe(path, pipe, models, _section(EvalSection, raw.get("eval", {}), "eval", where),
                    _section(ComparisonSection, raw.get("comparison", {}), "comparison", where), [], raw)
    outputs: dict[str, tuple[str, ...]] = {}
    for i, t in enumerate(raw.get("stages", [])):
        key = f"stages[{i}]"
        if set(t) - {"name", "kind", "inputs", "config"} or not isinstance(t.get("name"), str):
            raise ConfigError(f"{key}: a stage has a string name, a kind, inputs and config{where}")
        name, kind = t["name"], t.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"stages.{name}.kind: {kind!r} is not one of {', '.join(KINDS)}{where}")
        if name in outputs or ":" in name or name in ("base", "file"):
            raise ConfigError(f"stages.{name}: stage names must be unique and not contain ':'{where}")
        roles, _ = KINDS[kind]
        inputs = {}
        for role, ref in t.get("inputs", {}).items():
            if role not in roles:
                raise ConfigError(f"stages.{name}.inputs.{role}: unknown input; {kind} takes {', '.join(roles)}")
            refs = ref if roles[role] else [ref]
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise ConfigError(f"stages.{name}.inputs.{role}: expected {'a list of refs' if roles[role] else 'a ref'}")
            for r in refs:
                _check_ref(r, f"stages.{name}.inputs.{role}", outputs, models)
            inputs[role] = refs
        missing = [r for r in roles if r not in inputs and r not in OPTIONAL_ROLES]
        if missing:
            raise ConfigError(f"stages.{name}.inputs.{missing[0]}: required by kind {kind}{where}")
        table = t.get("config", {})
        for forced in FORCED_KEYS[kind]:
            head, _, leaf = forced.partition(".")
            if head in table and (not leaf or leaf in table[head]):
                raise ConfigError(f"stages.{name}.config.{forced}: set by the pipeline from inputs/[pipeline]{where}")
        stage = Stage(name, kind, inputs, table)
        stage.config = _stage_config(recipe, stage, {r: r for refs in inputs.values() for r in refs}, where)
        recipe.stages.append(stage)
        outputs[name] = KINDS[kind][1]
    if not recipe.stages:
        raise ConfigError(f"stages: the recipe declares no stage{where}")
    _check_ref(recipe.eval.data, "eval.data", outputs, models)
    _check_comparison(recipe)
    return recipe


def _check_ref(ref: str, key: str, outputs: dict, models: dict) -> None:
    source, sep, what = ref.partition(":")
    if not sep or not what:
        raise ConfigError(f"{key}: {ref!r} is not a reference (base:<family>, <stage>:<output>, file:<path>)")
    if source == "base" and what not in models:
        raise ConfigError(f"{key}: {ref!r} names no [models.{what}] section")
    if source not in ("base", "file"):
        if source not in outputs:
            raise ConfigError(f"{key}: {ref!r} names no earlier stage {source!r}")
        if what not in outputs[source]:
            raise ConfigError(f"{key}: stage {source!r} has no output {what!r} (it has {', '.join(outputs[source])})")


def _stage_config(recipe: Recipe, stage: Stage, paths: dict[str, str], where: str = ""):
    """The stage's resolved config: its table plus the values the pipeline sets (``paths``: ref -> path)."""
    run_dir, p, key = recipe.run_dir, recipe.pipeline, f"stages.{stage.name}.config"
    ins = {role: [paths[r] for r in refs] for role, refs in stage.inputs.items()}
    model = _model_section(recipe, stage.inputs["model"][0], ins["model"][0]) if "model" in ins else None
    if stage.kind == "data":
        return _section(DataGenConfig, stage.table, key, where)
    if stage.kind == "sft":
        cfg = SFTConfig(data=ins["data"][0] if len(ins["data"]) == 1 else os.path.join(run_dir, stage.name, "train.jsonl"),
                        name=stage.name, out_dir=run_dir, template=p.template, model=model)
        _apply_table(cfg, stage.table, key + ".", where)
        return cfg.validate()
    if stage.kind == "rl":
        cfg = Config(model=model)
        _apply_table(cfg, stage.table, key + ".", where)
        d, t = cfg.data, cfg.train
        d.task, d.template, d.eval_size, t.out_dir, t.name = ins["prompts"][0], p.template, 0, run_dir, stage.name
        if t.sft_steps:
            raise ConfigError(f"{key}.train.sft_steps={t.sft_steps}: cold-start SFT is its own sft stage here")
        return cfg.validate()
    cfg = RejectionConfig(checkpoint=ins["model"][0], data=ins["prompts"][0], template=p.template,
                          out=os.path.join(run_dir, stage.name, "kept.jsonl"), decontaminate=tuple(ins.get("decontaminate", ())))
    _apply_table(cfg, stage.table, key + ".", where)
    return cfg.validate()


def _model_section(recipe: Recipe, ref: str, path: str) -> ModelConfig:
    """The family's model section for ``base:`` (or a stage's checkpoint of that family), else a bare checkpoint."""
    family = _family(recipe, ref)
    model = copy.deepcopy(recipe.models[family]) if family else ModelConfig()
    if not ref.startswith("base:"):
        model.name_or_path = path
    return model


def _family(recipe: Recipe, ref: str) -> str | None:
    source, _, what = ref.partition(":")
    if source == "base":
        return what
    stage = next((s for s in recipe.stages if s.name == source), None)
    return _family(recipe, stage.inputs["model"][0]) if stage is not None and "model" in stage.inputs else None


def optimizer_steps(stage: Stage) -> int | None:
    """Optimizer steps a training stage takes (None: sft with steps = 0 depends on the data size)."""
    cfg = stage.config
    if stage.kind == "rl":
        return cfg.train.steps * cfg.grpo.updates_per_rollout
    if stage.kind == "sft":
        return cfg.steps or None
    return 0


def _check_comparison(recipe: Recipe) -> None:
    c, by_name = recipe.comparison, {s.name: s for s in recipe.stages}
    if not (c.distilled or c.rl_only):
        return
    totals = {}
    for arm in ("distilled", "rl_only"):
        names = getattr(c, arm)
        if not names or any(n not in by_name for n in names):
            raise ConfigError(f"comparison.{arm}: expected a list of declared stages, got {names}")
        steps = [optimizer_steps(by_name[n]) for n in names]
        if None in steps:
            raise ConfigError(f"comparison.{arm}: sft stages compared need explicit steps (the budget is optimizer steps)")
        totals[arm] = sum(steps)
    if totals["distilled"] != totals["rl_only"]:
        raise ConfigError(f"comparison: the arms must take the same total optimizer steps; distilled takes "
                          f"{totals['distilled']}, rl_only {totals['rl_only']}")


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
    summary = run(cfg)
    summary = D.broadcast_object(summary)  # only rank 0 fills in the checkpoint path
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
    if D.rank() == 0:
        keep = stage.kind == "rl" and os.path.isfile(started) and json.load(open(started))["fingerprint"] == fp
        if keep:  # an interrupted GRPO run of the same declaration continues from its newest checkpoint
            shutil.rmtree(os.path.join(stage_dir, "eval"), ignore_errors=True)
            if os.path.exists(os.path.join(stage_dir, "DONE.json")):
                os.remove(os.path.join(stage_dir, "DONE.json"))
        else:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.makedirs(stage_dir)
            with open(started, "w") as f:
                json.dump({"fingerprint": fp}, f)
    D.barrier()
    paths = {r: _resolve(recipe, markers, r) for refs in stage.inputs.values() for r in refs}
    stage.config = _stage_config(recipe, stage, paths)
    stage.resolved_inputs = {role: [paths[r] for r in refs] for role, refs in stage.inputs.items()}
    start = time.perf_counter()
    outputs, summary = RUNNERS[stage.kind](stage, stage_dir)
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
        "train_s": train_s, "wall_s": time.perf_counter() - start,
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
        if stage.name not in to_run:
            print(f"r1fast.pipeline: {stage.name}: done, skipped", file=sys.stderr)
            continue
        print(f"r1fast.pipeline: {stage.name}: running ({stage.kind})", file=sys.stderr)
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
