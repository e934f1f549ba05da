"""The step probe's figure against the training steps that follow it, for the default run's pruned
24-block student copied from a frozen teacher (as after an earlier stage or benchmark row).

Three probes (edgekd.methods.step_probe.probe_step_seconds), then ``--steps`` real steps of the
distillation loop; writes each probe, each step's time, their median and the loop's wall time per step.
With ``--on-policy-share``, the corpus + on-policy mixture of the profile's on-policy settings, its
rows joining after ``--start`` of the steps: the probe weights both kinds of step, and the loop's
steps before and after the join are reported apart.

    .venv/bin/python benchmarks/step_probe_check.py --out step_probe_check
    .venv/bin/python benchmarks/step_probe_check.py --on-policy-share 0.5 --start 0.5 --steps 48 --out step_probe_check_on_policy
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from common import default_setup, pruned_student_plan, write_result

from edgekd.methods.distill import (
    DistillConfig,
    apply_memory_settings,
    plan_memory,
    run_distillation,
)
from edgekd.methods.mixture import Mixture, OnPolicy
from edgekd.methods.step_probe import probe_step_seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--on-policy-share", type=float, default=0.0, help="on-policy rows' share of a batch (0: corpus only)")
    ap.add_argument("--start", type=float, default=None, help="share of the steps before on-policy rows join (default: the profile's)")
    ap.add_argument("--out", default="step_probe_check")
    args = ap.parse_args()
    setup = default_setup()
    teacher = setup.teacher.model.requires_grad_(False)  # as an earlier stage or row leaves it
    plan = pruned_student_plan(setup)
    student = plan.make_student(teacher)
    cfg = DistillConfig.from_settings(setup.profile.compression.distill, steps=args.steps)
    mixture = Mixture.single(len(setup.train))
    if args.on_policy_share:
        policy = OnPolicy.from_settings(setup.profile.compression.data.on_policy)
        if args.start is not None:
            policy = replace(policy, start=args.start)
        mixture = Mixture((len(setup.train),), (1.0 - args.on_policy_share,), args.on_policy_share, policy)
    cfg.on_policy_share = mixture.on_policy_share
    cfg, memory = plan_memory(student, teacher, cfg, setup.train.shape[1], target_gb=setup.profile.compression.memory_target_gb)
    apply_memory_settings(cfg, memory)
    probes = [probe_step_seconds(student, teacher, setup.train, cfg, plan.layer_map, mixture=mixture) for _ in range(3)]
    print(f"probes: {[round(p, 3) for p in probes]} s a step", flush=True)
    t0 = time.perf_counter()
    outcome, _ = run_distillation(student, teacher, setup.train, cfg, plan.layer_map, "distilling", memory=memory,
                                  mixture=mixture)
    steps = [h["step_s"] for h in outcome.history]
    result = {"probes_s": probes, "step_s": steps, "median_step_s": float(np.median(steps[1:])),
              "first_five_median_s": float(np.median(steps[:5])), "wall_per_step_s": (time.perf_counter() - t0) / len(steps)}
    joined = mixture.on_policy_from(cfg.steps) if mixture.on_policy_share else 0
    if joined:  # each kind of step's median, and the mean over the stage the probe predicts
        result.update(on_policy_from_step=joined, median_before_join_s=float(np.median(steps[1:joined])),
                      median_after_join_s=float(np.median(steps[joined:])), mean_step_s=float(np.mean(steps)))
    print({k: v for k, v in result.items() if k != "step_s"}, flush=True)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
