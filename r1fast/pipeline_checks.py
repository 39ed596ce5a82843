"""Checks of the stages a pipeline run will run, before any work (``r1fast.pipeline.run_pipeline``): the files
they read from outside the pipeline, the sizes its data stages ask of their tasks and the batches its ranks split.
The recipe's own checks run when it loads (``r1fast.pipeline_recipe.load_recipe``), ``check_tiny_positions`` among
them."""

from __future__ import annotations

from r1fast.config_io import ConfigError
from r1fast.data import generate_tasks
from r1fast.pipeline_recipe import KINDS, DataGenConfig, Recipe, _family, data_files
from r1fast.stage_io import check_checkpoint, check_file

__all__ = ["check_batch_splits", "check_data_sizes", "check_external_inputs", "check_tiny_positions"]


def check_external_inputs(recipe: Recipe, to_run: list[str]) -> None:
    """FileNotFoundError naming the key for a missing file: or pretrained base input of a stage that will run,
    and for a missing ``[eval] data = "file:..."`` (every evaluation and the report read it)."""
    source, _, what = recipe.eval.data.partition(":")
    if source == "file":
        check_file(what, "eval.data")
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


def check_data_sizes(recipe: Recipe, to_run: list[str]) -> None:
    """ConfigError naming the key when a data stage that will run asks its task for more distinct items than
    the difficulty params allow. It generates the files once more (2,200 addition items took 0.05 s; a
    shortfall gives up after 100 tries per item: 0.25 s for 200), so a later stage never trains first."""
    for stage in recipe.stages:
        if stage.name not in to_run or stage.kind != "data":
            continue
        c: DataGenConfig = stage.config
        for name, (n, split, seed, params) in data_files(c).items():
            try:
                generate_tasks(c.task, n, seed=seed, split=split, **params)
            except ValueError as err:
                raise ConfigError(f"stages.{stage.name}.config.{name}_size={n}: "
                                  f"{str(err).removeprefix('n: ')}") from err


def check_batch_splits(recipe: Recipe, to_run: list[str], world: int) -> None:
    """ConfigError naming the key when a training stage that will run has a batch ``world`` ranks cannot split
    evenly. r1fast.sft and r1fast.train refuse it only when they start: a later stage's, after the stages before
    it had trained."""
    for stage in recipe.stages:
        if stage.name not in to_run or stage.kind not in ("sft", "rl"):
            continue
        key, n = (("batch_size", stage.config.batch_size) if stage.kind == "sft"
                  else ("grpo.prompts_per_step", stage.config.grpo.prompts_per_step))
        if n % world:
            raise ConfigError(f"stages.{stage.name}.config.{key}={n} must be divisible by the {world} ranks")


def check_tiny_positions(recipe: Recipe, where: str) -> None:
    """Lengths a tiny family's positions (max_seq_len, known on load) cannot hold: a completion that leaves a prompt
    no room, an sft max_seq_len past them; they failed once the stage or its evaluation ran, after earlier stages."""
    for s in recipe.stages:
        family = _family(recipe, s.inputs["model"][0]) if "model" in s.inputs else None
        if family is None or recipe.models[family].name_or_path != "tiny":
            continue
        checks = [("eval.max_new_tokens", recipe.eval.max_new_tokens)] if "model" in KINDS[s.kind][1] else []
        if s.kind == "rl":
            checks.append((f"stages.{s.name}.config.rollout.max_new_tokens", s.config.rollout.max_new_tokens))
        if s.kind == "rejection":
            checks.append((f"stages.{s.name}.config.max_new_tokens", s.config.max_new_tokens))
        limit = recipe.models[family].max_seq_len
        if s.kind == "sft" and s.config.max_seq_len is not None and s.config.max_seq_len > limit:
            raise ConfigError(f"stages.{s.name}.config.max_seq_len={s.config.max_seq_len} exceeds models.{family}."
                              f"max_seq_len={limit}, the positions of the model this stage trains{where}")
        for key, n in checks:
            if n >= limit:
                raise ConfigError(f"{key}={n} must be < models.{family}.max_seq_len={limit}, the positions of the "
                                  f"{family} model stage {s.name!r} uses (the prompt needs room){where}")
