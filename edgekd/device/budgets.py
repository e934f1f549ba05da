"""Check a profile's budgets against measured (or projected) numbers.

Pure arithmetic, no runtime imports: used by ``compress`` at the end of a run and
by ``bench`` on the device. A budget whose number was not measured is reported
as "not measured", never as zero and never as passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..profiles import Budgets

# budget field -> (metric key, unit, direction): "max" passes when measured <= limit
BUDGET_METRICS: dict[str, tuple[str, str, str]] = {
    "max_model_mb": ("model_mb", "MB", "max"),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "tokens/s", "min"),
    "max_ttft_ms": ("ttft_ms", "ms", "max"),
    "max_peak_memory_mb": ("peak_memory_mb", "MB", "max"),
    "max_energy_mj_per_token": ("energy_mj_per_token", "mJ/token", "max"),
}


@dataclass
class BudgetCheck:
    budget: str
    limit: float
    unit: str
    measured: float | None
    passed: bool | None  # None: not measured
    source: str  # "measured", "projected (...)", or why it was not measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        op = "<=" if self.budget.startswith("max") else ">="
        if self.measured is None:
            return f"{self.budget}: not measured ({self.source}); limit {op} {self.limit:g} {self.unit}"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.budget}: {self.measured:.4g} {self.unit} {op} {self.limit:g} {verdict} [{self.source}]"


def check_budgets(
    budgets: Budgets,
    measured: dict[str, float | None],
    sources: dict[str, str] | None = None,
    missing_reason: str = "no exported model was benchmarked",
) -> list[BudgetCheck]:
    """Compare each set budget with ``measured[metric]``; ``sources[metric]`` says how it was obtained."""
    sources = sources or {}
    checks = []
    for field, (metric, unit, direction) in BUDGET_METRICS.items():
        limit = getattr(budgets, field)
        if limit is None:
            continue
        value = measured.get(metric)
        if value is None:
            checks.append(BudgetCheck(field, limit, unit, None, None, missing_reason))
            continue
        ok = value <= limit if direction == "max" else value >= limit
        checks.append(BudgetCheck(field, limit, unit, float(value), bool(ok), sources.get(metric, "measured")))
    return checks
