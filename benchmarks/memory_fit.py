"""Peak resident memory of the training and export stages, measured against the memory check's prediction.

    .venv/bin/python benchmarks/memory_fit.py --model default [--steps 2]      # the 135M default teacher
    .venv/bin/python benchmarks/memory_fit.py --model qwen3-0.6b [--memory-gb 12]
    .venv/bin/python benchmarks/memory_fit.py --run export/<dir>               # a finished compress run's stages
    .venv/bin/python benchmarks/memory_fit.py --model default --sampling-only [--concat-kv-cache]
    .venv/bin/python benchmarks/memory_fit.py --model qwen3-0.6b --inference-only   # the no-grad stages alone

In one process, each stage as the pipeline runs it: the student (the default run's depth-pruned
one; for Qwen3-0.6B, a randomly initialised model with Qwen3-0.6B's configuration, 24 of its 28
blocks), ``--steps`` distillation steps with the Pi 5 profile's recipe (batch 4 x 256 tokens,
logit + hidden-state + attention losses), as many QAT-KD steps onto Q4_0, and the GGUF export with
its llama.cpp parity check. ``--sampling``: also shards of the teacher's samples at the profile's
generation settings, in the run's precision (``--sampling-only``: that stage alone after loading;
``--sampling-shards``: how many; ``--concat-kv-cache``: decoded with transformers' ``DynamicCache``,
grown by concatenation, in place of edgekd's cache written in place, the reference for its peak).
``--inference-only``: the no-grad stages alone. Before each stage freed memory is handed back to
the OS; each stage's peak is the kernel's high-water mark (edgekd.pipeline.peak_memory) and its prediction is the one
the stage makes before it starts (edgekd.methods.memory). ``--memory-gb``: the limit the memory
check fits the training settings to (a 16 GB laptop leaves ~12 GB to a run). Writes
``results/memory_fit_<model>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from common import write_result
from phases import PhaseSampler, mark_gguf_export, mark_training_step

from edgekd.errors import EdgekdError

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
                 tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
QWEN3_KEEP = list(range(24))  # the student: 24 of the 28 blocks


def qwen3_06b_teacher():
    """A randomly initialised model with Qwen3-0.6B's configuration (seed 0)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B)).eval()


def synthetic_byte_bpe(vocab_size: int):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens (all 2-byte merges, then 3-byte
    ones): a stand-in with a real vocabulary's size for a model whose tokenizer is not on this machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet = sorted(alphabet)
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size - 3:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    pairs = [t for t in list(vocab) if len(t) == 2]
    for ab in pairs:
        for c in alphabet:
            if len(vocab) >= vocab_size - 3:
                break
            vocab[ab + c] = len(vocab)
            merges.append((ab, c))
    for special in ("<unk>", "<|endoftext|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def setup(model: str):
    """(teacher, tokenizer, train blocks, calibration blocks, heldout blocks, student, layer map)."""
    import numpy as np
    from common import default_setup, pruned_student_plan

    if model == "default":
        s = default_setup()
        plan = pruned_student_plan(s)
        return s.teacher.model, s.teacher.tokenizer, s.train, s.calibration, s.heldout, plan.make_student(s.teacher.model), plan.layer_map
    from edgekd.methods.data import calibration_blocks, load_corpus

    teacher = qwen3_06b_teacher()
    tokenizer = synthetic_byte_bpe(QWEN3_06B["vocab_size"])
    corpus = load_corpus(None, tokenizer, 256, 0.1)
    train = corpus.train[:256].astype(np.int32)
    return teacher, tokenizer, train, calibration_blocks(train, 8), corpus.heldout[:4], setup_student(teacher), QWEN3_KEEP


def setup_student(teacher):
    from edgekd.methods.prune import make_student

    return make_student(teacher, QWEN3_KEEP).eval()


FORCE = {"ckpt": {"gradient_checkpointing": True}, "bf16": {"optimizer_state": "bf16"}, "grads": {"gradient_dtype": "bf16"},
         "recompute": {"recompute_round_trips": True},
         "micro2": {"batch_size": 2, "grad_accum": 2}, "micro1": {"batch_size": 1, "grad_accum": 4}}


def forced(cfg, force) -> None:
    """Turn the named memory savings on in ``cfg`` whatever the memory check would choose."""
    for key in force:
        for field, value in FORCE[key].items():
            setattr(cfg, field, value)


def stage_row(name: str, pm, predicted_mb: float | None, seconds: float, **extra) -> dict:
    row = {"stage": name, "peak_mb": round(pm.peak_mb, 1), "method": pm.method, "start_mb": round(pm.start_mb, 1),
           "predicted_mb": round(predicted_mb, 1) if predicted_mb is not None else None, "seconds": round(seconds, 1), **extra}
    if predicted_mb:
        row["predicted_over_measured"] = round(predicted_mb / pm.peak_mb, 3)
    print(json.dumps(row), flush=True)
    return row


def inference_stages(teacher, student, train, calib, heldout, layer_map, sensitivity: bool, prof, memory_gb) -> list[dict]:
    """The no-grad stages of a run, each with the prediction its pipeline stage makes."""
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.memory import predict_evaluation_peak
    from edgekd.methods.prune import predict_scoring_peak, score_blocks
    from edgekd.methods.sensitivity import (
        measure_sensitivity,
        predict_sensitivity_peak,
        sensitivity_layout,
    )
    from edgekd.pipeline.peak_memory import peak_memory, release_freed_memory

    rows = []

    def run(name, predict, fn):
        release_freed_memory()
        predicted = predict()
        t0 = time.perf_counter()
        with peak_memory() as pm:
            fn()
        rows.append(stage_row(name, pm, predicted / 2**20, time.perf_counter() - t0))

    run("evaluate_teacher", lambda: predict_evaluation_peak(teacher.config, heldout.shape[1], False),
        lambda: evaluate(torch_logits_fn(teacher), heldout))
    if sensitivity:  # the teacher's log-probabilities kept where the profile's memory target allows, as the stage does
        blocks = calib[:8]
        keep, _ = sensitivity_layout(teacher, blocks, memory_gb, prof.compression.memory_target_gb)
        run("sensitivity", lambda: predict_sensitivity_peak(teacher, blocks, keep),
            lambda: measure_sensitivity(teacher, blocks, ["q4_0", "q8_0", "q4_k"], (0.75,), keep_teacher_logprobs=keep))
    run("score_blocks", lambda: predict_scoring_peak(teacher.config, calib.shape[1]),
        lambda: score_blocks(teacher, calib))
    # the prune stage's evaluation, the student already made (its copy is in the stage's prediction)
    run("evaluate_student", lambda: predict_evaluation_peak(student.config, heldout.shape[1], True),
        lambda: evaluate(torch_logits_fn(student), heldout, torch_logits_fn(teacher)))
    return rows


def sampling_stage(teacher, tokenizer, train, prof, out: Path, concat_kv_cache: bool, shards: int = 4) -> dict:
    """``shards`` shards of the teacher's samples as the teacher_samples stage makes them, with its prediction."""
    from dataclasses import replace
    from unittest import mock

    from common import concatenating_kv_cache

    from edgekd.methods import generate as gen
    from edgekd.methods import kv_cache
    from edgekd.pipeline.peak_memory import peak_memory, release_freed_memory

    settings = gen.Generation.of_profile(prof)
    settings = replace(settings, tokens=shards * settings.batch_size * (settings.prompt_tokens + settings.new_tokens))
    prompts = gen.prompt_source("corpus", tokenizer, settings, train)
    release_freed_memory()
    predicted = gen.predict_sampling_peak(teacher, settings)
    concat = mock.patch.object(kv_cache, "decode_cache", concatenating_kv_cache) if concat_kv_cache else contextlib.nullcontext()
    t0 = time.perf_counter()
    with peak_memory() as pm, concat:
        samples = gen.generate(teacher, tokenizer, prompts, settings, out / f"samples-{time.time_ns()}")
    return stage_row("teacher_samples", pm, predicted / 2**20, time.perf_counter() - t0, precision=settings.precision,
                     kv_cache="DynamicCache (concatenation)" if concat_kv_cache else "edgekd (in place)",
                     rows=settings.batch_size, new_tokens=settings.new_tokens, tokens_per_s=round(samples.tokens_per_s, 1))


def teacher_logit_cache(teacher, train, prof, out: Path, rows: list[dict]):
    """The profile's teacher cache over ``train``, built as the teacher_logits stage builds it (its row
    added to ``rows``); None when the profile has no cache."""
    from edgekd.methods import logit_cache
    from edgekd.methods.precision import resolve_precision
    from edgekd.pipeline.peak_memory import peak_memory, release_freed_memory

    ds = prof.compression.distill
    if ds.logit_cache is None:
        return None
    release_freed_memory()
    predicted = logit_cache.predict_build_peak(ds.logit_cache, teacher.config, ds.batch_size, train)
    t0 = time.perf_counter()
    with peak_memory() as pm:
        cache = logit_cache.build_cache(ds.logit_cache, teacher, train, out / "teacher-logits", temperature=ds.temperature,
                                        precision=resolve_precision(ds.precision), batch_size=ds.batch_size, seed=ds.seed)
    rows.append(stage_row("teacher_logits", pm, predicted / 2**20, time.perf_counter() - t0, blocks=len(train)))
    return cache


def phase_peaks(sampler: PhaseSampler, since: float, phases: bool) -> dict:
    """The highest resident MiB in each phase of the steps of a stage started at ``since``."""
    return {"phases_mb": {k: v["max_mb"] for k, v in sampler.phases(since).items()}} if phases else {}


def measure(model: str, steps: int, memory_gb: float | None, out: Path, force: list[str] = (), sensitivity: bool = False,
            live_teacher: bool = False, phases: bool = False, sampling: str = "", concat_kv_cache: bool = False,
            sampling_shards: int = 4, inference_only: bool = False) -> dict:
    from common import PROFILE

    import edgekd
    from edgekd.exporters.ship import planned_export, write_checked
    from edgekd.formats import FormatPlan
    from edgekd.methods.distill import DistillConfig, plan_memory, run_distillation
    from edgekd.methods.memory import predict_export_peak
    from edgekd.methods.qat_kd import qat_config, qat_kd
    from edgekd.methods.step_losses import reads_teacher_cache
    from edgekd.pipeline.peak_memory import peak_memory, release_freed_memory

    sampler = PhaseSampler()
    if phases:  # the resident memory phase by phase inside the training stages' steps
        mark_training_step(sampler)
        mark_gguf_export(sampler)
    phased = sampler if phases else contextlib.nullcontext()
    rows = []
    t0 = time.perf_counter()
    with peak_memory() as pm:
        teacher, tokenizer, train, calib, heldout, student, layer_map = setup(model)
    rows.append(stage_row("load teacher, corpus, student", pm, None, time.perf_counter() - t0,
                          teacher_params=sum(p.numel() for p in teacher.parameters()),
                          student_params=sum(p.numel() for p in student.parameters())))
    prof = edgekd.load_profile(PROFILE)
    stopped_early = {"model": model, "stages": rows}  # --sampling-only, --inference-only: the rows so far
    if sampling:
        rows.append(sampling_stage(teacher, tokenizer, train, prof, out, concat_kv_cache, sampling_shards))
        if sampling == "only":
            return {**stopped_early, "process_peak_mb": max(r["peak_mb"] for r in rows)}
    if live_teacher:
        prof.compression.distill.logit_cache = None
    rows += inference_stages(teacher, student, train, calib, heldout, layer_map, sensitivity, prof, memory_gb)
    if inference_only:
        return {**stopped_early, "process_peak_mb": max(r["peak_mb"] for r in rows)}
    cfg = DistillConfig.from_settings(prof.compression.distill, steps=steps)
    cfg.checkpoint_every = 10**6
    forced(cfg, force)
    qcfg = qat_config(prof.compression.distill, prof.compression.qat)
    qcfg.steps, qcfg.checkpoint_every = steps, 10**6
    forced(qcfg, force)
    spec = prof.compression.distill.logit_cache
    if spec is not None and not any(reads_teacher_cache(c, spec.kind) for c in (cfg, qcfg)):
        prof.compression.distill.logit_cache = None  # no step would read it: the pipeline builds none either
    if prof.compression.distill.logit_cache is not None:  # only the blocks the steps read: a cache of them all takes long here
        train = train[:steps * prof.compression.distill.batch_size]
    cache = teacher_logit_cache(teacher, train, prof, out, rows)

    def read_by(step_cfg):  # the cache where a stage's steps read it, as edgekd.stages.distill.cached_teacher gives it
        return cache if cache is not None and reads_teacher_cache(step_cfg, cache.kind) else None

    release_freed_memory()
    fitted, memory = plan_memory(student, teacher, cfg, train.shape[1], read_by(cfg), memory_gb)
    t0 = time.perf_counter()
    with peak_memory() as pm, phased:
        outcome, memory = run_distillation(student, teacher, train, fitted, layer_map, "distilling", memory=memory,
                                           logit_cache=read_by(cfg))
    rows.append(stage_row("distill", pm, memory.total / 2**20, time.perf_counter() - t0, settings=memory.settings(),
                          step_s=[round(h["step_s"], 2) for h in outcome.history],
                          parts_mb={k: round(v / 2**20, 1) for k, v in memory.parts.items()},
                          **phase_peaks(sampler, t0, phases)))
    del outcome, student
    release_freed_memory()
    # QAT on the full-depth student, as the default run does (its planner keeps all 30 blocks)
    student, layer_map = (copy.deepcopy(teacher), None) if model == "default" else (setup_student(teacher), QWEN3_KEEP)
    plan = FormatPlan.uniform("q4_0")
    release_freed_memory()
    t0 = time.perf_counter()
    with peak_memory() as pm, phased:
        result = qat_kd(student, teacher, train, calib, plan, qcfg, layer_map=layer_map, memory_gb=memory_gb,
                        logit_cache=read_by(qcfg))
    rows.append(stage_row("qat", pm, result.memory.total / 2**20, time.perf_counter() - t0, settings=result.memory.settings(),
                          step_s=[round(h["step_s"], 2) for h in result.outcome.history],
                          parts_mb={k: round(v / 2**20, 1) for k, v in result.memory.parts.items()},
                          **phase_peaks(sampler, t0, phases)))
    release_freed_memory()
    export = planned_export("gguf", plan)
    predicted = predict_export_peak(result.model, plan, "gguf")
    t0 = time.perf_counter()
    with peak_memory() as pm, phased:
        path, check = write_checked(export, result.model, tokenizer, plan, out, heldout[:2], 2)
    rows.append(stage_row("export", pm, predicted / 2**20, time.perf_counter() - t0, file_mb=round(path.stat().st_size / 2**20, 1),
                          parity=check.to_dict(), **phase_peaks(sampler, t0, phases)))
    return {"model": model, "steps": steps, "memory_gb": memory_gb, "teacher": "live" if cache is None else "logit cache",
            "stages": rows,
            "process_peak_mb": max(r["peak_mb"] for r in rows)}


def from_run(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    rows = []
    for s in report["stages"]:
        predicted = s["metrics"].get("predicted_peak_rss_mb")
        row = {"stage": s["name"], "peak_mb": s.get("peak_rss_mb"), "predicted_mb": predicted, "seconds": s["wall_time_s"]}
        if predicted and s.get("peak_rss_mb"):
            row["predicted_over_measured"] = round(predicted / s["peak_rss_mb"], 3)
        rows.append(row)
    return {"run": str(run), "stages": rows, "process_peak_mb": max(r["peak_mb"] or 0 for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["default", "qwen3-0.6b"], default="default")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--memory-gb", type=float, default=None)
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--sensitivity", action="store_true", help="also the sensitivity stage (three formats, one width)")
    ap.add_argument("--force", action="append", default=[], choices=sorted(FORCE),
                    help="turn a memory saving on whatever the check says (to measure its effect)")
    ap.add_argument("--phases", action="store_true", help="also each training step's peak phase by phase (head, chunk loop, backward, update)")
    ap.add_argument("--sampling", action="store_true", help="also the teacher's samples (the teacher_samples stage)")
    ap.add_argument("--sampling-only", action="store_true", help="the teacher's samples alone after loading")
    ap.add_argument("--sampling-shards", type=int, default=4, help="shards of 32 samples the sampling stage makes")
    ap.add_argument("--concat-kv-cache", action="store_true", help="sample with transformers' DynamicCache (the reference)")
    ap.add_argument("--inference-only", action="store_true", help="the no-grad stages alone (evaluations, block scores, sensitivity)")
    ap.add_argument("--live-teacher", action="store_true", help="no logit cache, whatever the profile says")
    ap.add_argument("--out", type=Path, default=Path("export/memory-fit"))
    args = ap.parse_args()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    if args.run is not None:
        result, name = from_run(args.run), f"memory_fit_run_{args.run.name}"
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        sampling = "only" if args.sampling_only else "also" if args.sampling else ""
        suffix = ("".join(f"_{f}" for f in args.force) + ("_live" if args.live_teacher else "") + ("_sampling" if args.sampling_only else "")
                  + ("_inference" if args.inference_only else "")
                  + ("_concat" if args.concat_kv_cache else ""))
        try:
            result = measure(args.model, args.steps, args.memory_gb, args.out, args.force, args.sensitivity, args.live_teacher,
                             args.phases, sampling, args.concat_kv_cache, args.sampling_shards,
                             args.inference_only)
        except EdgekdError as exc:  # the memory check refused a stage: that is the measurement
            result = {"model": args.model, "memory_gb": args.memory_gb, "refused": str(exc)}
            print(exc, file=sys.stderr)
        name = f"memory_fit_{args.model}{suffix}"
    result["lscpu_flags"] = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Flags")), "")
    write_result(name, result)
    print(json.dumps({k: v for k, v in result.items() if k != "lscpu_flags"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
