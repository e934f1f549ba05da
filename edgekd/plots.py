"""Plots for report.md (matplotlib, no display needed). Each writes a PNG atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .fileio import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def block_scores_plot(path: Path, scores: dict[str, list[float] | None], removed: list[int]) -> Path:
    plt = _pyplot()
    series = {k: v for k, v in scores.items() if v}
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        colors = ["tab:red" if i in removed else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_ylabel(name.replace("_", " "), fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("block (red: removed)")
    fig.suptitle("block importance from the calibration pass")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def loss_curves_plot(path: Path, history: list[dict[str, Any]], title: str) -> Path:
    plt = _pyplot()
    keys = [k for k in ("loss", "ce", "kd", "hidden", "attention") if history and k in history[0]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps = [h["step"] for h in history]
    for k in keys:
        ax.plot(steps, [h[k] for h in history], label=k)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
