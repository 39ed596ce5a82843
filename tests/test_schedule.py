"""The learning-rate schedule's warning for a warmup longer than the run."""

import warnings

import pytest
import torch

from r1fast.schedule import build_scheduler


def test_a_warmup_longer_than_the_run_warns_and_a_fitting_one_does_not():
    """5 steps with warmup 10 ran at 0.1-0.5x the configured rate and never decayed, silently."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    kw = dict(schedule="cosine", min_lr_ratio=0.1)
    with pytest.warns(UserWarning, match=r"warmup_steps=10 exceeds the run's 5 steps: .* peaks at 0\.5x"):
        sched = build_scheduler(opt, warmup_steps=10, total_steps=5, **kw)
    assert sched.get_last_lr() == [0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_scheduler(opt, warmup_steps=5, total_steps=5, **kw)  # reaches the peak on its last step
        build_scheduler(opt, warmup_steps=3, total_steps=0, **kw)  # an SFT-only run has no GRPO steps
