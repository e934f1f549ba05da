"""The phone path against llama.cpp on the same weights, side by side in one run.

    .venv/bin/python benchmarks/phone_runtime.py --run export/<dir>/phone [--rounds 3] [--threads 2]
    .venv/bin/python benchmarks/phone_runtime.py            # stand-in: the teacher on the phone plan's grid

From the run's shipped QAT student (``--run``: an ``edgekd compress --profile phone`` run
directory) writes three files of the same weights in the run's format plan: the Q4_0 GGUF
(llama.cpp), the onnxruntime-genai folder (the phone profile's file) and the plain onnxruntime
decoder. Each is benchmarked by ``edgekd bench`` in its own process (llama-bench protocol,
128-token prompt, 64 generated tokens, the phone profile's 1024-token context), the files taking
turns within each round; medians over rounds. Then onnxruntime-genai's logits against the torch
QAT model on held-out blocks (KL, top-1) and greedy decoding over prompts, with llama.cpp's
numbers on the same blocks beside them (the int8-activation floor both share) and the plain
decoder's (fp32 activations, exact).

Targets: decode >= 0.8x llama.cpp; peak resident memory <= 1.5 x the ONNX file + its KV cache at
the profile's context; TTFT <= llama.cpp's. Writes ``results/phone_runtime.json`` and prints
Markdown tables; each row says what it measured and on which CPU (lscpu flags in the JSON).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from common import write_result

PROFILE = "phone"


def shipped_student(run: str | None):
    """(model, tokenizer, plan, label): the run's QAT student, or the teacher round-tripped to the
    phone plan's grid (same shapes and formats; speed and memory do not depend on the values)."""
    import edgekd
    from edgekd.formats import FormatPlan
    from edgekd.methods.models import load_causal_lm, resolve_model_source
    from edgekd.methods.qat import convert
    from edgekd.pipeline.context import SHIPPED_DIR, read_compression_plan
    from edgekd.pipeline.plan import format_plan
    from edgekd.stages.qat import load_shipped_model

    teacher = load_causal_lm(resolve_model_source(None))
    if run is None:
        plan = format_plan(edgekd.load_profile(PROFILE))
        return convert(teacher.model, plan), teacher.tokenizer, plan, "default teacher on the phone plan's grid (stand-in)"
    chosen = read_compression_plan(Path(run))
    plan = chosen.formats if chosen is not None else FormatPlan.uniform(edgekd.load_profile(PROFILE).deployment.weight_format)
    return load_shipped_model(Path(run) / SHIPPED_DIR), teacher.tokenizer, plan, f"QAT student of {run}"


def logit_noise(path: Path, model, blocks, threads: int) -> dict:
    """How far int8 activations move the logits: |runtime - torch| over every position and token,
    and the change of torch's top-1 margin (what the greedy check's DECISIVE_MARGIN must exceed)."""
    import numpy as np

    from edgekd.device.onnxgenai import GenaiModel
    from edgekd.methods.evaluate import torch_logits_fn

    rt = GenaiModel(path.parent, threads).logits(blocks)
    ref = torch_logits_fn(model)(blocks)
    diff = np.abs(rt - ref)
    top2 = np.argsort(ref, axis=-1)[..., -2:]
    margin = lambda x: np.take_along_axis(x, top2[..., 1:], -1) - np.take_along_axis(x, top2[..., :1], -1)  # noqa: E731
    dm = np.abs(margin(rt) - margin(ref)).ravel()
    return {"abs_logit_diff_median": float(np.median(diff)), "abs_logit_diff_p99": float(np.percentile(diff, 99)),
            "abs_logit_diff_max": float(diff.max()), "top1_margin_change_median": float(np.median(dm)),
            "top1_margin_change_p99": float(np.percentile(dm, 99)), "top1_margin_change_max": float(dm.max()),
            "positions": int(dm.size)}


def lscpu_flags() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Flags")), "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an `edgekd compress --profile phone` run directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="export/phone_runtime", help="where the three files are written")
    ap.add_argument("--parity-blocks", type=int, default=8)
    args = ap.parse_args()

    import edgekd
    from edgekd.exporters.ship import GENAI, planned_export, write_checked
    from edgekd.methods.data import load_corpus
    from edgekd.methods.models import resolve_model_source

    model, tokenizer, plan, label = shipped_student(args.run)
    prof = edgekd.load_profile(PROFILE)
    context = prof.deployment.context_length
    work = Path(args.work)
    blocks = load_corpus(None, tokenizer, prof.compression.data.block_len).heldout[:args.parity_blocks]
    src = resolve_model_source(None)
    files, parity = {}, {}
    for name, container, runtime in (("llama.cpp GGUF", "gguf", "llama.cpp"), ("onnxruntime-genai folder", "onnx", GENAI),
                                     ("plain onnxruntime decoder", "onnx", "onnxruntime")):
        export = planned_export(container, plan, runtime)
        print(f"writing {export.file_name} and checking it in {runtime}", file=sys.stderr, flush=True)
        path, result = write_checked(export, model, tokenizer, plan, work, blocks, args.threads, source_gguf=src.path,
                                     source_name=src.name, context_length=context)
        files[name], parity[name] = path, result.to_dict()

    noise = logit_noise(files["onnxruntime-genai folder"], model, blocks[:2], args.threads)
    runs = {name: [] for name in files}
    for r in range(args.rounds):
        for name, path in files.items():
            res = edgekd.bench(path, PROFILE, threads=args.threads, repeats=3, prompt_tokens=128, gen_tokens=64, projection=False)
            runs[name].append(res.to_dict())
            print(f"round {r + 1} {name}: tg {res.tg_tokens_per_s.median:.1f} tok/s, TTFT {res.ttft_ms.median:.1f} ms, "
                  f"peak {res.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)

    def med(name: str, key: str) -> float:
        vals = [b[key]["median"] if isinstance(b[key], dict) else b[key] for b in runs[name]]
        return statistics.median(vals)

    rows = []
    for name, results in runs.items():
        b = results[0]
        rows.append({"file": name, "runtime": b["runtime"], "file_mb": b["file_mb"], "kv_cache_mb": b["kv_cache_mb"],
                     "decode_tokens_per_s": med(name, "tg_tokens_per_s"), "prefill_tokens_per_s": med(name, "pp_tokens_per_s"),
                     "ttft_ms": med(name, "ttft_ms"), "peak_rss_mb": med(name, "peak_rss_mb"),
                     "baseline_rss_mb": med(name, "baseline_rss_mb"),
                     "per_round": [{"tg": x["tg_tokens_per_s"]["median"], "ttft": x["ttft_ms"]["median"], "peak": x["peak_rss_mb"]}
                                   for x in results]})
    ref, og = rows[0], rows[1]
    memory_limit = 1.5 * og["file_mb"] + og["kv_cache_mb"]
    targets = {
        "decode_vs_llamacpp": {"value": og["decode_tokens_per_s"] / ref["decode_tokens_per_s"], "target": ">= 0.8"},
        "peak_memory_mb": {"value": og["peak_rss_mb"], "target": f"<= 1.5 x {og['file_mb']:.1f} + {og['kv_cache_mb']:.1f} = {memory_limit:.1f}",
                           "above_process_baseline": og["peak_rss_mb"] - og["baseline_rss_mb"]},
        "ttft_vs_llamacpp": {"value": og["ttft_ms"] / ref["ttft_ms"], "target": "<= 1.0"},
    }
    targets["decode_vs_llamacpp"]["met"] = targets["decode_vs_llamacpp"]["value"] >= 0.8
    targets["peak_memory_mb"]["met"] = og["peak_rss_mb"] <= memory_limit
    targets["ttft_vs_llamacpp"]["met"] = targets["ttft_vs_llamacpp"]["value"] <= 1.0
    out = {"model": label, "plan": plan.to_dict(), "threads": args.threads, "rounds": args.rounds, "context_length": context,
           "lscpu_flags": lscpu_flags(), "rows": rows, "targets": targets, "parity": parity, "parity_blocks": int(len(blocks)),
           "genai_logit_noise": noise}
    write_result("phone_runtime", out)
    print(f"{label}; {args.threads} threads, medians of {args.rounds} rounds (each `edgekd bench`, 3 repeats)\n")
    print("| file | runtime | file MB | decode tok/s | prefill tok/s | TTFT ms (128 tokens) | peak RSS MB | KV cache MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['runtime']} | {r['file_mb']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['ttft_ms']:.1f} | {r['peak_rss_mb']:.0f} | {r['kv_cache_mb']:.1f} |")
    print("\n| target | measured | target | met |\n|---|---|---|---|")
    for k, t in targets.items():
        print(f"| {k} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    print("\n| file | runtime | KL(torch QAT || file) | top-1 | greedy |\n|---|---|---|---|---|")
    for name, p in parity.items():
        greedy = p["greedy_detail"] or {True: "identical", False: "DIFFERENT", None: "n/a"}[p["greedy_match"]]
        print(f"| {name} | {p['runtime']} | {p['kl']:.5f} | {p['top1_agreement']:.4f} | {greedy} |")
    print(f"\nint8 activations, onnxruntime-genai vs torch over {noise['positions']} positions: |logit diff| median "
          f"{noise['abs_logit_diff_median']:.3f}, p99 {noise['abs_logit_diff_p99']:.3f}; top-1 margin change median "
          f"{noise['top1_margin_change_median']:.3f}, p99 {noise['top1_margin_change_p99']:.3f}, max {noise['top1_margin_change_max']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
