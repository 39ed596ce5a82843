"""R1's cold start inside ``r1fast.train``: supervised steps on worked solutions so the policy emits the template
before GRPO starts (``train.sft_steps``; the multi-stage pipeline runs ``r1fast.sft`` as a stage of its own)."""

from __future__ import annotations

import math
import sys

from r1fast import distributed as D
from r1fast.data.order import batch_indices
from r1fast.data_setup import encode_prompts
from r1fast.grpo import global_active_tokens
from r1fast.policy import pack
from r1fast.progress import progress
from r1fast.rewards.format import continue_open_think

__all__ = ["run_cold_start_sft"]


def run_cold_start_sft(trainer, start: int, max_nonfinite_in_a_row: int) -> bool:
    """SFT steps ``start`` .. ``train.sft_steps`` on ``trainer``'s policy and optimizer (an ``r1fast.train.Trainer``).

    A SIGTERM (agreed by all ranks after a step) writes a checkpoint that resumes at the next step and returns
    False; True once every step ran. A step whose loss or gradient is non-finite keeps the weights (the
    optimizer step is skipped) and is logged ``skipped_nonfinite``; ``max_nonfinite_in_a_row`` of them
    checkpoint and raise RuntimeError, as in GRPO (they were skipped silently: a cold start of NaN steps went
    on into GRPO with the untrained policy and exit status 0).
    """
    cfg, dist = trainer.cfg, trainer.dist
    t, world, rank = cfg.train, dist.world_size, dist.rank
    for group in trainer.optimizer.param_groups:
        group["lr"] = t.sft_lr
    batch = t.sft_batch_size
    eos = [trainer.tokenizer.eos_id]
    nonfinite = 0
    with progress(t.sft_steps, "cold-start SFT", enabled=None if dist.is_main else False) as bar:
        bar.advance(start)
        for step in range(start, t.sft_steps):
            idx = batch_indices(step, batch, len(trainer.sft_samples), t.seed)[rank::world]
            samples = [trainer.sft_samples[i] for i in idx]
            prompts = encode_prompts(trainer.tokenizer, samples, cfg.data.template)
            targets = [trainer.tokenizer.encode(continue_open_think(s["solution"], trainer.score.prefix(s["prompt"])))
                       + eos for s in samples]  # a template that opens <think> gets no second one
            packed = pack(prompts, targets, device=dist.device)
            tokens = float(global_active_tokens(packed.mask))
            loss = trainer.root(packed, mode="nll", normalizer=tokens / world)
            loss.backward()
            grad_norm = trainer._clip_and_step()  # the global norm; non-finite: the weights were kept
            trainer.optimizer.zero_grad(set_to_none=True)
            nll = D.all_reduce_sum(loss.detach().clone()).item() / world
            finite = math.isfinite(nll) and math.isfinite(grad_norm)
            nonfinite = 0 if finite else nonfinite + 1
            bar.advance(nll=f"{nll:.3f}")
            if (step + 1) % t.log_every == 0 or not finite:
                trainer.logger.log(step, phase="sft", nll=nll, grad_norm=grad_norm, tokens=tokens,
                                   **({} if finite else {"skipped_nonfinite": 1}))
            if nonfinite >= max_nonfinite_in_a_row:
                trainer.loop_state["sft_step"] = step + 1
                trainer._save_checkpoint()
                raise RuntimeError(f"{nonfinite} non-finite losses or gradients in a row at cold-start SFT step "
                                   f"{step + 1}; checkpoint written under {trainer.run_dir}/checkpoints")
            if step + 1 < t.sft_steps and trainer.stop.agreed(dist.device):
                # torchrun kills the workers a grace period after SIGTERM: a long SFT must not run on
                trainer.loop_state["sft_step"] = step + 1
                path = trainer._save_checkpoint()
                if dist.is_main:
                    print(f"r1fast.train: {trainer.stop.name} during the cold-start SFT: checkpoint written to "
                          f"{path} (resumes at SFT step {step + 1}); exiting", file=sys.stderr)
                return False
    trainer.loop_state.pop("sft_step", None)
    for group in trainer.optimizer.param_groups:  # GRPO starts from its own schedule
        group["lr"] = group["initial_lr"] * trainer.scheduler.lr_lambdas[0](0)
    # and from fresh AdamW moments, as a separate RL stage would: the SFT's moments moved the weights
    # 8.8e-5 at lr 1e-4 on a first GRPO step whose gradient was exactly zero
    trainer.optimizer.state.clear()
    return True
