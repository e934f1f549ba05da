"""The K-quant numpy reference quantizers (edgekd.kquants) in one call against their scale searches split
by rows into cache-sized chunks over a thread per core, and against llama.cpp's own quantizer (what the
formats use where llama-cpp-python is installed): the same bytes, measured side by side on weights of
real models' shapes."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from unittest import mock

import numpy as np
from common import write_result

from edgekd import kquants

SHAPES = {  # (rows, cols) of a real tensor: K-quants need cols a multiple of 256
    "SmolLM2-135M ffn_down": (576, 1536),
    "Qwen3-0.6B ffn_up": (3072, 1024),
    "Llama-3.2-1B ffn_up": (8192, 2048),
}


def cmd_kquants(args) -> None:
    rows = []
    for shape_name, shape in SHAPES.items():
        w = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
        for kind in ("q4_k", "q5_k", "q6_k"):
            times: dict[str, list[float]] = {"one call": [], "threads": [], "llama.cpp": []}
            same = True
            for _ in range(args.rounds):
                out = {}
                for arm in times:  # alternating, so a slower stretch of a shared host hits every arm
                    with mock.patch.object(kquants, "_in_row_chunks", lambda search, *a: search(*a)) if arm == "one call" \
                            else contextlib.nullcontext():
                        t0 = time.perf_counter()
                        out[arm] = kquants.quantize(kind, w) if arm == "llama.cpp" else kquants.REFERENCES[kind](w)
                        times[arm].append(time.perf_counter() - t0)
                same = same and all(np.array_equal(getattr(out["one call"], f), getattr(out[arm], f))
                                    for arm in ("threads", "llama.cpp") for f in kquants.GRID_FIELDS if getattr(out["one call"], f) is not None)
            one, threaded, native = (statistics.median(times[a]) for a in ("one call", "threads", "llama.cpp"))
            row = {"tensor": shape_name, "shape": list(shape), "kind": kind, "one_call_s": round(one, 3),
                   "threads_s": round(threaded, 3), "speed_up": round(one / threaded, 2),
                   "threads_mweights_per_s": round(w.size / 1e6 / threaded, 2), "llama_cpp_s": round(native, 4),
                   "llama_cpp_mweights_per_s": round(w.size / 1e6 / native, 1), "llama_cpp_over_threads": round(threaded / native, 1),
                   "same_bytes": same}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    write_result("speed_kquants", {"rounds": args.rounds, "rows": rows})
    print("| tensor | kind | one call (s) | threads (s) | speed-up | M weights/s | llama.cpp's (s) | M weights/s | "
          "against threads | same bytes |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tensor']} {tuple(r['shape'])} | {r['kind']} | {r['one_call_s']:.2f} | {r['threads_s']:.2f} | "
              f"{r['speed_up']:.2f}x | {r['threads_mweights_per_s']:.2f} | {r['llama_cpp_s']:.3f} | {r['llama_cpp_mweights_per_s']:.1f} | "
              f"{r['llama_cpp_over_threads']:.1f}x | {'yes' if r['same_bytes'] else 'NO'} |")


def cmd_round_trips(args) -> None:
    """The sensitivity stage's round trips: every tensor group through every planner format it fits,
    timed as the stage makes them (once for each calibration batch it measures under a time budget)."""
    import torch

    from edgekd.formats import FORMATS, PLANNER_FORMATS
    from edgekd.methods import sensitivity as sens

    if args.model == "default":
        from common import default_setup

        model = default_setup().teacher.model
    else:
        from memory_fit import qwen3_06b_teacher

        model = qwen3_06b_teacher()
    groups, candidates = sens._group_modules(model), list(PLANNER_FORMATS)
    by_format: dict[str, float] = {}
    with torch.no_grad():
        for mods in groups.values():
            for name in sens._fitting(candidates, mods):
                t1 = time.perf_counter()
                for m in mods:
                    FORMATS[name].torch_round_trip(m.weight.data)
                by_format[name] = by_format.get(name, 0.0) + time.perf_counter() - t1
    measured = sum(by_format.values())
    out = {"model": args.model, "formats": candidates, "measured_s": round(measured, 1),
           "measured_by_format_s": {k: round(v, 1) for k, v in by_format.items()}}
    if args.stage:  # the whole stage on the profile's calibration blocks, each quantizer, every cost compared
        out["stage"] = stage_with_each_quantizer(model, candidates, args.stage, args.stage_arms.split(","))
    write_result(f"speed_round_trips_{args.model}", out)
    print(out)


def stage_with_each_quantizer(model, candidates: list[str], blocks: int, arms: list[str]) -> dict:
    """``measure_sensitivity`` on ``blocks`` calibration blocks of the default corpus (the default teacher's token
    ids, whatever the model: a timing) with llama.cpp's quantizer and with the numpy reference (its library
    hidden), one after the other: seconds, measurements, and whether every cost is the same."""
    from common import default_setup

    from edgekd.device import llamacpp as native
    from edgekd.methods.data import calibration_blocks
    from edgekd.methods.sensitivity import measure_sensitivity, measurements

    calib = calibration_blocks(default_setup().train, blocks)
    runs = {}
    for arm in arms:
        with mock.patch.dict(native._GGML, {"lib": None}) if arm == "reference" else contextlib.nullcontext():
            t0 = time.perf_counter()
            runs[arm] = (measure_sensitivity(model, calib, candidates), time.perf_counter() - t0)
        print(arm, f"{runs[arm][1]:.1f} s", file=sys.stderr, flush=True)
    out = {"blocks": blocks, "measurements": measurements(model, candidates),
           **{f"{arm.replace('.', '_')}_s": round(runs[arm][1], 1) for arm in runs}}
    if len(runs) == 2:
        a, b = runs["llama.cpp"][0], runs["reference"][0]
        out["same_costs"] = (a.formats, a.blocks, a.mlp_width) == (b.formats, b.blocks, b.mlp_width)
    return out
