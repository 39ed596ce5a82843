"""The run's PNG: reward, accuracy and response length over training steps."""

from __future__ import annotations

import os

from r1fast.safe_write import replace_atomically


def plot_training_curves(records: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Plot mean reward, accuracy and mean response length per step from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    panels = [("reward_mean", "mean reward"), ("accuracy", "accuracy (train samples)"),
              ("response_length_mean", "mean response length (tokens)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), constrained_layout=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and r.get("phase", "rl") == "rl"]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=2, linewidth=1)
        ax.set_xlabel("GRPO step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    # into a new file renamed over ``path``: a symlinked training_curves.png had its target overwritten
    with replace_atomically(path, "wb") as fh:
        fig.savefig(fh, dpi=110, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    plt.close(fig)
