"""Speed of the toolkit itself, each figure a ratio measured side by side in one run.

    .venv/bin/python benchmarks/speed_table.py loop   [--steps 5 --rounds 3]   # edgekd step vs a bare PyTorch loop
    .venv/bin/python benchmarks/speed_table.py cache  [--steps 40]             # top-k logit cache vs live teacher
    .venv/bin/python benchmarks/speed_table.py bf16   [--steps 20 --qat-steps 5]  # bf16 autocast vs fp32
    .venv/bin/python benchmarks/speed_table.py decode [--gguf F] [--onnx F|default]  # decode vs the bandwidth roofline
    .venv/bin/python benchmarks/speed_table.py profile [--tool perf --threads 2]  # where decode time goes
    .venv/bin/python benchmarks/speed_table.py builds --build NAME=SITE_DIR ...  # llama.cpp builds side by side

All runs use the default teacher (SmolLM2-135M-Instruct), the default profile's batch (4 x 256
tokens), and a 24-layer student pruned by Block Influence, as the default run makes it. Each
subcommand writes ``results/speed_<name>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


SOURCES = {"teacher": None, "blocks": None}  # --teacher / --blocks: the same model and tokens on another machine


def setup():
    import types

    import edgekd
    from edgekd.data import calibration_blocks, load_corpus
    from edgekd.models import load_causal_lm, resolve_model_source
    from edgekd.prune import make_student, score_blocks, select_layers

    torch.manual_seed(0)
    prof = edgekd.load_profile("raspberry-pi-5")
    teacher = load_causal_lm(resolve_model_source(SOURCES["teacher"]))
    ds = prof.compression.distill
    if SOURCES["blocks"]:  # written by qat_recipe.py --write-blocks
        data = np.load(SOURCES["blocks"])
        corpus = types.SimpleNamespace(train=data["train"], heldout=data["heldout"])
    else:
        corpus = load_corpus(None, teacher.tokenizer, ds.seq_len, prof.compression.evaluation.heldout_fraction)
    train = corpus.train
    calib = calibration_blocks(train, prof.compression.prune.calibration_blocks)
    keep = select_layers(score_blocks(teacher.model, calib), 24, "block_influence")
    if torch.cuda.is_available():
        teacher.model.to("cuda")
    return prof, teacher, corpus, keep, lambda: make_student(teacher.model, keep)


def held_metrics(model, teacher, corpus, prof) -> dict:
    from edgekd.evaluate import evaluate, torch_logits_fn

    held = corpus.heldout[: prof.compression.evaluation.max_heldout_blocks]
    m = evaluate(torch_logits_fn(model), held, torch_logits_fn(teacher.model))
    return {"perplexity": m.perplexity, "kl_to_teacher": m.kl_to_teacher, "top1_agreement": m.top1_agreement}


def write(name: str, result: dict) -> None:
    from edgekd.versions import host_info, library_versions

    out = HERE / "results" / f"speed_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "host": host_info(), "versions": library_versions()}, indent=2) + "\n")


# ---------------------------------------------------------------- 1. loop overhead


def bare_steps(student, teacher, train, cfg, layer_map, steps: int, start: int) -> list[float]:
    """The same work as one edgekd step, written as a plain PyTorch loop: no Accelerate, no
    checkpoints, no history; same data, losses, precision, clipping and optimizer."""
    from edgekd.distill import forward_precision, sample_indices
    from edgekd.losses import attention_kl, hidden_state_loss, kd_loss

    student.train().requires_grad_(True)
    for m in (student, teacher):  # attention maps exist only in the eager implementation
        m.set_attn_implementation("eager")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    times = []
    for step in range(start, start + steps):
        t0 = time.perf_counter()
        ids = torch.from_numpy(train[sample_indices(step, 0, cfg, len(train), 0, 1)].astype(np.int64))
        with torch.no_grad(), forward_precision(cfg.precision, "cpu"):
            t = teacher(input_ids=ids, use_cache=False, output_hidden_states=True, output_attentions=True)
        with forward_precision(cfg.precision, "cpu"):
            s = student(input_ids=ids, use_cache=False, output_hidden_states=True, output_attentions=True)
        terms = kd_loss(s.logits[:, :-1], t.logits[:, :-1], ids[:, 1:], cfg.alpha, cfg.temperature)
        last = len(layer_map) - 1
        s_h = [s.hidden_states[i + 1] for i in range(len(layer_map))]
        t_h = [t.hidden_states[j + 1] if i < last else teacher.model.norm(t.hidden_states[j + 1]) for i, j in enumerate(layer_map)]
        loss = terms["loss"] + cfg.w_hidden * hidden_state_loss(s_h, t_h) + \
            cfg.w_attention * attention_kl(list(s.attentions), [t.attentions[j] for j in layer_map])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def cmd_loop(args) -> None:
    from edgekd.distill import DistillConfig, distill

    prof, teacher, corpus, keep, new_student = setup()
    cfg = DistillConfig.from_settings(prof.compression.distill, steps=args.steps)
    teacher.model.set_attn_implementation("eager")
    edgekd_times, bare_times, ratios = [], [], []
    for r in range(args.rounds):  # interleaved, so drifting machine load hits both alike
        student = new_student()
        student.set_attn_implementation("eager")
        out = distill(student, teacher.model, corpus.train, cfg, keep)
        e = [h["step_s"] for h in out.history][1:]  # the first step of each run warms up allocators
        student = new_student()
        student.set_attn_implementation("eager")
        b = bare_steps(student, teacher.model, corpus.train, cfg, keep, args.steps, 0)[1:]
        edgekd_times += e
        bare_times += b
        ratios.append(statistics.median(e) / statistics.median(b))
        print(f"round {r}: edgekd {statistics.median(e):.2f} s, bare {statistics.median(b):.2f} s", file=sys.stderr, flush=True)
    result = {"steps_per_round": args.steps, "rounds": args.rounds, "precision": cfg.precision,
              "edgekd_median_s": statistics.median(edgekd_times), "bare_median_s": statistics.median(bare_times),
              "ratio_of_medians": statistics.median(edgekd_times) / statistics.median(bare_times), "per_round_ratios": ratios,
              "edgekd_all": edgekd_times, "bare_all": bare_times}
    write("loop", result)
    print("| loop | median step (s) | steps timed |\n|---|---|---|")
    print(f"| edgekd distill() | {result['edgekd_median_s']:.2f} | {len(edgekd_times)} |")
    print(f"| bare PyTorch | {result['bare_median_s']:.2f} | {len(bare_times)} |")
    print(f"\nratio {result['ratio_of_medians']:.3f}; per round {', '.join(f'{x:.3f}' for x in ratios)} ({cfg.precision})")


# ---------------------------------------------------------------- 2. logit cache


def cmd_cache(args) -> None:
    import tempfile

    from edgekd import logit_cache
    from edgekd.distill import DistillConfig, distill

    prof, teacher, corpus, keep, new_student = setup()
    ds = prof.compression.distill
    cfg = DistillConfig.from_settings(ds, steps=args.steps)
    cfg.w_hidden = cfg.w_attention = 0.0  # logit-only KD: the case the cache serves
    t0 = time.perf_counter()
    full = logit_cache.build(teacher.model, corpus.train, max(args.ks), ds.temperature, Path(tempfile.mkdtemp()) / "c",
                             kind=args.kind)
    build_s = time.perf_counter() - t0
    rows = []
    # live-teacher runs at other seeds (other data orders) measure the noise the cache is compared with
    for k, seed in [(None, 0), *[(k, 0) for k in args.ks], *[(None, s) for s in args.noise_seeds]]:
        cache = None if k is None else full.first(k)
        student = new_student()
        run_cfg = copy.deepcopy(cfg)
        run_cfg.seed = seed
        out = distill(student, teacher.model, corpus.train, run_cfg, keep, logit_cache=cache)
        step = statistics.median(h["step_s"] for h in out.history[1:])
        rows.append({"k": k, "seed": seed, "median_step_s": step, "mb_per_million_tokens": None if k is None else 8 * k,
                     **held_metrics(student, teacher, corpus, prof)})
        print(rows[-1], file=sys.stderr, flush=True)
    live = rows[0]["median_step_s"]
    for r in rows:
        r["speedup_vs_live"] = live / r["median_step_s"]
    write(f"cache_{args.kind}", {"kind": args.kind, "steps": args.steps, "precision": cfg.precision, "build_s": build_s, "device": str(teacher.model.device),
                    "train_tokens": int(corpus.train.size), "rows": rows})
    print(f"cache built once at k={max(args.ks)} in {build_s:.0f} s over {corpus.train.size:,} training tokens; "
          f"{args.steps} steps per row, {cfg.precision}\n")
    print("| teacher targets | median step (s) | speed-up | MB per 1M tokens | KL to teacher | perplexity | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = (f"live teacher, seed {r['seed']}" if r["k"] is None else f"cache, {args.kind} k={r['k']}, seed {r['seed']}")
        mb = "n/a" if r["k"] is None else f"{r['mb_per_million_tokens']}"
        print(f"| {name} | {r['median_step_s']:.2f} | {r['speedup_vs_live']:.2f}x | {mb} | {r['kl_to_teacher']:.4f} | "
              f"{r['perplexity']:.3f} | {r['top1_agreement']:.4f} |")


# ---------------------------------------------------------------- 3. bf16


def cmd_bf16(args) -> None:
    from edgekd.distill import DistillConfig, bf16_supported, distill
    from edgekd.quant import prepare_qat

    prof, teacher, corpus, keep, new_student = setup()
    rows = []
    for precision in ("fp32", "bf16"):
        cfg = DistillConfig.from_settings(prof.compression.distill, steps=args.steps)
        cfg.precision = precision
        student = new_student()
        out = distill(student, teacher.model, corpus.train, cfg, keep)
        qat_cfg = copy.deepcopy(cfg)
        qat_cfg.steps, qat_cfg.w_hidden, qat_cfg.w_attention = args.qat_steps, 0.0, 0.0
        qat_student = prepare_qat(copy.deepcopy(student), "q4_0")
        q_out = distill(qat_student, teacher.model, corpus.train, qat_cfg, keep)
        rows.append({"precision": precision, "distill_median_step_s": statistics.median(h["step_s"] for h in out.history[1:]),
                     "qat_median_step_s": statistics.median(h["step_s"] for h in q_out.history[1:]),
                     **held_metrics(student, teacher, corpus, prof)})
        print(rows[-1], file=sys.stderr, flush=True)
    fp32, bf16 = rows
    write("bf16", {"steps": args.steps, "qat_steps": args.qat_steps, "bf16_supported": bf16_supported(), "rows": rows,
                   "distill_speedup": fp32["distill_median_step_s"] / bf16["distill_median_step_s"],
                   "qat_speedup": fp32["qat_median_step_s"] / bf16["qat_median_step_s"]})
    print("| precision | distill step (s) | QAT step (s) | KL to teacher | perplexity | top-1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['distill_median_step_s']:.2f} | {r['qat_median_step_s']:.2f} | {r['kl_to_teacher']:.4f} | "
              f"{r['perplexity']:.3f} | {r['top1_agreement']:.4f} |")
    print(f"\nbf16 speed-up: distillation {fp32['distill_median_step_s'] / bf16['distill_median_step_s']:.2f}x, "
          f"QAT {fp32['qat_median_step_s'] / bf16['qat_median_step_s']:.2f}x (after {args.steps} distillation steps)")


# ---------------------------------------------------------------- 4. decode vs roofline


GGUF_HELP = "the Q4_0 GGUF to decode (default: the teacher written by edgekd's Q4_0 exporter)"


def default_q4_0_file(kind: str) -> str:
    """The default teacher through edgekd's Q4_0 exporters (``kind``: gguf or onnx), cached: the
    tensor types and shapes of every full-depth edgekd Q4_0 file (GGUF: Q4_0 blocks and a Q8_0
    tied embedding/head; ONNX: int4 MatMulNBits), so the decode speed of the phone run's QAT
    files without their 30-minute training; speed does not depend on the weights' values."""
    from edgekd.models import cache_dir, load_causal_lm, resolve_model_source

    src = resolve_model_source(SOURCES["teacher"])
    out = cache_dir() / "benchmarks" / f"{Path(str(src.path)).stem}-edgekd-q4_0.{kind}"
    if not out.exists():
        from edgekd.exporters.gguf import export_gguf
        from edgekd.exporters.onnx import export_onnx

        teacher = load_causal_lm(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "gguf":
            tmp = out.with_suffix(".partial.gguf")
            export_gguf(teacher.model, teacher.tokenizer, tmp, "q4_0", source_gguf=src.path, source_name=src.name)
            tmp.rename(out)
        else:  # export_onnx writes the graph and its .data file in a temporary directory, then moves them
            export_onnx(teacher.model, out, "q4_0")
    return str(out)


DECODE_WINDOW = """
import sys, time
from edgekd import llamacpp
gguf, threads, start, stop, maps_out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
llm = llamacpp.load(gguf, n_ctx=256, threads=threads, n_batch=32)
toks = [(i * 7919) % llm.n_vocab() for i in range(64)]
llm.eval(toks[:8])  # warm-up
start = start or time.time()  # 0: right after loading
while time.time() < start:
    time.sleep(0.001)
n = 0
while time.time() < stop:
    llm.reset()
    for t in toks:
        llm.eval([t])
        n += 1
print(f"decode_tokens_per_s={n / (time.time() - start)}")  # over the window
if maps_out:  # to name the frames a profiler leaves as addresses
    open(maps_out, "w").write(open("/proc/self/maps").read())
"""


def decode_window_cmd(gguf: str, threads: int, start: float, stop: float, maps_out: str = "") -> list[str]:
    """The command of a process that loads ``gguf`` and decodes 64-token sequences from ``start``
    (0: as soon as it has loaded) until ``stop`` (Unix times); it prints its tokens/s."""
    return [sys.executable, "-c", DECODE_WINDOW, gguf, str(threads), str(start), str(stop), maps_out]


def decode_window_rate(stdout: str) -> float:
    """The tokens/s a DECODE_WINDOW process printed (a profiler may print lines of its own)."""
    import re

    return float(re.search(r"decode_tokens_per_s=(\S+)", stdout)[1])


def bytes_read_per_token(model_facts: dict, gguf: bool) -> float:
    """Weights plus the KV cache a decode from an empty context to 64 tokens reads on average
    (32 positions; f16 cache in llama.cpp, fp32 in the ONNX decoder)."""
    from edgekd.costmodel import ModelFacts

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
    from edgekd import hostperf

    per_round: dict = {}
    for rnd in range(args.rounds):
        for threads in (1, 2):
            host = hostperf.measure(threads)
            for path in [p for p in (args.gguf, args.onnx) if p]:
                r = edgekd.bench(path, "raspberry-pi-5", threads=threads, repeats=5, prompt_tokens=128, gen_tokens=64, projection=False)
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
    write("decode", {"rounds": args.rounds, "rows": rows})
    print(f"| file | runtime | threads | copy GB/s | MB read per token | roofline tok/s | decode tok/s | fraction (range over {args.rounds} rounds) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['runtime']} | {r['threads']} | {r['copy_gbs']:.1f} | {r['bytes_per_token_mb']:.1f} | "
              f"{r['roofline_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {100 * r['fraction']:.0f}% "
              f"({100 * r['fraction_min']:.0f}-{100 * r['fraction_max']:.0f}%) |")


# ---------------------------------------------------------------- 4a. llama.cpp builds side by side

BUILD_DECODE = """
import json, sys
import llama_cpp
import edgekd
r = edgekd.bench(sys.argv[1], "raspberry-pi-5", threads=int(sys.argv[2]), repeats=int(sys.argv[3]), prompt_tokens=128,
                 gen_tokens=64, projection=False)
# a digest of the logits of 48 tokens decoded one at a time: equal digests = bit-identical decoding
import hashlib
from edgekd import llamacpp
llm = llamacpp.load(sys.argv[1], n_ctx=128, threads=int(sys.argv[2]))
digest = hashlib.sha256()
for i in range(48):
    llm.eval([(i * 7919 + 13) % llm.n_vocab()])
    digest.update(llm.scores[llm.n_tokens - 1].tobytes())
print(json.dumps({"decode_tokens_per_s": r.tg_tokens_per_s.median, "prefill_tokens_per_s": r.pp_tokens_per_s.median,
                  "logits_sha256": digest.hexdigest(),
                  "model_facts": r.model_facts,
                  "llama_cpp_file": llama_cpp.__file__, "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def cmd_builds(args) -> None:
    """Decode of one GGUF under several llama-cpp-python builds, each installed in its own
    directory (``pip install --target DIR wheel``) and put first on ``PYTHONPATH`` in a fresh
    process; builds alternate within each round so drift on a shared machine hits all alike.
    ``--build current=`` (empty directory) is the build installed in this environment."""
    import os
    import subprocess

    from edgekd import hostperf

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
                out = subprocess.run([sys.executable, "-c", BUILD_DECODE, args.gguf, str(t), str(args.repeats)], env=env,
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
    write(args.name, {"file": Path(args.gguf).name, "bytes_per_token": bytes_per_token, "copy_gbs_rounds": copy,
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
    write("profile" if (args.tool, args.threads) == ("py-spy", 1) else f"profile_{args.tool}_{args.threads}t", out)
    print(f"decode while profiled: {rate:.1f} tokens/s\n")
    print(f"| what (leaf frame of {total} {args.tool} samples, {args.threads} thread(s)) | share |\n|---|---|")
    for c, share in out["categories"].items():
        print(f"| {c} | {100 * share:.1f}% |")
    print("\n| function | share |\n|---|---|")
    for r in out["top_functions"]:
        print(f"| `{r['function']}` | {100 * r['share']:.1f}% |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None, help="GGUF or HF directory (default: the embedded teacher)")
    ap.add_argument("--blocks", default=None, help="token blocks from qat_recipe.py --write-blocks (default: the default corpus)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loop")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("cache")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[1, 2])
    p.add_argument("--kind", choices=["sample", "topk"], default="sample")
    p = sub.add_parser("bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--qat-steps", type=int, default=5)
    p = sub.add_parser("decode")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--onnx", default=None, help="an int4 ONNX to decode too ('default': the teacher through edgekd's exporter)")
    p = sub.add_parser("builds")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--build", action="append", required=True, help="NAME=DIR with a llama-cpp-python build (empty DIR: this env's)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--name", default="builds", help="results/speed_NAME.json")
    p = sub.add_parser("profile")
    p.add_argument("--gguf", default=None, help=GGUF_HELP)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tool", choices=["py-spy", "perf"], default="py-spy")
    args = ap.parse_args()
    SOURCES.update(teacher=args.teacher, blocks=args.blocks)
    if getattr(args, "gguf", "") is None:
        args.gguf = default_q4_0_file("gguf")
    if getattr(args, "onnx", "") == "default":
        args.onnx = default_q4_0_file("onnx")
    {"loop": cmd_loop, "cache": cmd_cache, "bf16": cmd_bf16, "decode": cmd_decode, "builds": cmd_builds,
     "profile": cmd_profile}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
