"""Baseline of the default teacher: fp32 in torch vs its shipped Q4_1 GGUF in llama.cpp.

Same held-out blocks of the default corpus for both. The Q4_1 file's weights are exactly
the fp32 teacher's (the fp32 teacher is that file dequantized), so its KL to the fp32 logits
is llama.cpp's own numerical floor (it quantizes activations to 8 bits inside Q4/Q8 matrix
products): the floor every exported GGUF is compared with.

    .venv/bin/python benchmarks/baseline_teacher.py            # writes benchmarks/results/baseline_teacher.json
"""

from __future__ import annotations

import argparse
import sys
import time

from common import default_setup, write_result


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import edgekd
    from edgekd.device import llamacpp
    from edgekd.methods.evaluate import evaluate, torch_logits_fn

    setup = default_setup()
    prof, source, teacher, blocks = setup.profile, setup.source, setup.teacher, setup.heldout
    block_len = prof.compression.data.block_len

    torch_fn = torch_logits_fn(teacher.model)
    t0 = time.perf_counter()
    fp32 = evaluate(torch_fn, blocks)
    gguf_fn = llamacpp.logits_fn(source.path, block_len, threads=2)
    q41 = evaluate(gguf_fn, blocks, teacher_fn=torch_fn)
    eval_s = time.perf_counter() - t0

    benches = {}
    for threads in (1, 2):
        r = edgekd.bench(source.path, prof, threads=threads, repeats=5, prompt_tokens=128, gen_tokens=128)
        benches[threads] = {
            "pp128_tokens_per_s": r.pp_tokens_per_s.__dict__, "tg128_tokens_per_s": r.tg_tokens_per_s.__dict__,
            "ttft_ms": r.ttft_ms.__dict__, "peak_rss_mb": r.peak_rss_mb, "warnings": r.warnings,
        }
    out = {
        "teacher": {**source.describe(), **teacher.info},
        "heldout": {"blocks": int(len(blocks)), "block_len": block_len, "tokens_scored": fp32.tokens},
        "fp32_torch": fp32.to_dict(),
        "q4_1_gguf_llamacpp": {**q41.to_dict(), "file_mb": source.path.stat().st_size / 1e6},
        "bench_q4_1": benches,
        "eval_seconds": eval_s,
    }
    write_result("baseline_teacher", out)
    print("| model | file MB | perplexity | KL to fp32 teacher | top-1 agreement | tg128 tok/s 1 thr | tg128 tok/s 2 thr | pp128 tok/s 2 thr |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| teacher fp32 (torch) | {teacher.info['fp32_mb']:.0f} | {fp32.perplexity:.3f} | 0 (reference) | 1 (reference) | n/a | n/a | n/a |")
    print(f"| teacher Q4_1 GGUF (llama.cpp) | {out['q4_1_gguf_llamacpp']['file_mb']:.1f} | {q41.perplexity:.3f} | {q41.kl_to_teacher:.4f} | "
          f"{q41.top1_agreement:.4f} | {benches[1]['tg128_tokens_per_s']['median']:.1f} | {benches[2]['tg128_tokens_per_s']['median']:.1f} | "
          f"{benches[2]['pp128_tokens_per_s']['median']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
