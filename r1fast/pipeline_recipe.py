"""Recipes of the multi-stage pipeline: the TOML schema, loading, and checks done before any work.

See ``r1fast.pipeline`` for what a recipe declares; this module turns the file into a validated
``Recipe`` (stage kinds and input roles, references, forced keys, the distillation-vs-RL budget rule).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

from r1fast.config import Config, ModelConfig, check_dir_name
from r1fast.config_io import ConfigError, _apply_table, _check_tree, bounded, read_toml
from r1fast.data import MIXTURES, TASKS, generate_tasks
from r1fast.rejection import RejectionConfig
from r1fast.rewards_setup import build_scorer
from r1fast.seeding import SEED_MAX, SEED_MIN
from r1fast.sft import SFTConfig
from r1fast.stage_io import check_sampling_temperature, check_template

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


INTERRUPTED_EXIT_CODE = 143
"""Exit status after SIGTERM stopped a stage (128 + 15, what a shell reports for a process SIGTERM ended)."""


class StageInterrupted(PipelineError):
    """A signal stopped a stage after its trainer saved a checkpoint; the same command resumes it.
    ``exit_status``: 128 + that signal, as r1fast.train exits (143 SIGTERM, 130 Ctrl-C)."""

    def __init__(self, message: str, exit_status: int = INTERRUPTED_EXIT_CODE):
        super().__init__(message)
        self.exit_status = exit_status


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
    seed: int = bounded(0, ge=SEED_MIN, le=SEED_MAX)
    """Seed of every generated file."""


@dataclass
class EvalSection:
    """Held-out evaluation after every model-producing stage: the same prompts, seeds and settings each time."""

    data: str = "data:heldout"
    """Reference to the held-out JSONL."""
    k: int = bounded(4, ge=1)
    """Samples per prompt for pass@1 (averaged over k) and pass@k."""
    temperature: float = bounded(0.6, ge=0)
    """Sampling temperature (R1 evaluated at 0.6); 0 = greedy (the k samples are then identical), else at least
    1e-5 (r1fast.eval's rule)."""
    top_p: float = bounded(0.95, gt=0, le=1)
    """Nucleus mass (R1: 0.95)."""
    max_new_tokens: int = bounded(64, ge=1)
    """Longest completion."""
    bootstrap_resamples: int = bounded(200, ge=2)
    """Bootstrap resamples for the standard deviations."""
    require_answer_tag: bool = True
    """Grade math only inside <answer>...</answer> (as rewards.require_answer_tag in the rl stages); false for
    models that answer outside the R1 tags (R1-Distill, QwQ: '... </think> The answer is \\boxed{7}.')."""

    def validate(self) -> None:
        # r1fast.eval's rule, checked on load: 1e-6 failed in the evaluation after the first stage had trained
        check_sampling_temperature(self.temperature, "temperature")


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
        try:
            obj.validate()
        except ConfigError as err:  # ModelConfig's rules say "model.num_heads": name the recipe's table and file
            raise ConfigError(f"{key}: {err}{where}") from None
    return obj


def load_recipe(path: str, *, out_dir: str | None = None) -> Recipe:
    """Parse and validate ``path``: sections, stage kinds, references, configs, the comparison's budget."""
    from r1fast.pipeline_checks import check_tiny_positions  # (that module imports this one)

    raw = read_toml(path, "recipe")  # one-line errors: unreadable, not UTF-8, invalid TOML
    where = f" (in {path})"
    unknown = set(raw) - {"pipeline", "models", "eval", "comparison", "stages"}
    if unknown:
        raise ConfigError(f"unknown recipe section {sorted(unknown)[0]!r}{where}; allowed: pipeline, models, eval, "
                          "comparison, stages")
    pipe = _section(PipelineSection, raw.get("pipeline", {}), "pipeline", where)
    check_dir_name(pipe.name, "pipeline.name")  # out_dir/name: '.' would make out_dir itself the run directory
    check_template(pipe.template, "pipeline.template")  # else named as the first stage's forced config key
    if out_dir is not None:
        pipe.out_dir = out_dir
    for k, kind, form in (("models", dict, "a table of [models.<family>]"), ("stages", list, "an array of [[stages]]")):
        if not isinstance(raw.get(k, kind()), kind):  # models = 5: a traceback, not a line naming the key
            raise ConfigError(f"{k} must be {form} tables{where}")
    models = {name: _section(ModelConfig, t, f"models.{name}", where) for name, t in raw.get("models", {}).items()}
    recipe = Recipe(path, pipe, models, _section(EvalSection, raw.get("eval", {}), "eval", where),
                    _section(ComparisonSection, raw.get("comparison", {}), "comparison", where), [], raw)
    outputs: dict[str, tuple[str, ...]] = {}
    for i, t in enumerate(raw.get("stages", [])):
        key = f"stages[{i}]"
        if (not isinstance(t, dict) or set(t) - {"name", "kind", "inputs", "config"}
                or not isinstance(t.get("name"), str)
                or not all(isinstance(t.get(k, {}), dict) for k in ("inputs", "config"))):
            raise ConfigError(f"{key}: a stage has a string name, a kind, an inputs table and a config table{where}")
        name, kind = t["name"], t.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"stages.{name}.kind: {kind!r} is not one of {', '.join(KINDS)}{where}")
        # the run directory's own files: a stage named report.md ran every stage, then the report hit its directory
        if name in outputs or ":" in name or name in ("base", "file", "lineage.json", "report.json", "report.md",
                                                      ".lock"):
            raise ConfigError(f"stages.{name}: stage names must be unique, without ':', and none of base, file and the "
                              f"run directory's own lineage.json, report.json, report.md, .lock{where}")
        check_dir_name(name, f"stages[{i}].name")  # each stage writes to <run dir>/<name>
        roles, _ = KINDS[kind]
        inputs = {}
        for role, ref in t.get("inputs", {}).items():
            if role not in roles:
                raise ConfigError(f"stages.{name}.inputs.{role}: unknown input; {kind} takes {', '.join(roles)}")
            refs = ref if roles[role] else [ref]
            # an empty sft data list loaded and failed when the stage ran, on the train.jsonl the pipeline names
            if (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)
                    or not (refs or role in OPTIONAL_ROLES)):
                what = ("a ref" if not roles[role] else "a list of refs" if role in OPTIONAL_ROLES
                        else "a non-empty list of refs")
                raise ConfigError(f"stages.{name}.inputs.{role}: expected {what}{where}")
            for r in refs:
                _check_ref(r, f"stages.{name}.inputs.{role}", outputs, models, model_role=role == "model")
            inputs[role] = refs
        missing = [r for r in roles if r not in inputs and r not in OPTIONAL_ROLES]
        if missing:
            raise ConfigError(f"stages.{name}.inputs.{missing[0]}: required by kind {kind}{where}")
        table = t.get("config", {})
        for forced in FORCED_KEYS[kind]:
            head, _, leaf = forced.partition(".")
            # a non-table value there (data = 5) is left to _apply_table's "is a section" error
            if head in table and (not leaf or (isinstance(table[head], dict) and leaf in table[head])):
                raise ConfigError(f"stages.{name}.config.{forced}: set by the pipeline from inputs/[pipeline]{where}")
        stage = Stage(name, kind, inputs, table)
        stage.config = _stage_config(recipe, stage, {r: r for refs in inputs.values() for r in refs}, where)
        recipe.stages.append(stage)
        outputs[name] = KINDS[kind][1]
    if not recipe.stages:
        raise ConfigError(f"stages: the recipe declares no stage{where}")
    _check_ref(recipe.eval.data, "eval.data", outputs, models)
    _check_eval_data_order(recipe, where)
    _check_base_seeds(recipe, where)
    check_tiny_positions(recipe, where)
    _check_comparison(recipe)
    return recipe


def _check_base_seeds(recipe: Recipe, where: str) -> None:
    """A tiny family's base weights come from the seed of the stage that builds them (sft seed, rl train.seed):
    under two seeds, two base:<family> stages (the comparison's arms) started from different models, silently."""
    first: dict[str, tuple[str, int]] = {}
    for s in recipe.stages:
        ref = s.inputs.get("model", [""])[0]
        if s.kind in ("sft", "rl") and ref.startswith("base:") and recipe.models[ref[5:]].name_or_path == "tiny":
            seed = s.config.seed if s.kind == "sft" else s.config.train.seed
            name, seen = first.setdefault(ref, (s.name, seed))
            if seen != seed:
                raise ConfigError(f"stages.{s.name}: starts from {ref} with seed {seed}, stage {name!r} with seed {seen}: "
                                  f"the tiny model's initial weights come from that seed; give both one seed{where}")


def _check_eval_data_order(recipe: Recipe, where: str) -> None:
    """Every model is evaluated right after its stage, so the held-out data must exist by then."""
    source = recipe.eval.data.partition(":")[0]
    names = [s.name for s in recipe.stages]
    if source not in names:
        return
    first_model = next((s.name for s in recipe.stages if "model" in KINDS[s.kind][1]), None)
    if first_model is not None and names.index(source) > names.index(first_model):
        raise ConfigError(f"eval.data: {recipe.eval.data!r} comes from stage {source!r}, after {first_model!r}, the "
                          f"first stage whose model is evaluated; declare {source!r} before it{where}")


def _check_ref(ref: str, key: str, outputs: dict, models: dict, model_role: bool = False) -> None:
    """``ref`` names something that exists by then, and a model for a model input, data otherwise (``model_role``):
    an rl stage's model = "data:prompts" loaded and failed when the stage ran, after the stages before it."""
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
    is_model = source == "base" or (source != "file" and what == "model")  # a file: may be either
    if source != "file" and is_model != model_role:
        raise ConfigError(f"{key}: {ref!r} is {'a model' if is_model else 'a data file'}; this input takes "
                          f"{'a model' if model_role else 'a data file'}")


def _stage_config(recipe: Recipe, stage: Stage, paths: dict[str, str], where: str = ""):
    """The stage's resolved config: its table plus the values the pipeline sets (``paths``: ref -> path)."""
    run_dir, p, key = recipe.run_dir, recipe.pipeline, f"stages.{stage.name}.config"
    ins = {role: [paths[r] for r in refs] for role, refs in stage.inputs.items()}
    model = _model_section(recipe, stage.inputs["model"][0], ins["model"][0]) if "model" in ins else None
    if stage.kind == "data":
        return _check_task(_section(DataGenConfig, stage.table, key, where), key, where)
    if stage.kind == "sft":
        cfg = SFTConfig(data=ins["data"][0] if len(ins["data"]) == 1 else os.path.join(run_dir, stage.name, "train.jsonl"),
                        name=stage.name, out_dir=run_dir, template=p.template, model=model)
        _apply_table(cfg, stage.table, key + ".", where)
        return _validated(cfg, key, where)
    if stage.kind == "rl":
        cfg = Config(model=model)
        _apply_table(cfg, stage.table, key + ".", where)
        d, t = cfg.data, cfg.train
        d.task, d.template, d.eval_size, t.out_dir, t.name = ins["prompts"][0], p.template, 0, run_dir, stage.name
        if t.sft_steps:
            raise ConfigError(f"{key}.train.sft_steps={t.sft_steps}: cold-start SFT is its own sft stage here")
        cfg = _validated(cfg, key, where)
        try:  # reward names and parameters: r1fast.train checks them only once the stage runs, after earlier ones
            build_scorer(cfg)
        except ConfigError as err:
            raise ConfigError(f"{key}.{err}{where}") from None
        return cfg
    cfg = RejectionConfig(checkpoint=ins["model"][0], data=ins["prompts"][0], template=p.template,
                          out=os.path.join(run_dir, stage.name, "kept.jsonl"), decontaminate=tuple(ins.get("decontaminate", ())))
    _apply_table(cfg, stage.table, key + ".", where)
    return _validated(cfg, key, where)


def _validated(cfg, key: str, where: str):
    """``cfg.validate()`` with its errors named as the recipe's keys (``stages.<name>.config.<field>``): a bare
    "model.dtype=bfloat16 ... set parallel.fsdp=true" did not say which stage needed it."""
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{key}.{err}{where}") from None


def _check_task(cfg: DataGenConfig, key: str, where: str) -> DataGenConfig:
    """Unknown task or difficulty knob: a ConfigError on load. One sample per knob set (at most 0.5 ms: countdown)
    shows the generator accepts them; the sizes are checked before the stage runs (``check_data_sizes``)."""
    if cfg.task not in TASKS and cfg.task not in MIXTURES:
        raise ConfigError(f"{key}.task: unknown task {cfg.task!r}; allowed: {', '.join(sorted({*TASKS, *MIXTURES}))}"
                          f"{where}")
    for name in ("params", "cold_start_params"):
        try:
            generate_tasks(cfg.task, 1, seed=cfg.seed, **getattr(cfg, name))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{key}.{name}: {err}{where}") from err
    if cfg.non_reasoning_digits[0] > cfg.non_reasoning_digits[1]:  # random.randint's traceback when the stage ran
        raise ConfigError(f"{key}.non_reasoning_digits: {list(cfg.non_reasoning_digits)} is not [shortest, "
                          f"longest]{where}")
    return cfg


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


def data_files(c: DataGenConfig) -> dict[str, tuple[int, str, int, dict]]:
    """The generated task files of a data stage: name -> (size, split, seed, difficulty params)."""
    return {"cold_start": (c.cold_start_size, "train", c.seed + 1, c.cold_start_params),
            "prompts": (c.prompts_size, "train", c.seed, c.params),
            "heldout": (c.heldout_size, "heldout", c.seed, c.params)}
