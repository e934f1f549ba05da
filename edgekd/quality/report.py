"""How ``edgekd eval`` shows its result: one table of the statistics, then the budgets."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table


def print_eval(result: Any, console: Any) -> None:
    t = Table(title=f"{result.model} on {result.blocks} blocks of {result.text} (measured)")
    for col in ("model", "runtime", "against", "tokens", "mean KL ± s.e.", "median", "p90", "p99", "max",
                "RMS Δp %", "same top-1 %", "PPL", "reference PPL"):
        t.add_column(col, justify="left" if col in ("model", "runtime", "against") else "right")
    for c in result.comparisons:
        s = c.stats
        t.add_row(c.model, c.runtime, c.against, f"{s.tokens:,}", f"{s.kl_mean:.5f} ± {s.kl_stderr:.5f}", f"{s.kl_median:.5f}",
                  f"{s.kl_p90:.4f}", f"{s.kl_p99:.4f}", f"{s.kl_max:.3f}", f"{s.delta_p_rms_pct:.2f}", f"{100 * s.same_top1:.2f}",
                  f"{s.perplexity:.3f}", f"{s.reference_perplexity:.3f}")
    console.print(t)
    if result.tasks:
        tt = Table(title="lm-evaluation-harness (measured)")
        for col in ("task", "model accuracy", "teacher accuracy"):
            tt.add_column(col)
        for task, r in result.tasks.items():
            tt.add_row(task, *(f"{r[k]:.4f}" if r.get(k) is not None else "n/a" for k in ("model", "teacher")))
        console.print(tt)
    for c in result.checks:
        color = "green" if c.passed else "red"
        console.print(f"[{color}]{escape(c.describe())}[/]")
    if not result.checks:
        console.print("no quality budget set (--max-kl, --min-top1, or the profile's budgets.max_kl_to_teacher / min_top1_agreement)")
