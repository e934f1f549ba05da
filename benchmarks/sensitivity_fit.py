"""The sensitivity stage's time projection against the measurements it projects, for the default teacher.

Under a time budget, ``edgekd.methods.sensitivity.measure_sensitivity`` decides how many calibration
batches to measure on from timings taken before it starts (``project_batch_seconds``). This script
takes those timings the way the stage does, then runs every measurement on every batch of the
profile's calibration blocks with each KL evaluation timed, and writes the projection next to what
the measurements took: per batch, per kind (formats, skipped blocks, MLP widths), and the batch
count each would have chosen from the default run's 20% share (``--seconds``).

    .venv/bin/python benchmarks/sensitivity_fit.py --out sensitivity_fit
"""

from __future__ import annotations

import argparse
import time

from common import default_setup, write_result

from edgekd.methods import sensitivity as sens
from edgekd.methods.data import calibration_blocks
from edgekd.stages.plan import candidate_formats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=490.0, help="the share to fit batches into (the default run's: about 490 s)")
    ap.add_argument("--out", default="sensitivity_fit")
    args = ap.parse_args()
    setup = default_setup()
    prof = setup.profile
    p = prof.compression.planner
    model = setup.teacher.model
    linear, embedding = candidate_formats(prof)
    names = list(dict.fromkeys(linear + embedding))
    fractions = tuple(p.mlp_fractions) if prof.compression.prune.mlp_keep_fraction == "auto" else ()
    blocks = calibration_blocks(setup.train, p.sensitivity_blocks)
    keep, _ = sens.sensitivity_layout(model, blocks, prof.compression.memory_gb, prof.compression.memory_target_gb)

    timings: list[tuple[str, float]] = []
    kl = sens._KLMeter.kl

    def timed_kl(self, m, replay=None):
        t0 = time.perf_counter()
        out = kl(self, m, replay)
        timings.append(("replay" if replay is not None else "full", time.perf_counter() - t0))
        return out

    sens._KLMeter.kl = timed_kl
    try:
        # what the stage does first: a meter on the first batch, its timings, the projection
        meter = sens._KLMeter(model, blocks, keep_teacher_logprobs=keep, batches=1)
        projection = sens.project_batch_seconds(model, meter, names, fractions)
        probe = [t for _, t in timings]
        timings.clear()
        groups = sens._group_modules(model)
        round_trips = sens.round_trip_seconds(groups, names)
        count = sens.measurements(model, names, fractions)
        t0 = time.perf_counter()
        result = sens.measure_sensitivity(model, blocks, names, fractions, keep_teacher_logprobs=keep)
        wall = time.perf_counter() - t0
    finally:
        sens._KLMeter.kl = kl
    batches = len(meter.available)
    kl_s = sum(t for _, t in timings)
    measured_batch_s = kl_s / batches
    old_batch_s = count * probe[0]  # the rule before: every measurement at the first timed pass
    allowance = args.seconds - round_trips
    fixed_new = projection.importance_s(batches)
    row = {
        "calibration_blocks": int(blocks.shape[0]), "batches": batches, "measurements": count,
        "teacher_logprobs_kept": keep, "probe_passes_s": probe,
        "projected_batch_s": projection.batch_s, "projection": projection.to_dict(),
        "old_projected_batch_s": old_batch_s,
        "measured_kl_s": kl_s, "measured_other_s": wall - kl_s, "projected_importance_s": fixed_new, "measured_batch_s": measured_batch_s, "stage_wall_s": wall, "stage_seconds": result.seconds,
        "round_trips_s_projected": round_trips,
        "measured_by_kind_s": {kind: sum(t for k, t in timings if k == kind) for kind in ("full", "replay")},
        "kl_evaluations": len(timings), "kl_evaluations_s": timings,
        "share_s": args.seconds,
        "batches_chosen": {"old": sens.batches_within(allowance, old_batch_s, batches),
                           "new": sens.batches_within(allowance - fixed_new, projection.batch_s, batches),
                           "from_measured": sens.batches_within(allowance - (wall - kl_s - round_trips), measured_batch_s, batches)},
    }
    for k, v in row.items():
        if k != "kl_evaluations_s":
            print(f"{k}: {v}")
    write_result(args.out, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
