"""Decode speed against the memory-bandwidth roofline, and llama.cpp builds side by side.

The roofline of one decoded token is the bytes it reads (weights and KV cache) over this host's
STREAM-copy bandwidth, measured right before the decodes it is compared with.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from common import PROFILE, write_result

HERE = Path(__file__).resolve().parent
GGUF_HELP = "the GGUF to decode (default: the teacher written by edgekd's exporter in the default profile's format)"


def default_file(kind: str, teacher: str | None = None) -> str:
    """The default teacher through edgekd's exporters in the default profile's weight format
    (``kind``: gguf or onnx), cached: the tensor types and shapes of every full-depth edgekd file
    of that format (GGUF: Q4_0 blocks and a Q8_0 tied embedding/head; ONNX: int4 MatMulNBits),
    so the decode speed of the phone run's QAT files without their 30-minute training; speed does
    not depend on the weights' values."""
    import edgekd
    from edgekd.exporters.ship import planned_export
    from edgekd.formats import FormatPlan
    from edgekd.methods.models import cache_dir, load_causal_lm, resolve_model_source

    src = resolve_model_source(teacher)
    plan = FormatPlan.uniform(edgekd.load_profile(PROFILE).deployment.weight_format)
    out = cache_dir() / "benchmarks" / f"{Path(str(src.path)).stem}-edgekd-{planned_export(kind, plan).file_name}"
    if not out.exists():
        from edgekd.exporters.gguf import export_gguf
        from edgekd.exporters.onnx import export_onnx

        loaded = load_causal_lm(src)
        if kind == "gguf":
            export_gguf(loaded.model, loaded.tokenizer, out, plan, source_gguf=src.path, source_name=src.name)
        else:
            export_onnx(loaded.model, out, plan)
    return str(out)


def decode_window_cmd(gguf: str, threads: int, start: float, stop: float, maps_out: str = "") -> list[str]:
    """The command of a process that loads ``gguf`` and decodes 64-token sequences from ``start``
    (0: as soon as it has loaded) until ``stop`` (Unix times); it prints its tokens/s."""
    return [sys.executable, str(HERE / "decode_window.py"), gguf, str(threads), str(start), str(stop), maps_out]


def decode_window_rate(stdout: str) -> float:
    """The tokens/s a decode_window.py process printed (a profiler may print lines of its own)."""
    import re

    return float(re.search(r"decode_tokens_per_s=(\S+)", stdout)[1])


def bytes_read_per_token(model_facts: dict, gguf: bool) -> float:
    """Weights plus the KV cache a decode from an empty context to 64 tokens reads on average
    (32 positions; f16 cache in llama.cpp, fp32 in the ONNX decoder)."""
    from edgekd.device.costmodel import ModelFacts

    facts = ModelFacts(**model_facts)
    return facts.tensor_bytes + facts.kv_bytes(32, 2 if gguf else 4)


def independent_decoders(gguf: str, n: int, seconds: float = 8.0) -> float:
    """Aggregate decode tokens/s of ``n`` one-thread llama.cpp processes decoding over the same
    time window: what the cores and memory deliver when no thread waits for another."""
    import subprocess

    start = time.time() + 4.0  # after every process has loaded the model
    procs = [subprocess.Popen(decode_window_cmd(gguf, 1, start, start + seconds), stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    return sum(decode_window_rate(p.communicate()[0]) for p in procs)


def cmd_decode(args) -> None:
    """Decode tokens/s against the roofline (copy bandwidth / bytes read per token), on 1 and 2
    threads, in ``--rounds`` rounds; each round measures the bandwidth right before the decodes
    it is compared with, and the table gives medians over rounds (2-thread bandwidth on a shared
    VM swings by up to 2x between runs)."""
    import edgekd
    from edgekd.device import hostperf

    per_round: dict = {}
    for rnd in range(args.rounds):
        for threads in (1, 2):
            host = hostperf.measure(threads)
            for path in [p for p in (args.gguf, args.onnx) if p]:
                r = edgekd.bench(path, PROFILE, threads=threads, repeats=5, prompt_tokens=128, gen_tokens=64, projection=False)
                bytes_per_token = bytes_read_per_token(r.model_facts, path.endswith(".gguf"))
                row = per_round.setdefault((path, threads), {"file": Path(path).name, "runtime": r.runtime, "threads": threads,
                                                             "bytes_per_token_mb": bytes_per_token / 1e6, "rounds": []})
                tps = r.tg_tokens_per_s.median
                row["rounds"].append({"copy_gbs": host.copy_bandwidth_gbs, "decode_tokens_per_s": tps,
                                      "fraction": tps * bytes_per_token / (host.copy_bandwidth_gbs * 1e9)})
                print(f"round {rnd + 1}: {row['file']} {threads} thread(s) {tps:.1f} tok/s, "
                      f"{100 * row['rounds'][-1]['fraction']:.0f}% of roofline", file=sys.stderr, flush=True)
            if threads == 2:  # the same two cores, each with its own one-thread decoder
                tps = independent_decoders(args.gguf, 2)
                row = per_round.setdefault("independent", {"file": Path(args.gguf).name, "threads": "2 x 1 (two processes)",
                                                           "runtime": per_round[(args.gguf, 2)]["runtime"],
                                                           "bytes_per_token_mb": per_round[(args.gguf, 2)]["bytes_per_token_mb"],
                                                           "rounds": []})
                row["rounds"].append({"copy_gbs": host.copy_bandwidth_gbs, "decode_tokens_per_s": tps,
                                      "fraction": tps * row["bytes_per_token_mb"] * 1e6 / (host.copy_bandwidth_gbs * 1e9)})
                print(f"round {rnd + 1}: two one-thread decoders {tps:.1f} tok/s together", file=sys.stderr, flush=True)
    rows = []
    for row in per_round.values():
        med = {k: statistics.median(x[k] for x in row["rounds"]) for k in ("copy_gbs", "decode_tokens_per_s", "fraction")}
        fr = [x["fraction"] for x in row["rounds"]]
        rows.append({**row, **med, "roofline_tokens_per_s": med["copy_gbs"] * 1e3 / row["bytes_per_token_mb"],
                     "fraction_min": min(fr), "fraction_max": max(fr)})
    write_result("speed_decode", {"rounds": args.rounds, "rows": rows})
    print(f"| file | runtime | threads | copy GB/s | MB read per token | roofline tok/s | decode tok/s | fraction (range over {args.rounds} rounds) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['runtime']} | {r['threads']} | {r['copy_gbs']:.1f} | {r['bytes_per_token_mb']:.1f} | "
              f"{r['roofline_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {100 * r['fraction']:.0f}% "
              f"({100 * r['fraction_min']:.0f}-{100 * r['fraction_max']:.0f}%) |")



# ---------------------------------------------------------------- llama.cpp builds side by side


def cmd_builds(args) -> None:
    """Decode of one GGUF under several llama-cpp-python builds, each installed in its own
    directory (``pip install --target DIR wheel``) and put first on ``PYTHONPATH`` in a fresh
    process; builds alternate within each round so drift on a shared machine hits all alike.
    ``--build current=`` (empty directory) is the build installed in this environment."""
    import os
    import subprocess

    from edgekd.device import hostperf

    builds = dict(b.split("=", 1) for b in args.build)
    samples: dict = {(n, t): [] for n in builds for t in args.threads}
    prefill: dict = {(n, t): [] for n in builds for t in args.threads}
    copy: dict = {t: [] for t in args.threads}
    info: dict = {}
    digests: dict = {}
    for rnd in range(args.rounds):
        for t in args.threads:
            copy[t].append(hostperf.measure(t).copy_bandwidth_gbs)
            for name, site in builds.items():
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p))
                out = subprocess.run([sys.executable, str(HERE / "build_probe.py"), args.gguf, str(t), str(args.repeats)], env=env,
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                samples[(name, t)].append(r["decode_tokens_per_s"])
                prefill[(name, t)].append(r["prefill_tokens_per_s"])
                info[name] = {"llama_cpp_file": r["llama_cpp_file"], "system_info": r["system_info"]}
                digests.setdefault((name, t), set()).add(r["logits_sha256"])
                print(f"round {rnd + 1} {name} {t} thread(s): {r['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    bytes_per_token = bytes_read_per_token(r["model_facts"], gguf=True)
    rows = []
    for (name, t), v in samples.items():
        bw = statistics.median(copy[t])
        tps = statistics.median(v)
        rows.append({"build": name, "threads": t, "decode_tokens_per_s_rounds": v, "decode_tokens_per_s": tps,
                     "logits_sha256": sorted(digests[(name, t)]),
                     "prefill_tokens_per_s_rounds": prefill[(name, t)], "prefill_tokens_per_s": statistics.median(prefill[(name, t)]),
                     "copy_gbs_median": bw, "roofline_tokens_per_s": bw * 1e9 / bytes_per_token,
                     "fraction": tps * bytes_per_token / (bw * 1e9)})
    write_result(f"speed_{args.name}", {"file": Path(args.gguf).name, "bytes_per_token": bytes_per_token, "copy_gbs_rounds": copy,
                     "builds": info, "rows": rows})
    base = rows[0]["build"]
    print(f"| build | threads | decode tok/s (median of {args.rounds} rounds) | vs {base} | copy GB/s | roofline tok/s | "
          f"fraction | prefill tok/s (128 tokens) | vs {base} | decode logits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["threads"]):
        ref = next(x for x in rows if x["build"] == base and x["threads"] == r["threads"])
        print(f"| {r['build']} | {r['threads']} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.3f}x | "
              f"{r['copy_gbs_median']:.1f} | {r['roofline_tokens_per_s']:.0f} | {100 * r['fraction']:.0f}% | "
              f"{r['prefill_tokens_per_s']:.0f} | {r['prefill_tokens_per_s'] / ref['prefill_tokens_per_s']:.3f}x | "
              f"{'identical to ' + base if r['logits_sha256'] == ref['logits_sha256'] else 'differ from ' + base} |")


# ---------------------------------------------------------------- 4b. where decode time goes


# ---------------------------------------------------------------- GGUF files side by side


def cmd_files(args) -> None:
    """Decode and prefill of several GGUF files under this environment's llama.cpp, measured in
    interleaved rounds (each round benches every file once) so drift on a shared machine hits
    all alike; medians over rounds, per thread count."""
    import edgekd

    files = [args.gguf, *args.file]
    rounds: dict = {(f, t): [] for f in files for t in args.threads}
    for rnd in range(args.rounds):
        for t in args.threads:
            for f in files:
                r = edgekd.bench(f, PROFILE, threads=t, repeats=args.repeats, prompt_tokens=128, gen_tokens=64, projection=False)
                rounds[(f, t)].append({"decode": r.tg_tokens_per_s.median, "prefill": r.pp_tokens_per_s.median, "file_mb": r.file_mb})
                print(f"round {rnd + 1} {Path(f).name} {t} thread(s): {r.tg_tokens_per_s.median:.1f} tok/s", file=sys.stderr, flush=True)
    rows = [{"file": Path(f).name, "path": f, "threads": t, "file_mb": v[0]["file_mb"],
             "decode_tokens_per_s": statistics.median(x["decode"] for x in v), "decode_rounds": [x["decode"] for x in v],
             "prefill_tokens_per_s": statistics.median(x["prefill"] for x in v)} for (f, t), v in rounds.items()]
    write_result(f"speed_{args.name}", {"rounds": args.rounds, "repeats": args.repeats, "rows": rows})
    base = rows[0]["file"]
    print(f"| file | MB | threads | decode tok/s (median of {args.rounds} rounds) | vs {base} | prefill tok/s |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["threads"]):
        ref = next(x for x in rows if x["file"] == base and x["threads"] == r["threads"])
        print(f"| {r['file']} | {r['file_mb']:.1f} | {r['threads']} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.3f}x | {r['prefill_tokens_per_s']:.0f} |")
