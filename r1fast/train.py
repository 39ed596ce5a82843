"""GRPO training, the main job: ``torchrun [--nproc_per_node N] -m r1fast.train [--config X.toml] [--a.b v ...]``.

One step: each rank takes its shard of P prompts, samples G completions per prompt with the rollout
engine on the live (unsharded) weights, scores them with the rule-based rewards, computes group
advantages over the global batch, and runs ``updates_per_rollout`` optimizer updates on the fused GRPO
loss (FSDP2 over all ranks). Without ``--config`` the built-in tiny recipe runs
(``recipes/tiny_r1_zero.toml``): a tiny model built in code with the character tokenizer, a short
cold-start SFT on worked solutions, then GRPO on harder instances.

Outputs under ``<train.out_dir>/<train.name>/``: config.toml (a fresh run's config; each resume adds
config.resume-<checkpoint>.toml), metrics.jsonl, summary.json, training_curves.png, checkpoints/step_<N>/
(model/: HF model + tokenizer; resume state); the last one's model/ is the final model (``summary.json``'s
``final_checkpoint``). A fresh run into a directory that holds an earlier run moves that run to
``<name>.prev-<time>`` first; a run into a live one is refused (lock ``<train.out_dir>/.<train.name>.lock``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from r1fast import distributed as D
from r1fast.checkpoint import resolve_dtype
from r1fast.cold_start import run_cold_start_sft
from r1fast.config import Config, ConfigError, load_config, parse_cli
from r1fast.config_checks import check_fp8_experts
from r1fast.config_io import run_cli
from r1fast.data.order import batch_indices
from r1fast.data_setup import build_datasets, build_model, build_tokenizer, encode_prompts
from r1fast.evaluation import evaluate
from r1fast.grpo_step import RolloutBatch, build_rollout_batch, train_on_batch
from r1fast.memory_budget import fp8_expert_copy_bytes, training_reserve_bytes
from r1fast.metrics import MetricsLogger, read_metrics
from r1fast.parallelize import (
    apply_activation_checkpointing,
    apply_fsdp,
    build_mesh,
    clip_and_step,
    enable_fp8_experts,
    master_and_compute_dtypes,
    release_one_rank_group,
    unsharded_for_rollout,
)
from r1fast.policy import PolicyHead
from r1fast.progress import progress
from r1fast.rewards_setup import build_scorer
from r1fast.rollout import Engine
from r1fast.run_dir import lock_beside, save_run_config, set_aside_earlier_run
from r1fast.safe_write import write_file
from r1fast.schedule import apply_optimizer_config, build_scheduler
from r1fast.seeding import rollout_seeds
from r1fast.stage_io import checked_template, completion_prefix, stop_token_ids
from r1fast.stop_flag import StopFlag
from r1fast.train_checks import (
    check_batch_split,
    check_data_order,
    check_golds,
    check_shared_run_dir,
    data_order_fingerprint,
    fit_kv_cache,
    fit_lengths,
    resolve_resume,
)
from r1fast.train_state import load_checkpoint, rewind_run_dir, save_checkpoint

MAX_NONFINITE_IN_A_ROW = 3
"""Consecutive non-finite losses after which the run checkpoints and aborts (one is skipped and logged)."""


def default_recipe() -> str:
    """The built-in tiny recipe, ``recipes/tiny_r1_zero.toml`` (installed as package data of r1fast.recipes)."""
    from importlib.resources import files

    return str(files("r1fast.recipes") / "tiny_r1_zero.toml")


class Trainer:
    """Holds the run's pieces; ``run()`` does cold-start SFT (if any), GRPO steps and evaluation."""

    def __init__(self, cfg: Config, dist: D.DistInfo):
        self.cfg, self.dist = cfg, dist
        t = cfg.train
        self.run_dir = os.path.join(t.out_dir, t.name)
        check_shared_run_dir(cfg, self.run_dir)  # before any work: a first save on another disk failed at the end
        torch.manual_seed(t.seed)
        self.compute_dtype = resolve_dtype(cfg.model.dtype)  # bf16: fp32 master weights, gathered in bf16 by FSDP2
        master, param_dtype = master_and_compute_dtypes(self.compute_dtype)
        # data, template, reward and batch mistakes fail before the model loads (minutes for a 7B; the tiny
        # recipe's data and tokenizer take ~0.1 s)
        self.tokenizer = build_tokenizer(cfg.model)
        self.sft_samples, self.train_samples, self.eval_samples = build_datasets(cfg)
        self.tokenizer.prompt_template = checked_template(self.tokenizer, cfg.data.template, "data.template")  # saved
        self.train_prompt_ids = encode_prompts(self.tokenizer, self.train_samples, cfg.data.template)
        self.eval_prompt_ids = encode_prompts(self.tokenizer, self.eval_samples, cfg.data.template)
        self.score = build_scorer(cfg, completion_prefix=completion_prefix(self.tokenizer, cfg.data.template))
        self.score.check_samples(self.train_samples + self.eval_samples)
        check_golds(self.score, self.train_samples, cfg.data.task)  # none parsable: all steps skipped, exit 0
        check_batch_split(cfg, dist.world_size)
        check_fp8_experts(cfg.parallel.fp8_experts, cfg.model.name_or_path)  # from config.json, before the load
        # before the model loads, and before anything is written into the run dir
        self.resume_from = resolve_resume(t.resume, self.run_dir)
        all_prompts, all_samples = self.train_prompt_ids + self.eval_prompt_ids, self.train_samples + self.eval_samples
        if cfg.rollout.num_blocks is not None:  # its size is known now; otherwise once the engine sized it
            fit_kv_cache(cfg, all_prompts, all_samples, cfg.rollout.num_blocks * cfg.rollout.block_size)
        self.sft_samples = fit_lengths(cfg, self.tokenizer, all_prompts, self.sft_samples, all_samples)
        self.model = model = build_model(cfg, self.tokenizer, dist.device, master)
        self.stop_ids = stop_token_ids(self.tokenizer, model.args)
        self.mesh = build_mesh(dist.device.type, dist.world_size, dist.local_world_size,
                               one_rank=param_dtype is not None) if cfg.parallel.fsdp else None
        self.ref_root, ref = None, None
        if cfg.grpo.beta > 0:  # frozen copy, refreshed every ref_update_steps; not allocated when beta = 0
            ref = type(model).from_config(model.args, device=dist.device, dtype=self.compute_dtype)  # no masters
            ref.load_state_dict(model.state_dict())
            ref.requires_grad_(False)
            # no backward follows the reference's forward: reshard its root too, or its parameters stay gathered
            self.ref_root = apply_fsdp(PolicyHead(ref), self.mesh, reshard_root_after_forward=True)
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.root = apply_fsdp(PolicyHead(model), self.mesh, param_dtype=param_dtype)
        self.optimizer = torch.optim.AdamW(self.root.parameters(), lr=t.lr, betas=tuple(t.betas),
                                           weight_decay=t.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=t.warmup_steps, total_steps=t.steps,
                                         schedule=t.schedule, min_lr_ratio=t.min_lr_ratio)
        # FP8 experts for training and rollout alike; the cache re-quantizes after every optimizer step
        self.fp8_cache = None
        if cfg.parallel.fp8_experts:
            try:
                self.fp8_cache = enable_fp8_experts(model, self.optimizer, frozen=(ref,) if ref is not None else ())
            except ValueError as err:  # a dense model: a config mistake, reported in one line
                raise ConfigError(f"parallel.fp8_experts=true: {err}") from None
        r = cfg.rollout
        self.engine = Engine(model, block_size=r.block_size, num_blocks=r.num_blocks, dtype=self.compute_dtype,
                             memory_fraction=r.memory_fraction, max_batch_tokens=r.max_batch_tokens,
                             reserve_bytes=training_reserve_bytes(self.root, self.optimizer, self.compute_dtype)
                             + (fp8_expert_copy_bytes(self.root, self.ref_root) if self.fp8_cache else 0))
        if r.num_blocks is None:  # an explicit size was checked before the load
            # before any file is written; the smallest rank's cache, so all ranks raise together (CUDA sizes it
            # from each GPU's free memory)
            fit_kv_cache(cfg, all_prompts, all_samples, min(D.all_gather_object(self.engine.cache.capacity_tokens)))
        if t.resume is None:
            set_aside_earlier_run(self.run_dir)
        self.logger: MetricsLogger | None = None  # opened by run(), once a resume has trimmed metrics.jsonl
        self.stop = StopFlag()
        self.step = 0
        self.loop_state: dict = {}

    # -- phases -------------------------------------------------------------------------------------
    def evaluate(self, tag: str) -> dict | None:
        """Held-out accuracy, logged under ``tag``; None with data.eval_size = 0 (accuracy 0.0 of 0 prompts
        read as a model that got everything wrong)."""
        cfg = self.cfg
        if not self.eval_samples:
            return None
        with unsharded_for_rollout(self.root):
            result = evaluate(self.engine, self.tokenizer, self.eval_samples, self.eval_prompt_ids, self.score.check_batch,
                              max_new_tokens=cfg.rollout.max_new_tokens, k=cfg.train.eval_samples,
                              seed=cfg.train.seed)
        self.logger.log(self.step, phase="eval", tag=tag, **result)
        return result

    def cold_start_sft(self, start: int = 0) -> bool:
        """R1's cold start, SFT steps ``start`` .. ``train.sft_steps`` (``r1fast.cold_start``); False when a
        SIGTERM wrote a checkpoint that resumes there, True once every step ran."""
        return run_cold_start_sft(self, start, MAX_NONFINITE_IN_A_ROW)

    def _clip_and_step(self) -> float:
        return clip_and_step(self.root, self.optimizer, self.cfg.train.grad_clip,
                             self.mesh is None and self.dist.world_size > 1)

    def rollout(self, step: int) -> RolloutBatch:
        """This rank's prompts of ``step`` and their G completions, scored; advantages over the global batch."""
        g, world, rank = self.cfg.grpo, self.dist.world_size, self.dist.rank
        # a stream of seeded epoch permutations cut in steps: every prompt once per epoch even when the
        # epoch does not split into whole steps (10 prompts, P = 4 drew some 3 times in 2 epochs, some once)
        global_idx = batch_indices(step, g.prompts_per_step, len(self.train_samples), self.cfg.data.seed)
        mine = list(range(rank, g.prompts_per_step, world))
        r = self.cfg.rollout
        seeds = rollout_seeds(self.cfg.train.seed, step, mine, g.samples_per_prompt)  # valid for any train.seed
        with unsharded_for_rollout(self.root):
            completions = self.engine.generate([self.train_prompt_ids[global_idx[i]] for i in mine],
                                               n=g.samples_per_prompt, max_new_tokens=r.max_new_tokens,
                                               temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                               seed=seeds, stop_token_ids=self.stop_ids)
        samples = [self.train_samples[global_idx[i]] for i in mine]
        prompts = [self.train_prompt_ids[global_idx[i]] for i in mine]
        return build_rollout_batch(self.cfg, self.tokenizer, self.score, samples, prompts, completions,
                                   device=self.dist.device)

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resume_from = self.resume_from
        summary: dict = {}
        sft_from = 0 if resume_from is None and t.sft_steps else None  # the SFT step to run from, if any
        data_order = data_order_fingerprint(cfg, self.sft_samples, self.train_samples)
        if resume_from is not None:
            self.step, self.loop_state = load_checkpoint(resume_from, self.root, self.optimizer, self.scheduler,
                                                         reference=self.ref_root)
            check_data_order(resume_from, self.loop_state, data_order)
            apply_optimizer_config(self.optimizer, self.scheduler, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
            if self.fp8_cache is not None:
                self.fp8_cache.invalidate()  # the weights were replaced in place
            summary.update(self.loop_state.get("summary", {}))
            sft_from = self.loop_state.get("sft_step")  # a checkpoint written mid-SFT
            rewind_run_dir(self.run_dir, resume_from, self.step, sft_from)  # later checkpoints and metrics
        self.loop_state["data_order"] = data_order
        if self.dist.is_main:  # only now: a failed resume left config.toml and an empty metrics.jsonl behind
            resumed = None if resume_from is None else os.path.basename(os.path.normpath(resume_from)) + (
                "" if sft_from is None else f"-sft_{sft_from}")  # every mid-SFT checkpoint is step_0
            save_run_config(cfg, self.run_dir, resumed)  # config.toml stays the fresh run's config
        self.logger = MetricsLogger(self.run_dir, rank=self.dist.rank)
        if resume_from is None and t.sft_steps:
            summary["eval_initial"] = self.evaluate("initial")
        if sft_from is not None:
            self.loop_state["summary"] = summary
            if not self.cold_start_sft(sft_from):
                return {**summary, "exit_status": self.stop.exit_status}
            self._refresh_reference()  # KL is measured from where RL starts, not from the untrained model
        if resume_from is None or sft_from is not None:
            summary["eval_before_rl"] = self.evaluate("before_rl")
        nonfinite = self.loop_state.get("nonfinite_in_a_row", 0)  # "N in a row, then abort" spans a resume
        with progress(t.steps, "GRPO", enabled=None if self.dist.is_main else False) as bar:
            bar.advance(self.step)
            while self.step < t.steps:
                metrics = self.grpo_step(self.step)
                nonfinite = nonfinite + 1 if metrics.get("skipped_nonfinite") else 0
                self.step += 1
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.logger.log(self.step, phase="rl", **metrics)
                bar.advance(1, reward=f"{metrics['reward_mean']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    self.evaluate(f"step_{self.step}")
                self.loop_state["summary"] = summary
                self.loop_state["nonfinite_in_a_row"] = nonfinite
                if nonfinite >= MAX_NONFINITE_IN_A_ROW:
                    self._save_checkpoint()
                    raise RuntimeError(f"{nonfinite} non-finite losses or gradients in a row at step {self.step}; "
                                       f"checkpoint written under {self.run_dir}/checkpoints")
                if self.stop.agreed(self.dist.device):
                    path = self._save_checkpoint()
                    if self.dist.is_main:
                        print(f"r1fast.train: {self.stop.name}: checkpoint written to {path}; exiting", file=sys.stderr)
                    return {**summary, "exit_status": self.stop.exit_status}
                if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                    self._save_checkpoint()
        # a signal from here on is not acted on: the run is finished, writes its final checkpoint and summary and
        # exits 0 (a resume would have only this evaluation left; torchrun's kill after its grace period is safe)
        summary["eval_after_rl"] = self.evaluate("after_rl")
        self._finish(summary)
        if self.stop.agreed(self.dist.device):  # the signal is not lost: a caller with more to do (the pipeline) stops
            return {**summary, "stopped_after_finish": self.stop.exit_status}
        return summary

    def grpo_step(self, step: int) -> dict:
        times = {}
        t0 = time.perf_counter()
        batch = self.rollout(step)
        times["time_rollout_s"] = time.perf_counter() - t0 - batch.reward_seconds
        times["time_reward_s"] = batch.reward_seconds
        t1 = time.perf_counter()
        if self.cfg.grpo.ref_update_steps and step % self.cfg.grpo.ref_update_steps == 0 and step > 0:
            self._refresh_reference()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's updates use
        metrics = train_on_batch(self.cfg, self.root, self.ref_root, batch, self._clip_and_step, self.optimizer,
                                 self.dist.world_size)
        if _updated(metrics, self.cfg.grpo.updates_per_rollout):
            # the schedule counts GRPO steps that updated the weights (its updates_per_rollout updates share one
            # rate): a step without an update (all groups dropped or skipped, non-finite losses) stepped it anyway,
            # with torch's "lr_scheduler.step() before optimizer.step()" warning when that was the first RL step
            self.scheduler.step()
        times["time_train_s"] = time.perf_counter() - t1
        # fp64: an fp32 count is exact only to 2**24 = 16.7M tokens per step
        gen_tokens = D.all_reduce_sum(torch.tensor([float(batch.generated_tokens)], dtype=torch.float64)).item()
        times["generated_tokens_per_s"] = gen_tokens / max(times["time_rollout_s"], 1e-9)
        return {**batch.metrics, **metrics, **times, "lr": lr}

    # -- bookkeeping --------------------------------------------------------------------------------
    def _refresh_reference(self) -> None:
        """Copy the policy into the frozen KL reference (no-op without one)."""
        if self.ref_root is None:
            return
        with torch.no_grad():  # both sharded alike under FSDP2 (the reference reshards after forward)
            for p_ref, p in zip(self.ref_root.parameters(), self.root.parameters(), strict=True):
                p_ref.copy_(p)
        if self.fp8_cache is not None:
            # FSDP2 gathers the new values without bumping the unsharded weights' versions, and after a step
            # whose updates were all skipped no optimizer step invalidated the cache: the reference's FP8 copies
            # were the pre-refresh weights
            self.fp8_cache.invalidate()

    def _save_checkpoint(self) -> str:
        return save_checkpoint(self.run_dir, self.step, self.root, self.model, self.optimizer, self.scheduler,
                               self.loop_state, self.tokenizer, reference=self.ref_root, hf_dtype=self.compute_dtype,
                               keep_last=self.cfg.train.keep_last)

    def _finish(self, summary: dict) -> None:
        final = self._save_checkpoint()
        if not self.dist.is_main:
            return
        before, after = summary.get("eval_before_rl"), summary.get("eval_after_rl")
        if before and after:
            summary["greedy_accuracy_gain_points"] = 100 * (after["greedy_accuracy"] - before["greedy_accuracy"])
        summary["final_checkpoint"] = os.path.join(final, "model")
        summary["steps"] = self.step
        summary["world_size"] = self.dist.world_size
        write_file(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))  # never via a link
        from r1fast.plots import plot_training_curves

        plot_training_curves(read_metrics(self.run_dir), os.path.join(self.run_dir, "training_curves.png"),
                             title=f"{self.cfg.train.name}: GRPO on {self.cfg.data.task}")


def _updated(metrics: dict, updates_per_rollout: int) -> bool:
    """Whether ``train_on_batch`` stepped the optimizer at least once (both flags agree on every rank)."""
    return not metrics.get("skipped_empty") and metrics.get("skipped_nonfinite", 0) < updates_per_rollout


def run(cfg: Config) -> dict:
    """Programmatic entry (tests, the multi-stage pipeline): train with ``cfg``; returns the summary (with
    ``exit_status``, 128 + the signal, when a signal stopped the run after a checkpoint; with
    ``stopped_after_finish``, the same number, when the signal came in the final evaluation or save of a run
    that finished: r1fast.train exits 0 then, the pipeline stops before its next step)."""
    dist = D.init_distributed(cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    run_lock = None
    try:  # from before Trainer(): its constructor can fail after build_mesh made the 1-rank group
        # before Trainer() touches the run directory (shared-disk check, resume, set-aside) and held to the end:
        # a second run into a live one moved it aside and both wrote step_2/4/6 into one checkpoints/
        run_lock = lock_beside(os.path.join(cfg.train.out_dir, cfg.train.name), ConfigError,
                               keys=("train.out_dir", "train.name"))
        trainer = Trainer(cfg, dist)
        trainer.stop.install()  # SIGTERM and a first Ctrl-C: checkpoint after the current step, then exit
        try:
            return trainer.run()
        finally:
            trainer.stop.uninstall()
            if trainer.logger is not None:  # also on a stop signal or an error: a pipeline runs many stages
                trainer.logger.close()
    finally:
        if run_lock is not None:  # on an error or a signal too: a pipeline or a test goes on in this process
            run_lock.close()
        release_one_rank_group()


def main(argv: list[str] | None = None) -> int:
    return run_cli("r1fast.train", lambda: _main(argv), user_errors=(FileNotFoundError, PermissionError))


def _main(argv: list[str] | None) -> int:
    path, overrides = parse_cli(argv, default_config=default_recipe())
    cfg = load_config(path if path is not None else default_recipe(), overrides)
    summary = run(cfg)  # errors found once the data, model or ranks are known are ConfigErrors too
    if D.rank() == 0 and "eval_after_rl" in summary:
        print(json.dumps({k: summary[k] for k in ("eval_before_rl", "eval_after_rl") if k in summary}, indent=1))
    D.shutdown()
    # interrupted (a checkpoint was written): 128 + the signal (143 SIGTERM, 130 Ctrl-C), as a killed process,
    # so a scheduler tells an unfinished run from a finished one
    return summary.get("exit_status", 0)


if __name__ == "__main__":
    sys.exit(main())
