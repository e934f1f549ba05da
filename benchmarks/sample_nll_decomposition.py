"""Where the teacher's NLL of a student's samples comes from: the student's own uncertainty, or text the teacher would not write.

For sampled continuations x of held-out prompts (the generation measure of ``data_sources.py``),
the teacher's NLL per token splits as  E_x[-log t(x)] = E_x[-log s(x)] + E_x[log s(x) - log t(x)]:
the student's NLL of its own samples (an estimate of its entropy rate) plus the sequence-level
reverse KL(s || t) per token, the quantity on-policy distillation with reverse KL (MiniLLM, Gu et
al. 2024) minimises. The script distills the default run's pruned student on the corpus at two
KD temperatures (the profile's 2.0, and 1.0) for the same wall time and reports both terms at
sampling temperatures 1.0 (the measure's) and 0.8, beside the teacher's own.

    .venv/bin/python benchmarks/sample_nll_decomposition.py --budget-min 4
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import default_setup, license_blocks, write_result
from data_sources import distill_row, measure_prompts, quality, sample_nlls

from edgekd.methods.mixture import Mixture


def decompose(model, teacher, prompts: np.ndarray, temperature: float) -> dict:
    """``sample_nlls`` at ``temperature`` and the log-ratio term."""
    out = {"sampling_temperature": temperature, **sample_nlls(model, teacher, prompts, 5, temperature)}
    # the mean log-ratio log s(x) - log t(x): the reverse KL per token where x is sampled at T = 1
    out["reverse_kl_per_token"] = out["teacher_nll"] - out["own_nll"]
    print(f"  T={temperature}: teacher NLL {out['teacher_nll']:.3f} = own NLL {out['own_nll']:.3f} "
          f"+ reverse KL {out['reverse_kl_per_token']:.3f}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=4.0, help="wall-clock minutes of distillation per KD temperature")
    ap.add_argument("--kd-temperatures", default="2.0,1.0")
    ap.add_argument("--out", default="sample_nll_decomposition")
    args = ap.parse_args()
    setup = default_setup()
    teacher = setup.teacher.model
    prompts = measure_prompts(setup.heldout, 4)
    ood = license_blocks(setup.teacher.tokenizer, setup.profile.compression.data.block_len)
    result = {"budget_min": args.budget_min, "measure_prompts": len(prompts), "rows": []}
    print("teacher", flush=True)
    result["teacher"] = [decompose(teacher, teacher, prompts, t) for t in (1.0, 0.8)]
    for kd_t in (float(t) for t in args.kd_temperatures.split(",")):
        student, outcome, _, _ = distill_row(setup, setup.train, Mixture.single(len(setup.train)),
                                          time.perf_counter() + args.budget_min * 60, temperature=kd_t)
        row = {"kd_temperature": kd_t, "steps": outcome.steps, **quality(student, teacher, setup.heldout, ood, prompts)}
        print(f"student, KD temperature {kd_t}: {outcome.steps} steps, held-out KL {row['heldout_kl']:.4f}, "
              f"ppl {row['heldout_ppl']:.2f}, rep-4 {row['repeated_4grams']:.3f}", flush=True)
        row["decomposition"] = [decompose(student, teacher, prompts, t) for t in (1.0, 0.8)]
        result["rows"].append(row)
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
