"""What compressing a model of a given size needs in memory: the memory check's prediction (a PROJECTION).

    .venv/bin/python benchmarks/memory_table.py

For each architecture (config shapes as in profile_fit.py; models built on torch's meta device, so
nothing is allocated), the predicted peak of one QAT-KD step of the full-depth student with the
Pi 5 profile's recipe (batch 4 x 256 tokens, bf16 forward passes, logit KD and every block's
hidden-state target), the heaviest training stage of a default run: the plain recipe; the shipped
profiles' default (the teacher's pass for its block outputs and logits, its linears in bf16, and
what the default 3 GB target turns on: activation checkpointing and bf16 AdamW moments); with every
saving the hard limit adds before splitting the batch (round trips recomputed; bf16 gradients lower
no QAT peak, so none are counted); logit KD alone (``qat.losses: {logit_kl: 1.0}``: the teacher's
final hidden states from the profile's cache, the teacher out of memory but for its head) with the
default's savings; and on a GPU (the default's parts without the host process).
The prediction is checked against measured peaks by memory_fit.py (135M and Qwen3-0.6B shapes).
Writes ``results/memory_table.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

from common import PROFILE, write_result
from profile_fit import ARCH

PROCESS_BASE = 0.25e9  # interpreter, torch, transformers: measured resident before any model (memory_fit.py)


def meta_model(shape: tuple):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads, kv, head_dim, vocab, tied = shape
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tied)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    import edgekd
    from edgekd.formats import FormatPlan
    from edgekd.methods.memory import estimate_training_memory
    from edgekd.methods.qat import fake_quantized_params
    from edgekd.methods.qat_kd import qat_config
    from edgekd.methods.step_losses import reads_teacher_cache

    prof = edgekd.load_profile(PROFILE)
    rows = []
    for name, shape in ARCH.items():
        model = meta_model(shape)
        params = sum(p.numel() for p in model.parameters())
        quantized = fake_quantized_params(model, FormatPlan.uniform("q4_0"))
        row = {"model": name, "params": params}
        saving = {"gradient_checkpointing": True, "optimizer_state": "bf16"}
        every = {**saving, "recompute_round_trips": True}
        logit_only = prof.compression.qat.model_copy(update={"losses": {"logit_kl": 1.0}})
        for label, settings, cache, qat in (("plain", {}, None, prof.compression.qat), ("default", saving, "hidden", prof.compression.qat),
                                            ("every_saving", every, "hidden", prof.compression.qat),
                                            ("logit_only", saving, "hidden", logit_only)):
            cfg = qat_config(prof.compression.distill, qat)
            cached = cache if cache and reads_teacher_cache(cfg, cache) else False  # as the pipeline hands it (stages.distill.cached_teacher)
            cfg.precision = "bf16"
            for k, v in settings.items():
                setattr(cfg, k, v)
            resident = PROCESS_BASE + 2 * params * 4  # teacher and student in fp32
            plan = estimate_training_memory(model, model, cfg, 256, quantized_params=quantized, resident_bytes=resident, cached=cached)
            row[f"{label}_gb"] = round(plan.total / 1e9, 2)
            if label == "default":
                row["gpu_gb"] = round((plan.total - PROCESS_BASE) / 1e9, 2)
        rows.append(row)
    write_result("memory_table", {"stage": "QAT-KD step, full-depth student, batch 4 x 256, bf16", "rows": rows})
    print("| model | parameters | plain recipe (GB) | default: checkpointing, bf16 moments (GB) "
          "| + recomputed round trips (GB) | logit KD alone, the default's savings (GB) | on a GPU, default (GB of GPU memory) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['plain_gb']} | {r['default_gb']} | {r['every_saving_gb']} "
              f"| {r['logit_only_gb']} | {r['gpu_gb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
