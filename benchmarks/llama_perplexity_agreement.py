"""edgekd's KL statistics next to llama.cpp's own `llama-perplexity --kl-divergence` on the same files and text.

llama-cpp-python ships llama.cpp's library, not its tools, so `llama-perplexity` is built here
from the llama.cpp that the installed llama-cpp-python vendors (`tools/build_llama_tool.sh`, the
same instruction sets as `make install`'s wheel): the tool and edgekd's runtime are one llama.cpp.

Both sides use llama.cpp's conventions, so any difference is in the statistics, not the set-up:
the base is the teacher's F16 GGUF, the text the default corpus's held-out documents tokenized by
llama.cpp, windows of 256 tokens with only the second half of each window scored (llama.cpp's
`first = n_ctx/2`), micro-batches of one window. edgekd scores with `edgekd.methods.kl_stats.compare`
(`first=128`) on the logits of `edgekd.device.llamacpp.logits_fn`. Known differences in llama.cpp's
tool: it stores the base's log-probabilities as 16-bit codes and leaves out tokens with base
probability below e^-16 from the KL sum.

    .venv/bin/python benchmarks/llama_perplexity_agreement.py [--file NAME=PATH.gguf ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import default_setup, write_result

N_CTX = 256
ROOT = Path(__file__).resolve().parents[1]
# llama-perplexity's summary lines -> edgekd's KlStats fields (percent values divided by 100)
PATTERNS = {"kl_mean": r"Mean\s+KLD:\s+(-?[\d.]+)", "kl_median": r"Median\s+KLD:\s+(-?[\d.]+)", "kl_p99": r"99\.0%\s+KLD:\s+(-?[\d.]+)",
            "kl_p90": r"90\.0%\s+KLD:\s+(-?[\d.]+)", "kl_max": r"Maximum KLD:\s+(-?[\d.]+)", "delta_p_rms_pct": r"RMS Δp\s*:\s+(-?[\d.]+)",
            "same_top1": r"Same top p\s*:\s+(-?[\d.]+)", "perplexity": r"Mean PPL\(Q\)\s+:\s+([\d.]+)",
            "reference_perplexity": r"Mean PPL\(base\)\s+:\s+([\d.]+)"}


def build_tool() -> Path:
    from edgekd.device import llamacpp

    isa = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "llama-isa"], capture_output=True, text=True).stdout
    args = isa.split(":", 1)[1].split("patches/")[0].strip() if ":" in isa else ""
    out = Path(os.environ.get("EDGEKD_CACHE", Path.home() / ".cache" / "edgekd")) / "llama-tools" / f"{llamacpp.version()}-{isa.split(':')[0].split('-patched')[0].strip()}"
    tool = out / "llama-perplexity"
    if not tool.exists():
        print(f"building llama-perplexity from llama-cpp-python {llamacpp.version()}'s llama.cpp ({args}); several minutes", flush=True)
        subprocess.run([str(ROOT / "tools" / "build_llama_tool.sh"), sys.executable, llamacpp.version(), "llama-perplexity", str(out)],
                       env={**os.environ, "CMAKE_ARGS": args}, check=True)
    return tool


def run_tool(tool: Path, model: Path, text: Path, base: Path, chunks: int, threads: int, make_base: bool) -> str:
    cmd = [str(tool), "-m", str(model), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX), "-ub", str(N_CTX), "--chunks", str(chunks),
           "-t", str(threads), "--kl-divergence-base", str(base)] + ([] if make_base else ["--kl-divergence"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def parse(output: str) -> dict[str, float]:
    got = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, output)
        if m:
            got[key] = float(m.group(1)) / (100 if key == "same_top1" else 1)
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH.gguf", help="more files to score (repeatable)")
    ap.add_argument("--chunks", type=int, default=24, help="256-token windows (default: %(default)s)")
    ap.add_argument("--tool", default=None, help="a llama-perplexity binary (default: built from the installed llama-cpp-python's llama.cpp)")
    ap.add_argument("--scratch", default="export/kl-stats", help="where the F16 and llama.cpp-quantized files are written")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from edgekd.device import llamacpp
    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan
    from edgekd.methods.data import read_documents, split_documents
    from edgekd.methods.kl_stats import compare

    tool = Path(args.tool) if args.tool else build_tool()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    f16 = scratch / "teacher-f16.gguf"
    setup = default_setup()
    if not f16.exists():
        export_gguf(setup.teacher.model, setup.teacher.tokenizer, f16, FormatPlan.uniform("f16"), source_name="SmolLM2-135M-Instruct")
    files = {"teacher Q4_1 (as shipped)": setup.source.path}
    for ftype in ("q4_0", "q4_k_m"):
        path = scratch / f"teacher-{ftype}.gguf"
        files[f"teacher {ftype.upper()}, llama.cpp's quantizer"] = path if path.exists() else llamacpp.quantize(f16, path, ftype)
    for item in args.file:
        name, _, path = item.rpartition("=")
        files[name or Path(path).name] = Path(path)

    # the held-out documents of the default corpus, as one text file both sides read
    _, docs, _ = read_documents(None)
    _, held = split_documents([d for d in docs if d.text.strip()], 0.1)
    text = scratch / "heldout.txt"
    text.write_text("\n\n".join(d.text for d in held))
    vocab = llamacpp.Tokenizer(f16)
    tokens = np.asarray(vocab([text.read_text()], add_special_tokens=True)["input_ids"][0], dtype=np.int64)
    chunks = min(args.chunks, len(tokens) // N_CTX)
    blocks = tokens[: chunks * N_CTX].reshape(chunks, N_CTX).copy()
    bos = vocab.bos_token_id
    if tokens[0] == bos:  # the vocabulary adds BOS: llama.cpp puts it at the start of every window
        blocks[:, 0] = bos

    base = scratch / "teacher-f16.kld"
    run_tool(tool, f16, text, base, chunks, args.threads, make_base=True)
    reference = llamacpp.logits_fn(f16, N_CTX, args.threads)
    rows = []
    for name, path in files.items():
        ours = compare(llamacpp.logits_fn(path, N_CTX, args.threads), reference, blocks, first=N_CTX // 2).to_dict()
        theirs = parse(run_tool(tool, path, text, base, chunks, args.threads, make_base=False))
        rows.append({"file": name, "path": str(path), "edgekd": ours, "llama_perplexity": theirs})
        print(f"{name}: edgekd KL {ours['kl_mean']:.5f}, llama-perplexity {theirs.get('kl_mean')}", flush=True)
    write_result("llama_perplexity_agreement", {"chunks": chunks, "n_ctx": N_CTX, "tokens_scored": chunks * (N_CTX - 1 - N_CTX // 2),
                                                "tool": str(tool), "rows": rows})
    keys = ["kl_mean", "kl_median", "kl_p90", "kl_p99", "kl_max", "delta_p_rms_pct", "same_top1", "perplexity", "reference_perplexity"]
    print(f"\n{chunks} windows of {N_CTX} tokens, second halves scored ({chunks * (N_CTX - 1 - N_CTX // 2)} tokens); base: teacher F16 in llama.cpp\n")
    print("| file | scored by | mean KL | median | p90 | p99 | max | RMS Δp % | same top-1 % | PPL | base PPL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for who, s in (("edgekd", r["edgekd"]), ("llama-perplexity", r["llama_perplexity"])):
            cells = [("n/a" if s.get(k) is None else f"{100 * s[k]:.2f}" if k == "same_top1" else f"{s[k]:.5f}") for k in keys]
            print(f"| {r['file']} | {who} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
