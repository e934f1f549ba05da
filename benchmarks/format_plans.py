"""Format plans on the full-depth default teacher: each plan's GGUF measured in llama.cpp.

A plan gives the block linear layers, the token embedding and the output head each a weight
format (edgekd.formats.FormatPlan); the pipeline's own QAT-KD recipe (edgekd.methods.qat_kd:
clip search where the format allows it, distillation from the unquantized teacher on the exact
grids, convert) puts the weights on those grids, and the GGUF edgekd writes is scored in
llama.cpp against the fp32 teacher: held-out split of the default corpus and CPython's license
text (English prose outside the training domain), file size, decode speed on this host.

    .venv/bin/python benchmarks/format_plans.py --plan 'q4_0-head:linear=q4_0,embedding=q4_0,steps=0,clip=0'
    .venv/bin/python benchmarks/format_plans.py --plan 'q4_0-head-qat:linear=q4_0,embedding=q4_0' --name head_4bit
    .venv/bin/python benchmarks/format_plans.py --score pi5=export/RUN/model-q4_0.gguf --name default_runs

Keys of a plan: ``linear``, ``embedding``, ``head`` (an untied head; default: the embedding's),
a role (``ffn_down=q4_k``: that role in every block) or one block's tensor (``blk.3.attn_v=q8_0``),
``steps`` (QAT steps; default the profile's), ``clip`` (1: clip search, 0: round-to-nearest).
QAT checkpoints go to ``export/format-plans/<plan>/``, so an interrupted plan resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import default_setup, license_blocks, write_result

ROOT = Path(__file__).resolve().parents[1]


def parse_plan(text: str, default_steps: int) -> tuple[str, dict]:
    import re

    name, _, spec = text.partition(":")
    out = {"linear": None, "embedding": None, "head": None, "steps": default_steps, "clip": 1, "tensors": {}}
    tensor_key = re.compile(r"^(blk\.\d+\.)?(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)$")
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if tensor_key.match(key):
            out["tensors"][key] = value
            continue
        if key not in out or key == "tensors":
            raise SystemExit(f"unknown plan key {key!r} in {text!r}; keys: linear, embedding, head, steps, clip, or a role")
        out[key] = int(value) if key in ("steps", "clip") else value
    if out["linear"] is None:
        raise SystemExit(f"plan {text!r} needs linear=FORMAT")
    return name, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="append", default=[], help="NAME:linear=F[,embedding=F,head=F,steps=N,clip=0|1] (repeatable)")
    ap.add_argument("--score", action="append", default=[], metavar="NAME=FILE.gguf",
                    help="score a GGUF an edgekd run already wrote, the same way (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="format_plans", help="results/NAME.json")
    args = ap.parse_args()

    import copy

    import edgekd
    from edgekd.device import llamacpp
    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.qat_kd import qat_config, qat_kd
    from edgekd.progress import Reporter

    setup = default_setup()
    prof, src, teacher = setup.profile, setup.source, setup.teacher
    prose = license_blocks(teacher.tokenizer, prof.compression.data.block_len)
    t_fn = torch_logits_fn(teacher.model)
    work = ROOT / "export" / "format-plans"
    rows = []

    def scored(name: str, path: Path) -> dict:
        g_fn = llamacpp.logits_fn(path, setup.heldout.shape[1], args.threads)
        held, ood = evaluate(g_fn, setup.heldout, t_fn), evaluate(g_fn, prose, t_fn)
        speed = edgekd.bench(path, prof, threads=args.threads, repeats=3, projection=False)
        return {"plan": name, "file": str(path), "file_mb": path.stat().st_size / 1e6, "heldout": held.to_dict(),
                "license": ood.to_dict(), "decode_tokens_per_s": speed.tg_tokens_per_s.median}

    for item in args.score:
        name, _, path = item.partition("=")
        rows.append(scored(name, Path(path)))
        write_result(args.name, {"rows": rows})
    for text in args.plan:
        name, spec = parse_plan(text, prof.compression.qat.steps)
        plan = FormatPlan.uniform(spec["linear"], {**{k: spec[k] for k in ("embedding", "head") if spec[k]}, **spec["tensors"]})
        t0 = time.perf_counter()
        cfg = qat_config(prof.compression.distill, prof.compression.qat.model_copy(update={"steps": spec["steps"]}))
        result = qat_kd(copy.deepcopy(teacher.model), teacher.model, setup.train, setup.calibration, plan, cfg,
                        clip_search=bool(spec["clip"]), run_dir=work / name, reporter=Reporter())
        train_s = time.perf_counter() - t0
        path = export_gguf(result.model, teacher.tokenizer, work / name / "model.gguf", plan, source_gguf=src.path,
                           source_name=src.name)
        exact = evaluate(llamacpp.logits_fn(path, setup.heldout.shape[1], args.threads), setup.heldout[:8], torch_logits_fn(result.model))
        rows.append({**scored(name, path), **spec, "format_plan": plan.to_dict(), "method": result.method,
                     "gguf_vs_its_torch_model_kl": exact.kl_to_teacher, "clip_stats": result.clip_stats,
                     "train_s": train_s, "final_kd": result.outcome.summary()["final_kd"] if result.outcome else None})
        print(rows[-1], file=sys.stderr, flush=True)
        write_result(args.name, {"rows": rows})
    print(f"| plan | file MB | held-out KL | top-1 | perplexity | license KL | license top-1 | decode tok/s ({args.threads} threads) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        h, o = r["heldout"], r["license"]
        print(f"| {r['plan']} | {r['file_mb']:.1f} | {h['kl_to_teacher']:.4f} | {100 * h['top1_agreement']:.1f}% | {h['perplexity']:.2f} | "
              f"{o['kl_to_teacher']:.4f} | {100 * o['top1_agreement']:.1f}% | {r['decode_tokens_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
