"""How good is `edgekd bench`'s projection to a Raspberry Pi? Checked against published llama.cpp numbers.

For each published result (model, quantization, device, prompt or decode tokens/s), the model's
bytes read per token and FLOPs come from its architecture and its file, and two projections are
made with edgekd.device.costmodel:

- the device roofline alone: the profile's datasheet bandwidth and compute times the assumed
  achievable fractions (0.6 of bandwidth, 0.5 of compute);
- the host-calibrated projection, as `edgekd bench` prints it: the roofline times this host's
  measured efficiency on a small model (``--gguf``, by default the shipped SmolLM2 Q4_1 file),
  measured here with llama.cpp and this host's STREAM copy and GEMM ceilings.

    .venv/bin/python benchmarks/projection_check.py            # about half a minute

Sources (numbers as published; tokens per second):
- justine.lol/matmul ("LLaMA Now Goes Faster on CPUs", 2024): TinyLlama 1.1B Q8_0 with
  llama.cpp 2024-03-26, prompt 35 / eval 9 on a Pi 5, prompt 10 / eval 3 on a Pi 4;
- github.com/geerlingguy/ai-benchmarks issue 7 (Pi 5 16 GB, no NUMA tweaks, ollama, which
  runs llama.cpp): llama3.2:3b (Q4_K_M) 4.51, llama3.1:8b (Q4_K_M) 2.05, llama2:13b (Q4_0) 1.35;
- github.com/ggml-org/llama.cpp pull 6928 (Pi 5 8 GB): Llama 2 7B Q4_0 prompt eval of 109
  tokens at 8.10 tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied, params, file bytes)
ARCH = {
    "TinyLlama 1.1B": (22, 2048, 5632, 32, 4, 64, 32000, False, 1.100e9, None),
    "Llama 3.2 3B": (28, 3072, 8192, 24, 8, 128, 128256, True, 3.213e9, 2.019e9),
    "Llama 3.1 8B": (32, 4096, 14336, 32, 8, 128, 128256, False, 8.030e9, 4.920e9),
    "Llama 2 7B": (32, 4096, 11008, 32, 32, 128, 32000, False, 6.738e9, 3.826e9),
    "Llama 2 13B": (40, 5120, 13824, 40, 40, 128, 32000, False, 13.016e9, 7.366e9),
}
BYTES_PER_PARAM = {"q8_0": 34 / 32, "q4_0": 18 / 32}

# (model, quant, profile, kind, prompt tokens, published tokens/s, source)
PUBLISHED = [
    ("TinyLlama 1.1B", "q8_0", "raspberry-pi-5", "decode", 128, 9.0, "justine.lol/matmul"),
    ("TinyLlama 1.1B", "q8_0", "raspberry-pi-5", "prefill", 128, 35.0, "justine.lol/matmul"),
    ("TinyLlama 1.1B", "q8_0", "raspberry-pi-4", "decode", 128, 3.0, "justine.lol/matmul"),
    ("TinyLlama 1.1B", "q8_0", "raspberry-pi-4", "prefill", 128, 10.0, "justine.lol/matmul"),
    ("Llama 3.2 3B", "Q4_K_M", "raspberry-pi-5", "decode", 128, 4.51, "geerlingguy/ai-benchmarks#7"),
    ("Llama 3.1 8B", "Q4_K_M", "raspberry-pi-5", "decode", 128, 2.05, "geerlingguy/ai-benchmarks#7"),
    ("Llama 2 13B", "q4_0", "raspberry-pi-5", "decode", 128, 1.35, "geerlingguy/ai-benchmarks#7"),
    ("Llama 2 7B", "q4_0", "raspberry-pi-5", "prefill", 109, 8.10, "llama.cpp PR 6928"),
]


def facts_for(model: str, quant: str):
    """Bytes read per decoded token and FLOPs of a published model.

    Only the weights used for every token are counted: with untied embeddings the token
    table is read one row at a time, so it is left out (the output head is read in full).
    """
    from edgekd.device.costmodel import ModelFacts

    layers, hidden, inter, heads, kv, hd, vocab, tied, params, file_bytes = ARCH[model]
    if file_bytes is None:
        file_bytes = params * BYTES_PER_PARAM[quant]
    per_param = file_bytes / params
    read_bytes = file_bytes - (0 if tied else vocab * hidden * per_param)
    return ModelFacts(tensor_bytes=read_bytes, params=params, layers=layers, kv_heads=kv, head_dim=hd, heads=heads)


def host_efficiency(gguf: Path, threads: int) -> dict:
    """This host's llama.cpp efficiency against its own measured roofline, as `edgekd bench` computes it."""
    import edgekd

    r = edgekd.bench(gguf, "raspberry-pi-5", threads=threads, repeats=5)
    p = r.projection
    return {"file": gguf.name, "threads": threads, "decode_tokens_per_s": r.tg_tokens_per_s.median,
            "prefill_tokens_per_s": r.pp_tokens_per_s.median, "efficiency_decode": p["host_efficiency_decode"],
            "efficiency_prefill": p["host_efficiency_prefill"], **r.host_perf}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="small model to measure this host's efficiency on (default: the shipped SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "projection_check.json"))
    args = ap.parse_args()

    from edgekd import load_profile
    from edgekd.device.costmodel import roofline_rates
    from edgekd.methods.models import default_teacher_path
    from edgekd.versions import host_info, library_versions

    host = host_efficiency(Path(args.gguf) if args.gguf else default_teacher_path(), args.threads)
    rows = []
    for model, quant, prof_name, kind, prompt, published, source in PUBLISHED:
        hw = load_profile(prof_name).hardware
        facts = facts_for(model, quant)
        device = roofline_rates(facts, hw.memory_bandwidth_gbs * 1e9 * 0.6, hw.peak_gflops_fp32 * 1e9 * 0.5, prompt)
        key = "decode_tokens_per_s" if kind == "decode" else "prefill_tokens_per_s"
        roofline = device[key]
        calibrated = roofline * host["efficiency_decode" if kind == "decode" else "efficiency_prefill"]
        rows.append({"model": model, "quant": quant, "device": prof_name, "kind": kind, "published": published,
                     "source": source, "roofline": roofline, "roofline_error": roofline / published - 1,
                     "calibrated": calibrated, "calibrated_error": calibrated / published - 1,
                     "bound": device["decode_bound"] if kind == "decode" else "compute"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"host": host, "rows": rows, "host_info": host_info(),
                                          "versions": library_versions()}, indent=2) + "\n")
    print(f"host: {host['file']} with llama.cpp on {args.threads} threads: decode {host['decode_tokens_per_s']:.1f} tok/s "
          f"= {100 * host['efficiency_decode']:.0f}% of this host's roofline, prefill {host['prefill_tokens_per_s']:.0f} tok/s "
          f"= {100 * host['efficiency_prefill']:.0f}% (copy {host['copy_bandwidth_gbs']:.1f} GB/s, "
          f"GEMM {host['gemm_gflops_fp32']:.0f} GFLOP/s)\n")
    print("| model | quant | device | measure | published tok/s | roofline alone | error | host-calibrated | error | source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['quant']} | {r['device']} | {r['kind']} | {r['published']:g} | {r['roofline']:.2f} | "
              f"{100 * r['roofline_error']:+.0f}% | {r['calibrated']:.2f} | {100 * r['calibrated_error']:+.0f}% | {r['source']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
