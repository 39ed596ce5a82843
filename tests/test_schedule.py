"""The learning-rate schedule: linear warmup (step + 1) / W, then constant or cosine to min_lr_ratio at step
total_steps (Hugging Face's get_cosine_schedule_with_warmup convention), and the warning for a warmup longer
than the run."""

import math
import warnings

import pytest
import torch

from r1fast.schedule import build_scheduler, lr_factor


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


def _reference(step, warmup, total, schedule, floor):
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    n = max(1, total - warmup)
    p = min(1.0, (step - warmup) / n)
    return floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (4, 5)])
def test_lr_factor_matches_the_formula(schedule, warmup, total):
    kw = dict(warmup_steps=warmup, total_steps=total, schedule=schedule, min_lr_ratio=0.1)
    got = [lr_factor(s, **kw) for s in range(total + 3)]
    want = [_reference(s, warmup, total, schedule, 0.1) for s in range(total + 3)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_cosine_landmarks():
    kw = dict(warmup_steps=2, total_steps=12, schedule="cosine", min_lr_ratio=0.2)
    assert lr_factor(0, **kw) == 0.5 and lr_factor(1, **kw) == 1.0  # the last warmup step runs at the peak
    assert lr_factor(2, **kw) == 1.0  # the cosine starts at the peak
    assert lr_factor(7, **kw) == pytest.approx(0.6, rel=1e-12)  # half way: (1 + floor) / 2
    assert lr_factor(12, **kw) == pytest.approx(0.2, rel=1e-12)  # the floor at step total_steps
    assert lr_factor(20, **kw) == pytest.approx(0.2, rel=1e-12)  # and never back up past it
    assert lr_factor(5, warmup_steps=0, total_steps=10, schedule="constant", min_lr_ratio=0.2) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(5, warmup_steps=0, total_steps=10, schedule="linear", min_lr_ratio=0.2)


def test_scheduler_sets_the_factor_times_the_peak_each_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6, schedule="cosine", min_lr_ratio=0.1)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [2.0 * _reference(s, 2, 6, "cosine", 0.1) for s in range(6)]
    assert seen == pytest.approx(want, rel=1e-12, abs=0)
