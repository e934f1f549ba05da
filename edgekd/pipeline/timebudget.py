"""A wall-clock budget for a whole run (``--time-budget 30m``): training steps fitted to it.

Training is nearly all of a run's time (distillation and QAT-KD: 95% of the default run), and a
step costs what the CPU makes of it: 4.5 s with bf16 on an AVX512-BF16 machine, 10-11 s in fp32
on one without (benchmarks/RESULTS.md). Before each training stage its step time is measured
here (edgekd.methods.step_probe.probe_step_seconds) and its step count lowered, never raised, so the
stages still to come fit in what is left; the counts are written to the run directory, so
``--resume`` trains the same number of steps, and to the report. A probe can be optimistic (a
shared machine slows down): each training stage also gets a deadline and stops there, with a
checkpoint, if its steps run slower than measured, its learning-rate schedule cut where it stands
(measured against compressing the schedule to the deadline, which did worse: benchmarks/RESULTS.md,
"Time budgets"). The planner's knob measurements, the largest stage before training (under 3 minutes
for the 135M teacher), take at most ``edgekd.stages.plan.SENSITIVITY_SHARE`` of the training time left
when they start: a short budget measures on fewer calibration blocks.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgekdError
from ..fileio import atomic_write_json

# kept for what follows the last training stage: evaluation, export with its parity checks, bench
RESERVE_FRACTION, MIN_RESERVE_S = 0.08, 120.0
FITTED = "fitted-steps.json"


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``30m``, ``1h30m``, ``90s``, ``2h`` or a bare number of minutes."""
    if isinstance(text, (int, float)):
        return float(text) * 60
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s) * 60
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or parts is None or not any(parts.groups()):
        raise EdgekdError(f"bad time budget {text!r}", fix="write it like 45m, 1h30m, 90s, or a number of minutes")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    total = h * 3600 + m * 60 + sec
    if total <= 0:
        raise EdgekdError(f"time budget {text!r} is not positive", fix="give the run some time, e.g. --time-budget 30m")
    return total


@dataclass
class TimeBudget:
    total_s: float
    spent_before_s: float = 0.0  # stages an earlier process finished (their recorded wall times)
    started: float = 0.0  # perf_counter when this process started the run

    def __post_init__(self) -> None:
        self.started = self.started or time.perf_counter()

    def left_s(self) -> float:
        return self.total_s - self.spent_before_s - (time.perf_counter() - self.started)

    def training_left_s(self) -> float:
        return self.left_s() - max(MIN_RESERVE_S, RESERVE_FRACTION * self.total_s)

    def deadline(self, share: float = 1.0) -> float:
        """The ``time.perf_counter()`` by which a training stage must stop, given ``share`` of the
        training time left (the stages after it get the rest)."""
        return time.perf_counter() + max(0.0, self.training_left_s()) * share


def fit_steps(planned: list[tuple[int, float]], seconds: float) -> list[int]:
    """Step counts for training stages still to come, ``planned`` as (steps, seconds per step),
    all scaled by one factor so they fit in ``seconds``; never more than planned, at least 1 each."""
    need = sum(steps * per_step for steps, per_step in planned)
    if need <= seconds:
        return [steps for steps, _ in planned]
    factor = max(0.0, seconds) / need
    return [max(1, int(steps * factor)) if steps else 0 for steps, _ in planned]


def fitted_steps(stage_dir: Path, compute: callable) -> dict:
    """The step count decision of one stage: read back on resume, else ``compute()`` and stored."""
    path = stage_dir / FITTED
    if path.exists():
        return json.loads(path.read_text())
    decision = compute()
    atomic_write_json(path, decision)
    return decision


def budget_notes(stages: list) -> list[str]:
    """Report notes for the stages a time budget cut short: training stages' steps lowered (from their
    records), the planner's measurements made on fewer calibration blocks."""
    out = []
    for record in stages:
        used, given = record.metrics.get("calibration_blocks"), record.settings.get("blocks")
        if record.name == "sensitivity" and used and given and used < given:
            per_batch = record.metrics.get("batch_seconds")
            per_batch = f"; a batch of measurements took {per_batch[-1]:.0f} s" if per_batch else ""
            out.append(f"sensitivity: measured on {used} of {given} calibration blocks, fitted to the time budget's "
                       f"{record.metrics['seconds_allowed']:.0f} s for it (took {record.metrics['seconds']:.0f} s{per_batch})")
        fitted = record.settings.get("time_budget")
        if fitted and fitted["steps"] < fitted["planned_steps"]:
            out.append(f"{record.name}: {fitted['steps']} of {fitted['planned_steps']} steps, fitted to the time budget "
                       f"({fitted['seconds_per_step']:.2f} s per step measured on this machine)")
        if record.metrics.get("stopped_at_deadline"):
            out.append(f"{record.name}: stopped at the time budget's deadline after {record.metrics['steps']} steps "
                       "(steps ran slower than the probe measured)")
    return out
