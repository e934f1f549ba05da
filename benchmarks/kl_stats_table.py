"""llama.cpp-style KL statistics of shipped GGUF files against the fp32 teacher, through `edgekd eval`'s code.

Files: the teacher's own Q4_1 (its weights are the fp32 teacher's: llama.cpp's noise floor), the
teacher at F16 and llama.cpp's round-to-nearest Q4_0 and Q4_K_M quantized from it (llama.cpp's own
quantizer), and any GGUF given with ``--file`` (a run's model-q4_0.gguf). Held-out blocks of the
default corpus, each file in llama.cpp, the teacher in torch.

llama.cpp's own `llama-perplexity --kl-divergence` is not part of llama-cpp-python (the wheel
ships the library, not the tools), so it is not run here; the statistics follow its definitions
(KL percentiles, RMS Δp, same top p), scored on every position of a block rather than on the
second half of each window.

    .venv/bin/python benchmarks/kl_stats_table.py --file export/pi5/model-q4_0.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import default_setup, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH.gguf", help="more files to score (repeatable)")
    ap.add_argument("--scratch", default="export/kl-stats", help="where the F16 and llama.cpp-quantized files are written")
    args = ap.parse_args()
    from edgekd.device import llamacpp
    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan
    from edgekd.methods.evaluate import torch_logits_fn
    from edgekd.methods.kl_stats import compare

    setup = default_setup()
    teacher, tok, blocks = setup.teacher.model, setup.teacher.tokenizer, setup.heldout
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    f16 = export_gguf(teacher, tok, scratch / "teacher-f16.gguf", FormatPlan.uniform("f16"), source_name="SmolLM2-135M-Instruct")
    files = {"teacher Q4_1 (as shipped; its weights are the fp32 teacher's)": setup.source.path, "teacher F16 (edgekd's writer)": f16}
    for ftype in ("q4_0", "q4_k_m"):
        files[f"teacher {ftype.upper()}, llama.cpp's quantizer"] = llamacpp.quantize(f16, scratch / f"teacher-{ftype}.gguf", ftype)
    for item in args.file:
        name, _, path = item.rpartition("=")
        files[name or Path(path).name] = Path(path)
    reference = torch_logits_fn(teacher)
    rows = []
    for name, path in files.items():
        s = compare(llamacpp.logits_fn(path, blocks.shape[1], 2), reference, blocks)
        rows.append({"file": name, "path": str(path), "mb": Path(path).stat().st_size / 1e6, **s.to_dict()})
        print(f"{name}: " + "; ".join(s.lines()), flush=True)
    write_result("kl_stats_table", {"blocks": int(len(blocks)), "block_len": int(blocks.shape[1]), "rows": rows})
    print("\n| file | MB | mean KL ± s.e. | median | p90 | p99 | p99.9 | max | RMS Δp % | same top-1 % | perplexity (teacher fp32 "
          f"{rows[0]['reference_perplexity']:.3f}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['mb']:.1f} | {r['kl_mean']:.4f} ± {r['kl_stderr']:.4f} | {r['kl_median']:.4f} | {r['kl_p90']:.4f} | "
              f"{r['kl_p99']:.3f} | {r['kl_p999']:.3f} | {r['kl_max']:.2f} | {r['delta_p_rms_pct']:.2f} | {100 * r['same_top1']:.2f} | "
              f"{r['perplexity']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
