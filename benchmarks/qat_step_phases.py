"""Where inside a QAT-KD step the resident memory peaks: the default run's full-depth student, phase by phase.

    .venv/bin/python benchmarks/qat_step_phases.py [--steps 4] [--force ckpt --force bf16]

The default teacher, the default run's format plan (Q4_0 linears, Q4_1 tied table and
``attn_k``/``attn_v``, Q4_K ``ffn_down``) and the Pi 5 profile's QAT-KD recipe, with the memory
check fitting the settings to the profile's 3 GB target (``--force`` turns savings on whatever it
says). The resident set is read every millisecond beside marks set where the step enters each
phase: reading the output head (``head_of``: a QAT round trip of the tied table), the chunked
head's loop, each chunk's closed-form loss and the table-gradient update, and backward. Prints the
highest resident memory seen in each phase (MiB), the step times and the process peak; writes
``results/qat_step_phases.json``. Run it alone on the machine: the peaks move ~60 MiB between
runs with the heap's layout.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys

from common import PROFILE, default_setup, write_result
from phases import PhaseSampler, mark_training_step

PLAN_TENSORS = {"embedding": "q4_1", "attn_k": "q4_1", "attn_v": "q4_1", "ffn_down": "q4_k"}  # the default run's plan
FORCE = {"ckpt": ("gradient_checkpointing", True), "bf16": ("optimizer_state", "bf16"), "grads": ("gradient_dtype", "bf16")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--force", action="append", default=[], choices=sorted(FORCE))
    ap.add_argument("--model", choices=["default", "qwen3-0.6b"], default="default",
                    help="qwen3-0.6b: memory_fit.py's Qwen3-0.6B-shaped student (24 of 28 blocks) onto uniform Q4_0")
    ap.add_argument("--memory-gb", type=float, default=None, help="the hard limit the memory check fits to")
    args = ap.parse_args()


    import edgekd
    from edgekd.formats import FormatPlan
    from edgekd.methods import chunked_head
    from edgekd.methods.qat_kd import qat_config, qat_kd
    from edgekd.pipeline.peak_memory import release_freed_memory

    prof = edgekd.load_profile(PROFILE)
    if args.model == "default":
        setup = default_setup()
        teacher, train, calib, layer_map = setup.teacher.model, setup.train, setup.calibration, None
        student, plan = copy.deepcopy(teacher), FormatPlan.uniform("q4_0", PLAN_TENSORS)
    else:
        from memory_fit import setup as fit_setup

        teacher, _, train, calib, _, student, layer_map = fit_setup(args.model)
        plan = FormatPlan.uniform("q4_0")
    cfg = qat_config(prof.compression.distill, prof.compression.qat)
    cfg.steps, cfg.checkpoint_every = args.steps, 10**6
    for key in args.force:
        setattr(cfg, *FORCE[key])
    release_freed_memory()
    sampler = PhaseSampler()
    mark_training_step(sampler)
    with sampler:
        result = qat_kd(student, teacher, train, calib, plan, cfg, layer_map=layer_map, memory_gb=args.memory_gb,
                        memory_target_gb=prof.compression.memory_target_gb if args.model == "default" else None)
    history = result.outcome.history
    out = {"steps": args.steps, "settings": result.memory.settings(), "predicted_mb": round(result.memory.total / 2**20),
           "step_s": [round(h["step_s"], 2) for h in history], "kd": [round(h["kd"], 4) for h in history],
           "model": args.model, "phases": sampler.phases(), "timeline": sampler.timeline(), "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "chunk_logit_bytes": chunked_head.CHUNK_LOGIT_BYTES,
           "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
           "lscpu_flags": next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                                if line.startswith("Flags")), "")}
    for name, p in out["phases"].items():
        print(f"{name:34s} windows {p['windows']:3d}  max {p['max_mb']:6d} MiB  median {p['median_mb']:6d} MiB")
    print("settings", out["settings"], "predicted MiB", out["predicted_mb"], "step_s", out["step_s"], "process peak MiB", out["process_peak_mb"])
    print("timeline", " ".join(f"{n}:{mb}" for n, mb in out["timeline"] if n != "_add_product" and n != "after _add_product"))
    write_result("qat_step_phases" if args.model == "default" else f"qat_step_phases_{args.model}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
