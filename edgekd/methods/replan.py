"""A time-budgeted stage's steps lowered mid-run when they run slower than the probe measured, so
the learning rate still decays to its floor by the deadline.

A time budget fits a stage's step count from a probe of a few steps (edgekd.methods.step_probe)
before training. The run's steps can be slower: the probe skips the optimizer's update and the
checkpoints, and a shared machine's speed moves within minutes. The deadline alone then stops the
stage with its cosine schedule cut short, the rate still at a fraction of its peak where the last
steps should anneal. Instead the loop projects the stage's end from the pace of its recent steps
(checkpoints included); when the steps left do not fit before the deadline, by more than a
tolerance, their number is lowered to what fits, and the schedule's cosine goes on from the
progress it had reached to its end at the new last step (the rate stays continuous: no restart).
Lowered only, never raised, like the fit before training (edgekd.pipeline.timebudget).

Every change is kept as ``(step, steps before)`` in ``DistillConfig.replans`` and in each
checkpoint, so a resumed run takes the same schedule. A stage whose on-policy rows join after a
share of its steps is re-planned only before the join, and only where the join stays ahead, so the
join never moves past a step already trained (edgekd.methods.mixture).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOLERANCE = 0.05  # of the stage's steps: smaller overshoots are left to the deadline's guard
MARGIN = 0.03  # the new count fits in 97% of the time left: the pace is a median of noisy steps
PACE_WINDOW = 10  # recent steps whose median step time is the pace
MIN_TIMED_STEPS = 3  # steps timed (after the first, which warms up) before the pace is trusted


def schedule_progress(step: int, warm: int, steps: int, replans: list) -> float:
    """How far ``step`` is through the cosine decay (0 at the warm-up's end, 1 at the last step),
    with the step count ``steps`` in force since the last of ``replans`` (``(at, steps before)``):
    each re-plan goes on from the progress reached at ``at`` to 1 at its own last step."""
    totals = [before for _, before in replans] + [steps]
    starts = [warm] + [max(warm, at) for at, _ in replans]
    progress = 0.0
    for i, (start, total) in enumerate(zip(starts, totals)):
        end = starts[i + 1] if i + 1 < len(starts) else None
        span = (min(step, end) if end is not None else step) - start
        progress += (1 - progress) * span / max(1, total - start)
        if end is None or step < end:
            break
    return min(1.0, max(0.0, progress))


def pace_s(history: list[dict], checkpoint_s: float, checkpoint_every: int) -> float | None:
    """Seconds a step takes now: the median of the recent steps' times (the first step, which warms
    up, left out) plus the last checkpoint's write spread over the steps between checkpoints; None
    until enough steps are timed."""
    timed = [h["step_s"] for h in history[1:]]
    if len(timed) < MIN_TIMED_STEPS:
        return None
    return float(np.median(timed[-PACE_WINDOW:])) + checkpoint_s / max(1, checkpoint_every)


def replanned_steps(steps: int, done: int, warm: int, seconds_left: float, pace: float | None,
                    mixture: Any = None) -> int | None:
    """The lowered step count for a stage of ``steps`` steps with ``done`` trained, ``seconds_left``
    before its deadline and steps of ``pace`` seconds; None to keep ``steps`` (the steps left fit,
    or overshoot by less than the tolerance, or it is too early or too late to change them)."""
    if pace is None or pace <= 0 or done < warm or done >= steps:
        return None
    fits = done + int(max(0.0, seconds_left) / (pace * (1 + MARGIN)))
    if fits >= steps - max(1, TOLERANCE * steps):
        return None
    lowered = max(done + 1, fits)
    if mixture is not None and mixture.on_policy and mixture.on_policy_from(steps) > 0:
        # the join must stay ahead of the steps trained (``OnPolicy.start`` of the new count)
        if mixture.on_policy_from(steps) <= done or mixture.on_policy_from(lowered) <= done:
            return None
    return lowered
