"""Int4 quality and export exactness on the default teacher: the QAT/export table.

Rows (all on the same held-out blocks of the default corpus, KL and top-1 against the fp32 teacher):
  teacher fp32 (torch); Q8_0, Q4_K_M, Q4_0 (llama.cpp's quantizer, from an F16 GGUF of the teacher);
  torchao int4 PTQ (weight-only, groups of 32, torch); edgekd Q4_0 with searched clip factors and no
  training (GGUF); edgekd QAT-KD Q4_0 full depth (GGUF and int4 ONNX);
  edgekd pruned + KD + QAT-KD Q4_0 (GGUF and int4 ONNX).
Columns: file size, perplexity, KL to teacher, top-1 agreement, decode tokens/s on 2 threads.
Also: exactness of each export against its own QAT torch model, beside llama.cpp's floor
(the teacher's Q4_1 file against the fp32 teacher), and the fraction of the Q4_0 gap recovered.

The QAT rows come from two ordinary runs:
    edgekd compress --profile laptop --run-name qat-full            # full depth (auto keeps 30 layers), GGUF + ONNX
    edgekd compress --profile raspberry-pi-5 --run-name qat-pruned  # pruned + KD + QAT, GGUF
    .venv/bin/python benchmarks/qat_table.py --full-run export/qat-full --pruned-run export/qat-pruned
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from common import default_setup, write_result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-run", required=True)
    ap.add_argument("--pruned-run", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="qat_table", help="results/NAME.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import edgekd
    from edgekd.device import llamacpp, onnxrt
    from edgekd.device.measure import model_file_mb
    from edgekd.exporters.gguf import export_gguf
    from edgekd.exporters.onnx import export_onnx
    from edgekd.exporters.ship import planned_export
    from edgekd.formats import FormatPlan
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.qat_kd import qat_kd
    from edgekd.methods.torchao_baseline import torchao_int4_ptq
    from edgekd.pipeline.context import SHIPPED_DIR

    setup = default_setup()
    prof, src, teacher, blocks = setup.profile, setup.source, setup.teacher, setup.heldout
    plan = FormatPlan.uniform(prof.deployment.weight_format)
    t_fn = torch_logits_fn(teacher.model)
    work = Path(tempfile.mkdtemp(prefix="edgekd-qat-table-"))
    rows, exactness = [], []

    def decode_speed(path: Path) -> float:
        return edgekd.bench(path, prof, threads=args.threads, repeats=3, prompt_tokens=128, gen_tokens=64,
                            projection=False).tg_tokens_per_s.median

    def add(name: str, fn, size_mb, path: Path | None) -> dict:
        m = evaluate(fn, blocks, t_fn)
        row = {"row": name, "file_mb": size_mb, "perplexity": m.perplexity, "kl_to_teacher": m.kl_to_teacher,
               "top1_agreement": m.top1_agreement, "decode_tokens_per_s_2t": decode_speed(path) if path else None}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        return row

    add("teacher fp32 (torch)", t_fn, teacher.info["fp32_mb"], None)
    f16 = export_gguf(teacher.model, teacher.tokenizer, work / "teacher-f16.gguf", FormatPlan.uniform("f16"),
                      source_gguf=src.path, source_name=src.name)
    for ftype in ("q8_0", "q4_k_m", "q4_0"):  # llama.cpp's own file-type names
        path = llamacpp.quantize(f16, work / f"teacher-{ftype}.gguf", ftype, threads=args.threads)
        add(f"teacher {ftype.upper()} (llama.cpp quantizer)", llamacpp.logits_fn(path, blocks.shape[1], args.threads),
            path.stat().st_size / 1e6, path)
    ao = torchao_int4_ptq(copy.deepcopy(teacher.model))
    add("teacher torchao int4 PTQ (weight-only, group 32, torch)", torch_logits_fn(ao), None, None)
    # the pipeline's QAT recipe with no training steps: searched clip factors, exact grid
    clipped = qat_kd(copy.deepcopy(teacher.model), teacher.model, setup.train, setup.calibration, plan, None)
    path = export_gguf(clipped.model, teacher.tokenizer, work / "teacher-clipped.gguf", plan, source_gguf=src.path, source_name=src.name)
    add(f"teacher {plan.name.upper()}, edgekd clip search, no training (GGUF)", llamacpp.logits_fn(path, blocks.shape[1], args.threads),
        path.stat().st_size / 1e6, path)
    rows[-1]["clip_search"] = clipped.clip_stats

    floor = evaluate(llamacpp.logits_fn(src.path, blocks.shape[1], args.threads), blocks, t_fn)
    for label, run in (("full depth", Path(args.full_run)), ("pruned + KD", Path(args.pruned_run))):
        qat_model = AutoModelForCausalLM.from_pretrained(str(run / SHIPPED_DIR)).eval()
        q_fn = torch_logits_fn(qat_model)
        gguf_path = run / planned_export("gguf", plan).file_name
        if not gguf_path.exists():
            gguf_path = export_gguf(qat_model, teacher.tokenizer, work / f"{label.replace(' ', '-')}.gguf", plan,
                                    source_gguf=src.path, source_name=src.name)
        onnx_path = run / planned_export("onnx", plan).file_name
        if not onnx_path.exists():
            onnx_path = export_onnx(qat_model, work / f"{label.replace(' ', '-')}.onnx", plan)
        g_fn = llamacpp.logits_fn(gguf_path, blocks.shape[1], args.threads)
        o_fn = onnxrt.logits_fn(onnx_path, args.threads)
        add(f"edgekd {label} QAT-KD Q4_0 GGUF ({qat_model.config.num_hidden_layers} layers)", g_fn, gguf_path.stat().st_size / 1e6, gguf_path)
        add(f"edgekd {label} QAT-KD int4 ONNX ({qat_model.config.num_hidden_layers} layers)", o_fn, model_file_mb(onnx_path), onnx_path)
        for runtime, fn, path in (("llama.cpp", g_fn, gguf_path), ("onnxruntime", o_fn, onnx_path)):
            m = evaluate(fn, blocks, q_fn)
            exactness.append({"model": label, "runtime": runtime, "file": path.name, "kl_to_qat_torch": m.kl_to_teacher,
                              "top1_vs_qat_torch": m.top1_agreement})

    rtn = next(r for r in rows if r["row"].startswith(f"teacher {plan.name.upper()} (llama.cpp"))
    full = next(r for r in rows if r["row"].startswith("edgekd full depth QAT-KD Q4_0 GGUF"))
    recovered = {
        "kl": (rtn["kl_to_teacher"] - full["kl_to_teacher"]) / rtn["kl_to_teacher"],
        "perplexity": (rtn["perplexity"] - full["perplexity"]) / (rtn["perplexity"] - rows[0]["perplexity"]),
        "top1": (full["top1_agreement"] - rtn["top1_agreement"]) / (1 - rtn["top1_agreement"]),
    }
    out = {"rows": rows, "exactness": exactness, "llamacpp_floor": floor.to_dict(), "q4_0_gap_recovered": recovered,
           "heldout_blocks": int(len(blocks))}
    write_result(args.name, out)
    fmt = lambda v, d=4: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    print("| row | file MB | perplexity | KL to teacher | top-1 agreement | decode tok/s (2 threads) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {fmt(r['file_mb'], 1)} | {r['perplexity']:.3f} | {r['kl_to_teacher']:.4f} | "
              f"{r['top1_agreement']:.4f} | {fmt(r['decode_tokens_per_s_2t'], 1)} |")
    print("\n| exported file | runtime | KL to its QAT torch model | top-1 vs QAT torch |\n|---|---|---|---|")
    for e in exactness:
        print(f"| {e['model']}: {e['file']} | {e['runtime']} | {e['kl_to_qat_torch']:.5f} | {e['top1_vs_qat_torch']:.4f} |")
    print(f"| floor: teacher Q4_1 file vs fp32 teacher | llama.cpp | {floor.kl_to_teacher:.5f} | {floor.top1_agreement:.4f} |")
    print(f"\nQ4_0 gap recovered by QAT-KD (full depth vs llama.cpp Q4_0): KL {recovered['kl']:.1%}, "
          f"perplexity {recovered['perplexity']:.1%}, top-1 {recovered['top1']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
