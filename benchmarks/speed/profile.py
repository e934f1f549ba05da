"""Where decode time goes: a profiler samples a process decoding with llama.cpp, and each sample's
leaf frame is named (ggml's stripped libraries: by the nearest exported symbols) and put in a category.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import write_result

from speed.decode import decode_window_cmd, decode_window_rate


def _nearest_symbol():
    """(library path, address in the file) -> 'nearest exported symbol below it (library)':
    ggml's libraries are stripped of local symbols, so unexported kernels are named by neighbours."""
    import bisect
    import subprocess

    symbols: dict = {}

    def lookup(path: str, rel: int) -> str:
        if path not in symbols:
            out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout
            symbols[path] = sorted((int(a, 16), n) for a, _, n in (ln.split(" ", 2) for ln in out.splitlines() if ln.count(" ") >= 2))
        syms = symbols[path]
        i = bisect.bisect_right([a for a, _ in syms], rel) - 1
        below = syms[i][1] if i >= 0 else "?"
        above = syms[i + 1][1] if i + 1 < len(syms) else "?"
        return f"unexported code between {below} and {above} ({Path(path).name})"

    return lookup


def _executable_maps(maps_text: str) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of each executable mapping in a /proc/PID/maps text."""
    maps = []
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and "x" in parts[1]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi, int(parts[2], 16), parts[5]))
    return maps


def _resolver(maps_text: str):
    """Address in a process (from its /proc/self/maps) -> the name _nearest_symbol gives it."""
    maps = _executable_maps(maps_text)
    nearest = _nearest_symbol()

    def lookup(addr: int) -> str:
        for lo, hi, off, path in maps:
            if lo <= addr < hi:
                return nearest(path, addr - lo + off)
        return hex(addr)

    return lookup

# leaf-function name patterns -> what the time is spent on (ggml CPU backend names)
PROFILE_CATEGORIES = (
    # ggml's x86 repack.cpp keeps its Q4_0 8x8 GEMV kernel static, linked just before
    # ggml_quantize_mat_q8_0_4x8: the only code in that gap of the stripped library
    ("Q4_0 weight x Q8_0 activation products (repacked 8x8 GEMV)", ("vec_dot_q4_0", "gemv_q4_0", "and ggml_quantize_mat_q8_0_4x8")),
    ("Q8_0 weight dot products (output head, embeddings)", ("vec_dot_q8_0",)),
    ("activation quantization to Q8_0", ("quantize_row_q8", "quantize_q8")),
    # with 2+ threads: waiting at OpenMP barriers / for the other thread, and shared work counters
    ("thread synchronisation (OpenMP barrier and idle spin, work-chunk counters)", ("libgomp", "ggml_barrier", "threadpool_chunk")),
    ("attention and KV cache (f16 dot products, softmax, copies)", ("vec_dot_f16", "soft_max", "flash_attn", "cpy_f32_f16", "set_rows")),
    ("norms, rope, elementwise", ("rms_norm", "rope", "silu", "swiglu", "glu", "vec_mul", "add", "mul_f32", "get_rows")),
    ("graph build, scheduling, allocation (llama.cpp host code)", ("graph", "sched", "alloc", "build", "llama_", "ggml_backend")),
    ("Python and llama-cpp-python (per-token calls, logits copy)", ("<module>", ".py", "PyEval", "_Py", "numpy", "memcpy", "memmove")),
)


def _py_spy_leaves(args, work: Path):
    """py-spy (--native) samples the Python thread; leaf frames inside ``Llama.eval`` only (not
    start-up or loading). py-spy pauses the process for each sample, so only one thread."""
    import collections
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy not found: install the dev extras (`pip install -e '.[dev]'`, part of `make install`)")
    raw, maps = work / "decode.txt", work / "maps.txt"
    rate = subprocess.run([spy, "record", "--native", "--rate", "200", "--format", "raw", "-o", str(raw), "--",
                           *decode_window_cmd(args.gguf, args.threads, 0, time.time() + args.seconds, str(maps))],
                          check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    lookup = _resolver(maps.read_text())
    leaves: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "Llama.eval (" in stack:
            leaf = stack.split(";")[-1].split(" (")[0].strip()
            leaves[lookup(int(leaf, 16)) if leaf.startswith("0x") else leaf] += int(count)
    return leaves, decode_window_rate(rate)


def _perf_leaves(args, work: Path):
    """Linux perf (software clock, so it works in VMs without hardware counters) samples every
    thread without stopping the process: the way to see ggml's worker threads and their barriers.
    Whole process, so the ~1 s model load is in the samples too."""
    import collections
    import re
    import shutil
    import subprocess

    if not shutil.which("perf"):
        sys.exit("perf not found: install Linux perf (Debian: apt install linux-perf) or use --tool py-spy")
    data, maps = work / "perf.data", work / "maps.txt"
    rate = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1000", "-o", str(data), "--",
                           *decode_window_cmd(args.gguf, args.threads, 0, time.time() + args.seconds, str(maps))],
                          check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym", "-F", "sample,dso,sym"],
                            check=True, capture_output=True, text=True).stdout
    # perf prints library names only: their paths from the decoding process's memory map
    paths = {Path(path).name: path for _, _, _, path in _executable_maps(maps.read_text())}
    nearest = _nearest_symbol()
    leaves: collections.Counter = collections.Counter()
    for line in report.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[.\]\s+(.+?)\s*$", line)
        if m:
            n, dso, sym = int(m[1]), m[2], m[3]
            leaves[nearest(paths[dso], int(sym, 16)) if sym.startswith("0x") and dso in paths else sym] += n
    return leaves, decode_window_rate(rate)


def cmd_profile(args) -> None:
    """Where decode time goes: a profiler samples a process decoding 64-token sequences for
    ``--seconds`` with ``--threads`` threads; the leaf frame of each sample says which code ran."""
    import collections
    import tempfile

    if args.tool == "py-spy" and args.threads != 1:
        sys.exit("py-spy pauses the process for each sample, which distorts ggml's thread barriers: use --tool perf")
    work = Path(tempfile.mkdtemp())
    leaves, rate = (_py_spy_leaves if args.tool == "py-spy" else _perf_leaves)(args, work)
    total = sum(leaves.values())
    cats: collections.Counter = collections.Counter()
    for name, n in leaves.items():
        cat = next((c for c, pats in PROFILE_CATEGORIES if any(p in name for p in pats)), "other")
        cats[cat] += n
    out = {"file": Path(args.gguf).name, "tool": args.tool, "samples": total, "seconds": args.seconds, "threads": args.threads,
           "decode_tokens_per_s_while_profiled": rate,
           "categories": {c: n / total for c, n in cats.most_common()},
           "top_functions": [{"function": f, "share": n / total} for f, n in leaves.most_common(15)]}
    write_result("speed_profile" if (args.tool, args.threads) == ("py-spy", 1) else f"speed_profile_{args.tool}_{args.threads}t", out)
    print(f"decode while profiled: {rate:.1f} tokens/s\n")
    print(f"| what (leaf frame of {total} {args.tool} samples, {args.threads} thread(s)) | share |\n|---|---|")
    for c, share in out["categories"].items():
        print(f"| {c} | {100 * share:.1f}% |")
    print("\n| function | share |\n|---|---|")
    for r in out["top_functions"]:
        print(f"| `{r['function']}` | {100 * r['share']:.1f}% |")
