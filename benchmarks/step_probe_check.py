"""The step probe's figure against the training steps that follow it, for the default run's pruned
24-block student copied from a frozen teacher (as after an earlier stage or benchmark row).

Three probes (edgekd.methods.step_probe.probe_step_seconds), then ``--steps`` real steps of the
distillation loop; writes each probe, each step's time, their median and the loop's wall time per step.

    .venv/bin/python benchmarks/step_probe_check.py --out step_probe_check
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import default_setup, pruned_student_plan, write_result

from edgekd.methods.distill import (
    DistillConfig,
    apply_memory_settings,
    plan_memory,
    run_distillation,
)
from edgekd.methods.step_probe import probe_step_seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default="step_probe_check")
    args = ap.parse_args()
    setup = default_setup()
    teacher = setup.teacher.model.requires_grad_(False)  # as an earlier stage or row leaves it
    plan = pruned_student_plan(setup)
    student = plan.make_student(teacher)
    cfg = DistillConfig.from_settings(setup.profile.compression.distill, steps=args.steps)
    cfg, memory = plan_memory(student, teacher, cfg, setup.train.shape[1], target_gb=setup.profile.compression.memory_target_gb)
    apply_memory_settings(cfg, memory)
    probes = [probe_step_seconds(student, teacher, setup.train, cfg, plan.layer_map) for _ in range(3)]
    print(f"probes: {[round(p, 3) for p in probes]} s a step", flush=True)
    t0 = time.perf_counter()
    outcome, _ = run_distillation(student, teacher, setup.train, cfg, plan.layer_map, "distilling", memory=memory)
    steps = [h["step_s"] for h in outcome.history]
    result = {"probes_s": probes, "step_s": steps, "median_step_s": float(np.median(steps[1:])),
              "first_five_median_s": float(np.median(steps[:5])), "wall_per_step_s": (time.perf_counter() - t0) / len(steps)}
    print({k: v for k, v in result.items() if k != "step_s"}, flush=True)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
