"""Speed of the toolkit itself, each figure a ratio measured side by side in one run.

    .venv/bin/python benchmarks/speed_table.py loop   [--steps 5 --rounds 3]   # edgekd step vs a bare PyTorch loop
    .venv/bin/python benchmarks/speed_table.py cache  [--steps 40]             # teacher-logit cache vs live teacher
    .venv/bin/python benchmarks/speed_table.py bf16   [--steps 20 --qat-steps 5]  # bf16 autocast vs fp32
    .venv/bin/python benchmarks/speed_table.py sampling [--batches 32 64]       # the teacher's sampling: edgekd's sampler vs row by row
    .venv/bin/python benchmarks/speed_table.py sampling-precision [--qwen3-shape]  # the teacher's sampling: fp32 vs bf16
    .venv/bin/python benchmarks/speed_table.py sampling-file-prompts  # a prompt file's prompts: one padded batch vs one per length
    .venv/bin/python benchmarks/speed_table.py sampling-kv-cache [--qwen3-shape]  # the sampler's KV cache: in place vs concatenated
    .venv/bin/python benchmarks/speed_table.py kquants [--rounds 3]         # K-quant reference quantizers: one call vs chunks on a thread per core
    .venv/bin/python benchmarks/speed_table.py round-trips [--model qwen3-0.6b]  # the planner's round trips: projected vs made
    .venv/bin/python benchmarks/speed_table.py decode [--gguf F] [--onnx F|default]  # decode vs the bandwidth roofline
    .venv/bin/python benchmarks/speed_table.py profile [--tool perf --threads 2]  # where decode time goes
    .venv/bin/python benchmarks/speed_table.py builds --build NAME=SITE_DIR ...  # llama.cpp builds side by side
    .venv/bin/python benchmarks/speed_table.py files --file B.gguf ...       # GGUF files side by side

Training rows use the default teacher (SmolLM2-135M-Instruct), the default profile's batch
(4 x 256 tokens) and the default run's 24-layer student pruned by Block Influence
(speed/training.py); decode rows the teacher through edgekd's exporter (speed/decode.py,
speed/profile.py). Each subcommand writes ``results/speed_<name>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from speed.decode import GGUF_HELP

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="GGUF or HF directory (default: the embedded teacher)")
    ap.add_argument("--blocks", default=None, help="token blocks from qat_recipe.py --write-blocks (default: the default corpus)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loop", help="edgekd's distillation step against a bare PyTorch loop")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("cache", help="teacher-logit cache against the live teacher (speed and quality)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2])
    p.add_argument("--kind", choices=["sample", "topk"], default="sample")
    p = sub.add_parser("bf16", help="bf16 autocast against fp32 in distillation and QAT")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--qat-steps", type=int, default=5)
    p = sub.add_parser("sampling", help="the teacher's sampling: edgekd's sampler against a row-by-row nucleus draw")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("sampling-precision", help="the teacher's sampling in fp32, bf16 autocast, and bf16 with the linears held in bf16")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--qwen3-shape", action="store_true", help="also a randomly initialised model with Qwen3-0.6B's configuration")
    p = sub.add_parser("sampling-file-prompts", help="a prompt file's prompts of different lengths: one padded batch against one per length")
    p.add_argument("--prompts", default="benchmarks/prompts/python_questions.jsonl")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("sampling-kv-cache", help="the teacher's sampling with edgekd's in-place KV cache against transformers' DynamicCache")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=240)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--qwen3-shape", action="store_true", help="also a randomly initialised model with Qwen3-0.6B's configuration")
    p = sub.add_parser("kquants", help="the K-quant reference quantizers in one call against chunks over a thread per core (same bytes)")
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("decode", help="decode tokens/s against the copy-bandwidth roofline")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--onnx", default=None, help="an ONNX file to decode too ('default': the teacher through edgekd's exporter)")
    p = sub.add_parser("builds", help="llama-cpp-python builds side by side")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--build", action="append", required=True, help="NAME=DIR with a llama-cpp-python build (empty DIR: this env's)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--name", default="builds", help="results/speed_NAME.json")
    p = sub.add_parser("files", help="several GGUF files side by side (the first is the reference)")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--file", action="append", required=True, help="another GGUF to compare (repeatable)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="files", help="results/speed_NAME.json")
    p = sub.add_parser("round-trips", help="the sensitivity stage's format round trips: projected against made")
    p.add_argument("--model", choices=["default", "qwen3-0.6b"], default="default")
    p.add_argument("--stage", type=int, default=0, metavar="BLOCKS",
                   help="also time the whole sensitivity stage on this many calibration blocks with each quantizer")
    p.add_argument("--stage-arms", default="llama.cpp,reference", help="the quantizers --stage times, comma-separated")
    p = sub.add_parser("profile", help="where decode time goes (py-spy or perf)")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tool", choices=["py-spy", "perf"], default="py-spy")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    from speed import decode, profile, quantizers, sampling, training

    if getattr(args, "gguf", "") is None:
        args.gguf = decode.default_file("gguf", args.teacher)
    if getattr(args, "onnx", "") == "default":
        args.onnx = decode.default_file("onnx", args.teacher)
    {"loop": training.cmd_loop, "cache": training.cmd_cache, "bf16": training.cmd_bf16, "sampling": sampling.cmd_sampling,
     "sampling-precision": sampling.cmd_sampling_precision, "sampling-file-prompts": sampling.cmd_sampling_file_prompts,
     "sampling-kv-cache": sampling.cmd_sampling_kv_cache, "kquants": quantizers.cmd_kquants,
     "round-trips": quantizers.cmd_round_trips, "decode": decode.cmd_decode,
     "builds": decode.cmd_builds, "files": decode.cmd_files, "profile": profile.cmd_profile}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
