"""Do the shipped profiles make sense for the teachers people put on these devices (0.1-3B)?

For each profile and each architecture (real models' shapes; the planner needs no weights), the
planner (edgekd.methods.planner) searches formats, depth and MLP width under the profile's
budgets with the cost model's projections, and says what it would ship or why nothing fits.
Knob costs here are a stand-in, not a measurement: each format's KL is its relative mean squared
round-trip error on Gaussian weights (per tensor group, scaled by the group's share of the
parameters) and every block costs the same 0.05; a real run measures both (the sensitivity
stage). The question this answers is only whether the budgets leave any plan at all.

    .venv/bin/python benchmarks/profile_fit.py          # writes results/profile_fit.json, about a minute
"""

from __future__ import annotations

import argparse
import sys

from common import write_result

# name: (layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied) from each model's config.json
ARCH = {
    "SmolLM2-135M": (30, 576, 1536, 9, 3, 64, 49152, True),
    "Qwen3-0.6B": (28, 1024, 3072, 16, 8, 128, 151936, True),
    "Llama-3.2-1B": (16, 2048, 8192, 32, 8, 64, 128256, True),
    "SmolLM3-3B": (36, 2048, 11008, 16, 4, 128, 128256, True),
    "Gemma-3-270M": (18, 640, 2048, 4, 1, 256, 262144, True),
    "Gemma-3-1B": (26, 1152, 6912, 4, 1, 256, 262144, True),
}
# Gemma 3: every 6th block global, the others attend to a 512-token window
SLIDING = {"Gemma-3-270M": (15, 512), "Gemma-3-1B": (22, 512)}
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BLOCK_COST = 0.05


def stand_in_sensitivity(shape, candidates):
    import numpy as np

    from edgekd.formats import FORMATS
    from edgekd.methods.sensitivity import Sensitivity

    w = np.random.default_rng(0).normal(size=(256, 1024)).astype(np.float32)
    rel = {n: float(((FORMATS[n].round_trip(w) - w) ** 2).mean() / (w ** 2).mean()) for n in candidates}
    params = shape.role_params()
    total = sum(params.values()) * shape.layers + shape.embedding_params()
    formats = {"embedding": {n: rel[n] * 10 * shape.embedding_params() / total for n in candidates}}
    formats.update({r: {n: rel[n] * 10 * params[r] * shape.layers / total for n in candidates} for r in ROLES})
    return Sensitivity(tokens=0, formats=formats, blocks=[BLOCK_COST] * shape.layers, mlp_width={"0.75": 0.3, "0.5": 0.8})


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import edgekd
    from edgekd.device.costmodel import ArchShape
    from edgekd.errors import EdgekdError
    from edgekd.formats import FormatPlan
    from edgekd.methods.planner import Search, choose, depths, describe
    from edgekd.profiles import builtin_profile_names
    from edgekd.stages.plan import candidate_formats

    rows = []
    for prof_name in builtin_profile_names():
        prof = edgekd.load_profile(prof_name)
        for arch, (layers, hidden, inter, heads, kv, hd, vocab, tied) in ARCH.items():
            sliding, window = SLIDING.get(arch, (0, 0))
            shape = ArchShape(layers, hidden, inter, heads, kv, hd, vocab, tied, sliding_layers=sliding, sliding_window=window)
            for size_budget in ("profile", "none"):
                p = prof if size_budget == "profile" else edgekd.load_profile(prof_name, ["budgets.max_model_mb=null"])
                c = p.compression.planner
                linear, embedding = candidate_formats(p)  # as a run's plan stage: ONNX-first profiles keep to what ONNX holds
                names = list(dict.fromkeys(linear + embedding))
                search = Search(shape, stand_in_sensitivity(shape, names), ROLES, FormatPlan.uniform(p.deployment.weight_format),
                                linear, embedding, depths(layers, None), [1.0, *c.mlp_fractions],
                                p.compression.qat.steps, p.compression.distill.steps, c.max_kl)
                try:
                    chosen, _, _ = choose(search, p)
                    row = {"verdict": "plan", "layers": f"{chosen.layers}/{layers}", "mlp": chosen.mlp_fraction,
                           "formats": describe(chosen.formats), "model_mb": chosen.model_mb, "decode": chosen.decode_tokens_per_s,
                           "ttft_ms": chosen.ttft_ms, "peak_mb": chosen.peak_memory_mb}
                except EdgekdError as exc:
                    row = {"verdict": "refused", "nearest": exc.details[0] if exc.details else "", "fix": exc.fix}
                rows.append({"profile": prof_name, "teacher": arch, "size_budget": p.budgets.max_model_mb, **row})
                print(rows[-1], file=sys.stderr, flush=True)
    write_result("profile_fit", {"rows": rows, "block_cost": BLOCK_COST})
    print("| profile | teacher | size budget MB | verdict | blocks | MLP | formats | file MB | decode tok/s | TTFT ms | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["verdict"] == "plan":
            print(f"| {r['profile']} | {r['teacher']} | {r['size_budget']} | plan | {r['layers']} | {r['mlp']:g} | {r['formats']} | "
                  f"{r['model_mb']:.0f} | {r['decode']:.1f} | {r['ttft_ms']:.0f} | {r['peak_mb']:.0f} |")
        else:
            print(f"| {r['profile']} | {r['teacher']} | {r['size_budget']} | refused: {r['nearest']} | | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
