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


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


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
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)


def tradeoff_plot(path: Path, points: list[dict[str, Any]], max_mb: float | None, min_tps: float | None, device: str) -> Path:
    """File size against decode speed for every exported file: measured on this host (filled)
    and projected to the device (hollow), annotated with KL to the teacher; budget lines dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p in points:
        ax.scatter(p["file_mb"], p["host_tps"], s=50, label=f"{p['label']} (this host)")
        if p.get("projected_tps"):
            ax.scatter(p["file_mb"], p["projected_tps"], s=50, facecolors="none", edgecolors="black",
                       label=f"{p['label']} (PROJECTION, {device})")
        if p.get("kl") is not None:
            ax.annotate(f"KL {p['kl']:.3f}", (p["file_mb"], p["host_tps"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if max_mb:
        ax.axvline(max_mb, color="tab:red", linestyle="--", linewidth=1, label=f"max_model_mb {max_mb:g}")
    if min_tps:
        ax.axhline(min_tps, color="tab:orange", linestyle="--", linewidth=1, label=f"min_decode_tokens_per_s {min_tps:g}")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("exported files: size, decode speed, KL to the teacher")
    return _save(plt, fig, path)


def pareto_plot(path: Path, points: list[dict[str, Any]], chosen: dict[str, Any], max_mb: float | None, device: str) -> Path:
    """Every plan the planner searched: file size against predicted KL after training (a
    PROJECTION), budget-meeting plans filled, the chosen one circled, the size budget dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for meets, color, label in ((True, "tab:blue", "meets every budget"), (False, "tab:gray", "breaks a budget")):
        sel = [p for p in points if p["meets_budgets"] is meets]
        if sel:
            ax.scatter([p["model_mb"] for p in sel], [p["predicted_kl"] for p in sel], s=10, c=color, alpha=0.6, label=label)
    ax.scatter([chosen["model_mb"]], [chosen["predicted_kl"]], s=120, facecolors="none", edgecolors="tab:red", linewidths=2,
               label=f"chosen: {chosen['layers']} blocks, MLP x{chosen['mlp_fraction']:g}")
    if max_mb:
        ax.axvline(max_mb, color="tab:red", linestyle="--", linewidth=1, label=f"max_model_mb {max_mb:g}")
    ax.set_xlabel("file size (MB, projected)")
    ax.set_ylabel("predicted KL to the teacher after training")
    if min((p["predicted_kl"] for p in points), default=0) > 0:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"compression plans for {device} (PROJECTION)")
    return _save(plt, fig, path)
