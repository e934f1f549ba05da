"""How the sensitivity stage fits its calibration batches into a time budget's share, for the default teacher.

``edgekd.methods.sensitivity.measure_sensitivity`` with ``seconds`` measures a batch of 4 blocks at a time
and goes on to the next batch only while the last batch's measured time fits in what is left. Before,
it priced every one of its measurements at one timed pass of the teacher over the first batch. Each
repeat here times three such passes first (the old rule's price is the first pass times the number of
measurements), then runs the stage's measurements under the share and writes what each batch took.

    .venv/bin/python benchmarks/sensitivity_fit.py --repeats 2 --out sensitivity_fit
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
    ap.add_argument("--repeats", type=int, default=2)
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
    count = sens.measurements(model, names, fractions)
    rows = []
    for repeat in range(args.repeats):
        meter = sens._KLMeter(model, blocks, keep_teacher_logprobs=keep, batches=1)
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            meter.kl(model)
            passes.append(time.perf_counter() - t0)
        del meter
        result = sens.measure_sensitivity(model, blocks, names, fractions, keep_teacher_logprobs=keep, seconds=args.seconds)
        row = {"repeat": repeat, "timed_passes_s": passes, "old_rule_batch_s": count * passes[0],
               "old_rule_batches": max(1, min(sens.batches_of(blocks), int(args.seconds // (count * passes[0])))),
               "batch_seconds": result.batch_seconds, "calibration_blocks": result.calibration_blocks,
               "stage_seconds": result.seconds}
        print(row, flush=True)
        rows.append(row)
    write_result(args.out, {"share_s": args.seconds, "measurements": count, "available_blocks": int(blocks.shape[0]),
                            "teacher_logprobs_kept": keep, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
