"""QAT-KD recipe sweep on the full-depth default teacher: which settings bring Q4_0 closest to it.

Every variant starts from the same fp32 teacher and runs the pipeline's own QAT-KD recipe
(edgekd.methods.qat_kd: optional clip search, prepare, distillation on the exact grid with the
same seed and data order, convert), then scores the grid weights in torch against the fp32
teacher on the held-out blocks: KL per token, top-1 agreement, perplexity. The shipped GGUF
computes these weights up to llama.cpp's activation-quantization floor (see qat_table.py).

    .venv/bin/python benchmarks/qat_recipe.py                                  # default variants
    .venv/bin/python benchmarks/qat_recipe.py --variant 'a1:alpha=1,temperature=1,steps=100'
    .venv/bin/python benchmarks/qat_recipe.py --write-blocks blocks.npz        # corpus blocks only

Runs on CPU or, much faster, on a CUDA GPU (``--teacher`` a GGUF or HF directory,
``--blocks`` the npz written here with ``--write-blocks``, so both machines score the same tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import RESULTS, default_setup

DEFAULT_VARIANTS = [
    "current:alpha=0.7,temperature=2,steps=100",
    "kd_only:alpha=1,temperature=2,steps=100",
    "kd_t1:alpha=1,temperature=1,steps=100",
    "kd_t1_learn:alpha=1,temperature=1,steps=100,learn_clip=1,clip_lr_scale=20",
]
FIELDS = {"alpha": float, "temperature": float, "steps": int, "learning_rate": float, "clip_search": int,
          "learn_clip": int, "clip_lr_scale": float, "batch_size": int}


def parse_variant(text: str) -> tuple[str, dict]:
    from edgekd.methods.qat import LEARNED_CLIP_LR_SCALE

    name, _, spec = text.partition(":")
    out = {"alpha": 0.7, "temperature": 2.0, "steps": 100, "learning_rate": 1e-4, "clip_search": 1,
           "learn_clip": 0, "clip_lr_scale": LEARNED_CLIP_LR_SCALE, "batch_size": 4}
    for item in filter(None, spec.split(",")):
        key, _, val = item.partition("=")
        out[key] = FIELDS[key](val)
    return name, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None, help="GGUF or HF directory (default: the embedded teacher)")
    ap.add_argument("--blocks", default=None, help="npz with train/heldout/calibration token blocks")
    ap.add_argument("--write-blocks", default=None, help="write the default corpus blocks to this npz and stop")
    ap.add_argument("--variant", action="append", default=None, help="name:key=value,... (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "qat_recipe.json"))
    args = ap.parse_args()

    import torch

    from edgekd.formats import FormatPlan
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.qat_kd import qat_config, qat_kd

    setup = default_setup(args.teacher, args.blocks)
    prof, train, heldout, calib = setup.profile, setup.train, setup.heldout, setup.calibration
    if args.write_blocks:
        np.savez(args.write_blocks, train=train, heldout=heldout, calibration=calib)
        print(f"wrote {args.write_blocks}: {train.shape} train, {heldout.shape} held-out, {calib.shape} calibration")
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_model = setup.teacher.model.to(device)
    t_fn = torch_logits_fn(t_model)
    plan = FormatPlan.uniform(prof.deployment.weight_format)
    results = []
    for text in args.variant or DEFAULT_VARIANTS:
        name, v = parse_variant(text)
        t0 = time.perf_counter()
        qs = prof.compression.qat.model_copy(update={"steps": v["steps"], "learning_rate": v["learning_rate"], "alpha": v["alpha"]})
        cfg = qat_config(prof.compression.distill, qs)
        cfg.temperature, cfg.batch_size = v["temperature"], v["batch_size"]
        result = qat_kd(copy.deepcopy(t_model), t_model, train, calib, plan, cfg, clip_search=bool(v["clip_search"]),
                        learn_clip=bool(v["learn_clip"]), clip_lr_scale=v["clip_lr_scale"])
        student, outcome, stats = result.model, result.outcome, {**result.clip_stats, **result.learned_clip}
        m = evaluate(torch_logits_fn(student.eval()), heldout, t_fn)
        row = {"variant": name, **v, **stats, "kl_to_teacher": m.kl_to_teacher, "top1_agreement": m.top1_agreement,
               "perplexity": m.perplexity, "median_step_s": float(np.median([h["step_s"] for h in outcome.history])) if outcome else None,
               "wall_s": time.perf_counter() - t0, "device": device, "precision": cfg.precision}
        results.append(row)
        print(json.dumps(row), flush=True)
        del student
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"heldout_tokens": int(heldout.shape[0] * (heldout.shape[1] - 1)),
                                         "torch": torch.__version__, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
