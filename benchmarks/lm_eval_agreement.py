"""lm-evaluation-harness through llama.cpp against lm-eval's HF model, on the same weights.

A local multiple-choice task built from the default corpus's held-out text (no download): each
item is the opening of a held-out block and four continuations, the true one and three taken
from other blocks. Scored by edgekd's llama.cpp model class on the teacher's F16 GGUF (edgekd's
writer) and by lm-eval's HF model on the fp32 teacher and on the teacher rounded to F16 in torch
(the weights the file holds): per-request log-likelihood differences, accuracies and wall times.

    .venv/bin/python benchmarks/lm_eval_agreement.py --items 500
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
from common import default_setup, write_result

CONTEXT, CONTINUATION = 48, 16


def build_task(folder: Path, blocks: np.ndarray, tok, n_items: int, seed: int = 0) -> tuple[str, list[dict]]:
    """``n_items`` items from windows of the held-out blocks: context, then the true continuation among three others."""
    rng = np.random.default_rng(seed)
    step = CONTEXT + CONTINUATION
    windows = [b[i:i + step] for b in blocks for i in range(0, blocks.shape[1] - step + 1, step)]
    items = []
    for k in range(n_items):
        w = windows[k % len(windows)]
        others = rng.choice([j for j in range(len(windows)) if j != k % len(windows)], 3, replace=False)
        choices = [tok.decode(w[CONTEXT:])] + [tok.decode(windows[j][CONTEXT:]) for j in others]
        order = rng.permutation(4)
        items.append({"question": tok.decode(w[:CONTEXT]), "choices": [choices[i] for i in order], "answer": int(np.argmax(order == 0))})
    from edgekd.quality.harness import write_multiple_choice_task

    write_multiple_choice_task(folder, "edgekd_heldout_mc", items, target_delimiter="")  # the choices carry their own spaces
    return "edgekd_heldout_mc", items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=500, help="items of the task whose run is timed")
    ap.add_argument("--agreement-items", type=int, default=100, help="items whose per-request log-likelihoods are compared")
    ap.add_argument("--scratch", default="export/lm-eval")
    args = ap.parse_args()
    from lm_eval.api.instance import Instance

    from edgekd.device import llamacpp
    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan
    from edgekd.methods.qat import convert
    from edgekd.quality.harness import hf_lm, run_tasks, runtime_lm

    setup = default_setup()
    teacher, tok = setup.teacher.model, setup.teacher.tokenizer
    scratch = Path(args.scratch)
    task, items = build_task(scratch / "tasks", setup.heldout, tok, args.items)
    f16 = export_gguf(teacher, tok, scratch / "teacher-f16.gguf", FormatPlan.uniform("f16"), source_name="SmolLM2-135M-Instruct")
    models = {"llama.cpp, F16 GGUF (edgekd's model class)": runtime_lm(llamacpp.logits_fn(f16, 256, 2), tok, 255),
              "lm-eval HF model, fp32 teacher": hf_lm(teacher, tok),
              "lm-eval HF model, teacher rounded to F16": hf_lm(convert(copy.deepcopy(teacher), FormatPlan.uniform("f16")), tok)}
    sub = items[: args.agreement_items]
    requests = [Instance("loglikelihood", {}, (i["question"], c), n) for n, i in enumerate(sub) for c in i["choices"]]
    lls, rows = {}, []
    for name, lm in models.items():
        t0 = time.perf_counter()
        lls[name] = np.asarray([ll for ll, _ in lm.loglikelihood(requests)])
        row = {"model": name, "agreement_requests": len(requests), "loglikelihood_seconds": round(time.perf_counter() - t0, 1)}
        if "rounded" not in name:  # the whole task, timed: the llama.cpp class and lm-eval's HF model on the fp32 teacher
            t0 = time.perf_counter()
            row["accuracy"] = run_tasks(lm, [task], include_path=scratch / "tasks")[task]["acc"]
            row["task_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(rows[-1], flush=True)
    base = lls["llama.cpp, F16 GGUF (edgekd's model class)"]
    diffs = {name: {"max_abs": float(np.abs(v - base).max()), "mean_abs": float(np.abs(v - base).mean()),
                    "max_rel": float((np.abs(v - base) / np.abs(v)).max()),
                    "same_choice": float(np.mean(v.reshape(-1, 4).argmax(1) == base.reshape(-1, 4).argmax(1)))}
             for name, v in lls.items() if v is not base}
    write_result("lm_eval_agreement", {"items": len(items), "rows": rows, "against_llama_cpp": diffs})
    print(f"\n| model | accuracy ({len(items)} items) | task wall time (s) | max abs Δ log-lik vs llama.cpp | mean abs Δ | max rel Δ | same choice |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = diffs.get(r["model"])
        acc = f"{r['accuracy']:.4f} | {r['task_seconds']:.0f}" if "accuracy" in r else "not run | "
        print(f"| {r['model']} | {acc} | " +
              (f"{d['max_abs']:.4f} | {d['mean_abs']:.5f} | {d['max_rel']:.2e} | {100 * d['same_choice']:.1f}% |" if d else "reference | | | |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
