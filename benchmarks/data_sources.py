"""Distillation data at equal wall time: corpus only, + teacher samples, + on-policy rows, data-free.

For the default run's pruned 24-block student (distillation recipe of the Pi 5 profile) and for
the full-depth Q4_0 QAT-KD (the profile's QAT recipe), each row gets the same wall-clock budget on
this machine: the teacher's samples a row uses are generated inside its budget, and its training
steps are fitted to what is left from the measured step time (as ``edgekd compress`` fits them).

Columns: KL / top-1 / perplexity on the held-out split and on out-of-domain text (CPython's
LICENSE.txt), and two generation measures that need no outside data: the teacher's per-token NLL
of the student's sampled continuations of held-out prompts (lower: the student generates what the
teacher would), and the rate of repeated 4-grams in greedy continuations (against the teacher's own).
It also measures the two generation engines side by side (torch batched vs llama.cpp).

    .venv/bin/python benchmarks/data_sources.py --budget-min 6
    .venv/bin/python benchmarks/data_sources.py --only qat --rows start,0,4,1,3 --budget-min 15 --out data_sources_qat15
    .venv/bin/python benchmarks/data_sources.py --only distill --rows 0,4 --budget-min 25 --on-policy-share 0.5 --on-policy-after 0.5
    .venv/bin/python benchmarks/data_sources.py --only qat --rows 0,3 --budget-min 15 --data-free-tokens 65536 --data-free-prompts none,query
    .venv/bin/python benchmarks/data_sources.py --only distill --rows 0,4 --budget-min 10 --on-policy-share 0.5 --on-policy-after 0.75,0.5
    .venv/bin/python benchmarks/data_sources.py --only qat --rows 3 --budget-min 30 --data-free-tokens 65536 --data-free-share 0,0.3
    .venv/bin/python benchmarks/data_sources.py --only qat --rows 0,3 --budget-min 15 --data-free-tokens 65536 \
        --data-free-prompts file:benchmarks/prompts/python_questions.jsonl,file:benchmarks/prompts/python_reference_openings.jsonl
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from common import default_setup, license_blocks, pruned_student_plan, write_result

from edgekd.formats import FormatPlan
from edgekd.methods import generate as gen
from edgekd.methods.distill import (
    DistillConfig,
    apply_memory_settings,
    plan_memory,
    run_distillation,
)
from edgekd.methods.evaluate import evaluate, torch_logits_fn
from edgekd.methods.mixture import Mixture, OnPolicy
from edgekd.methods.on_policy import student_samples
from edgekd.methods.qat_kd import qat_config, qat_kd
from edgekd.methods.sampling import torch_continue
from edgekd.methods.step_probe import probe_step_seconds

PROMPT_TOKENS, SAMPLE_TOKENS, GREEDY_TOKENS = 32, 64, 96


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=6.0, help="wall-clock minutes per row (samples + training)")
    ap.add_argument("--sample-tokens", type=int, default=8192, help="teacher samples for the mixture rows")
    ap.add_argument("--data-free-tokens", type=int, default=16384, help="teacher samples for the data-free rows")
    ap.add_argument("--data-free-prompts", default="none",
                    help="the data-free row's prompts, comma-separated for one row each: none (a drawn first token), "
                         "query (the teacher writes the user's turn), chat, file:PATH (a JSONL prompt file, as --prompts)")
    ap.add_argument("--data-free-share", default="0",
                    help="comma-separated, one data-free row each: sampling goes on past --data-free-tokens until this share "
                         "of the row's budget (compression.data.generation.time_share; 0: the tokens exactly)")
    ap.add_argument("--greedy-tokens", type=int, default=None,
                    help="the teacher samples' first tokens taken greedily (LLM-QAT's hybrid sampling; default: the profile's)")
    ap.add_argument("--only", choices=["distill", "qat"], default=None)
    ap.add_argument("--rows", default=None, help="comma-separated rows to run: start (no training), 0-4; e.g. for a quick check")
    ap.add_argument("--steps-per-generation", type=int, default=None,
                    help="on-policy rows of this many steps sampled together (default: the profile's)")
    ap.add_argument("--on-policy-kl", default=None, help="the on-policy divergence (default: the profile's)")
    ap.add_argument("--on-policy-share", type=float, default=0.25, help="the on-policy share of the corpus + on-policy row")
    ap.add_argument("--on-policy-after", default=None,
                    help="the share of a row's steps trained on the offline pools alone before its on-policy rows join "
                         "(compression.data.on_policy.start; default: the profile's); comma-separated, one corpus + "
                         "on-policy row each, run in the order given")
    ap.add_argument("--prompt-windows", type=int, default=4,
                    help="prompts for the generation measures: this many 32-token windows of each held-out block")
    ap.add_argument("--contend-after", type=float, default=None,
                    help="minutes into each row after which a competing busy process takes one core until the row's "
                         "training ends (a shared machine slowing down under a run, the same for every row)")
    ap.add_argument("--out", default="data_sources")
    args = ap.parse_args()
    setup = default_setup()
    teacher, tok = setup.teacher.model, setup.teacher.tokenizer
    block_len = setup.profile.compression.data.block_len
    ood = license_blocks(tok, block_len)
    prompts = measure_prompts(setup.heldout, args.prompt_windows)
    result = {"budget_min": args.budget_min, "contend_after_min": args.contend_after, "measure_prompts": len(prompts), "engines": engine_speeds(setup), "rollout_batches": rollout_speeds(setup), "rows": []}
    teacher_greedy = torch_continue(teacher, prompts, GREEDY_TOKENS, np.random.default_rng(0), temperature=0.0)
    result["teacher_repeated_4grams"] = repeated_ngrams(teacher_greedy[:, PROMPT_TOKENS:])
    result["teacher_nll_of_own_samples"] = sample_nlls(teacher, teacher, prompts)["teacher_nll"]
    print(f"teacher: repeated 4-grams {result['teacher_repeated_4grams']:.3f}, NLL of its own samples "
          f"{result['teacher_nll_of_own_samples']:.3f}", flush=True)
    base = gen.Generation.of_profile(setup.profile)
    if args.greedy_tokens is not None:
        base = replace(base, greedy_tokens=args.greedy_tokens)
    result["generation"] = asdict(base)
    scratch = Path("export/data-sources")

    def samples(kind: str, tokens: int, fill_s: float | None = None) -> tuple[np.ndarray, float]:
        s = replace(base, tokens=tokens, seed=11)
        t0 = time.perf_counter()
        kind, _, path = kind.partition(":")  # file:PATH
        src = gen.prompt_source(kind, tok, s, setup.train, path or None)
        out = gen.generate(teacher, tok, src, s, scratch / f"{kind}-{tokens}-{time.time_ns()}", fill_s=fill_s)
        return out.blocks(block_len), time.perf_counter() - t0

    policy = OnPolicy.from_settings(setup.profile.compression.data.on_policy)
    if args.steps_per_generation:
        policy = replace(policy, steps_per_generation=args.steps_per_generation)
    if args.on_policy_kl:
        policy = replace(policy, kl=args.on_policy_kl)
    starts = [float(x) for x in args.on_policy_after.split(",")] if args.on_policy_after else [policy.start]
    policy = replace(policy, start=starts[0])
    result["on_policy"] = {"kl": policy.kl, "steps_per_generation": policy.steps_per_generation,
                           "prompt_tokens": policy.prompt_tokens, "new_tokens": policy.new_tokens, "start": policy.start}
    free_kinds = args.data_free_prompts.split(",")
    shares = [float(x) for x in args.data_free_share.split(",")]
    rows = [(0, "corpus only", "corpus", 0.0, 0.0, starts[0], 0.0),
            (1, "corpus + teacher samples", "corpus", 0.5, 0.0, starts[0], 0.0),
            (2, "corpus + teacher samples + on-policy", "corpus", 0.25, 0.25, starts[0], 0.0),
            *[(3, "data-free (teacher samples only)" + ("" if kind == "none" else f", prompts: {kind}")
               + (f", time share {share}" if share else ""), kind, 1.0, 0.0, starts[0], share)
              for kind in free_kinds for share in shares],
            *[(4, "corpus + on-policy" + (f", start {start}" if len(starts) > 1 else ""), "corpus", 0.0,
               args.on_policy_share, start, 0.0) for start in starts]]
    for stage in ("distill", "qat"):
        if args.only and stage != args.only:
            continue
        if args.rows is None or "start" in args.rows.split(","):  # where training starts: pruned, or clipped round-to-nearest
            t0 = time.perf_counter()
            start = pruned_student_plan(setup).make_student(teacher) if stage == "distill" else qat_kd(
                copy.deepcopy(teacher), teacher, setup.train, setup.calibration, FormatPlan.uniform("q4_0"), None).model
            row = {"stage": stage, "row": "start (no training)", "generation_s": 0.0, "steps": 0, "training_tokens": 0,
                   "wall_time_s": round(time.perf_counter() - t0, 1), "sampling_tokens_per_s": None,
                   **quality(start, teacher, setup.heldout, ood, prompts)}
            result["rows"].append(row)
            print_row(row)
        for i, name, prompt_kind, w_samples, w_on, start, share in rows:
            row_policy = replace(policy, start=start)
            if args.rows is not None and str(i) not in args.rows.split(","):
                continue
            t_row = time.perf_counter()
            contention = Contention(args.contend_after)
            pools, weights, gen_s, blocks = [setup.train], [1.0 - w_samples - w_on], 0.0, None
            if w_samples:
                blocks, gen_s = samples(prompt_kind, args.data_free_tokens if prompt_kind != "corpus" else args.sample_tokens,
                                        share * args.budget_min * 60 if share else None)
                if prompt_kind != "corpus":
                    pools, weights = [blocks], [1.0]
                else:
                    pools, weights = [setup.train, blocks], [weights[0], w_samples]
            mixture = Mixture(tuple(len(p) for p in pools), tuple(weights), w_on, row_policy if w_on else None)
            train = np.concatenate(pools)
            calib = pools[0][np.linspace(0, len(pools[0]) - 1, 16).astype(int)]
            deadline = t_row + args.budget_min * 60
            if stage == "distill":
                student, outcome, cfg, probe_s = distill_row(setup, train, mixture, deadline)
            else:
                student, outcome, cfg, probe_s = qat_row(setup, train, calib, mixture, deadline)
            contention.stop()
            summary = outcome.summary()
            row = {"stage": stage, "row": name, "generation_s": round(gen_s, 1), "steps": outcome.steps,
                   "planned_steps": cfg.steps, "probe_s_per_step": round(probe_s, 3),
                   "median_step_s": round(float(np.median([h["step_s"] for h in outcome.history])), 3) if outcome.history else None,
                   "stopped_at_deadline": outcome.stopped_at_deadline, "final_lr": outcome.history[-1]["lr"] if outcome.history else None,
                   "training_tokens": outcome.tokens, "wall_time_s": round(time.perf_counter() - t_row, 1),
                   "sampling_tokens_per_s": summary["sampling_tokens_per_s"], "sampling_share": summary["sampling_share"],
                   "mixture": {"corpus": weights[0] if prompt_kind == "corpus" else 0.0, "teacher_samples": w_samples, "on_policy": w_on},
                   "sample_prompts": prompt_kind if w_samples else None, "sample_blocks": None if blocks is None else len(blocks),
                   "sample_time_share": share or None}
            if w_on:  # the first step that trained on on-policy rows
                row["on_policy_start"] = row_policy.start
                row["on_policy_from_step"] = next((h["step"] - 1 for h in outcome.history if "on_policy_kd" in h), None)
            row.update(quality(student, teacher, setup.heldout, ood, prompts))
            result["rows"].append(row)
            print_row(row)
            write_result(args.out, result)
    print_table(result)
    return 0


class Contention:
    """A busy process started ``minutes`` from now (None: never), until :meth:`stop`."""

    def __init__(self, minutes: float | None):
        self.proc = None
        self.timer = threading.Timer(minutes * 60, self._start) if minutes is not None else None
        if self.timer is not None:
            self.timer.start()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def steps_until(deadline: float, per_step: float) -> int:
    """The steps of ``per_step`` seconds that fit between now and ``deadline`` (at least 1)."""
    return max(1, int((deadline - time.perf_counter()) / per_step))


def distill_row(setup, train, mixture, deadline, **overrides):
    """The pruned student distilled until ``deadline``, its steps fitted to the time left: (student,
    outcome, the config it trained with, the probe's seconds a step; the deadline stops a row that
    runs slower than its probe said).
    ``overrides``: DistillConfig fields set over the profile's (e.g. ``temperature``)."""
    teacher = setup.teacher.model
    plan = pruned_student_plan(setup)
    student = plan.make_student(teacher)
    cfg = DistillConfig.from_settings(setup.profile.compression.distill, steps=10_000)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.on_policy_share = mixture.on_policy_share
    cfg, memory = plan_memory(student, teacher, cfg, train.shape[1], target_gb=setup.profile.compression.memory_target_gb)
    apply_memory_settings(cfg, memory)
    per_step = probe_step_seconds(student, teacher, train, cfg, plan.layer_map, mixture=mixture)
    cfg.steps = steps_until(deadline, per_step)
    outcome, _ = run_distillation(student, teacher, train, cfg, plan.layer_map, "distilling", deadline=deadline,
                                  memory=memory, mixture=mixture)
    return student, outcome, cfg, per_step


def qat_row(setup, train, calib, mixture, deadline, hidden_weight: float = 0.0, logit_cache=None):
    """Full-depth all-Q4_0 QAT-KD of a copy of the teacher, the profile's recipe (logit KD alone) unless
    ``hidden_weight`` adds the hidden-state loss at every block (FitNets' term); ``logit_cache``: the
    teacher's targets from a cache (edgekd.methods.logit_cache) instead of its pass in every step."""
    teacher = setup.teacher.model
    student = copy.deepcopy(teacher)
    cfg = qat_config(setup.profile.compression.distill, setup.profile.compression.qat)
    cfg.w_hidden = hidden_weight
    cfg.on_policy_share = mixture.on_policy_share
    probed = []  # the probe's seconds a step, for the row's record

    def fit(probe) -> int:
        probed.append(probe())
        return steps_until(deadline, probed[-1])
    result = qat_kd(student, teacher, train, calib, FormatPlan.uniform("q4_0"), cfg, clip_search=True, fit_steps=fit,
                    deadline=deadline, memory_target_gb=setup.profile.compression.memory_target_gb, mixture=mixture,
                    logit_cache=logit_cache)
    return result.model, result.outcome, cfg, probed[0]


@torch.no_grad()
def quality(student, teacher, heldout, ood, prompts) -> dict:
    student.eval()
    out = {}
    for split, blocks in (("heldout", heldout), ("ood", ood)):
        m = evaluate(torch_logits_fn(student), blocks, torch_logits_fn(teacher))
        out.update({f"{split}_kl": m.kl_to_teacher, f"{split}_top1": m.top1_agreement, f"{split}_ppl": m.perplexity})
    # the measure at three sampling seeds: its spread for one student (the first seed's is the column);
    # and its split (benchmarks/sample_nll_decomposition.py): the student's own NLL of the same samples
    nlls = [sample_nlls(student, teacher, prompts, seed) for seed in (5, 6, 7)]
    out["teacher_nll_by_seed"] = [n["teacher_nll"] for n in nlls]
    out["teacher_nll_of_samples"], out["own_nll_of_samples"] = nlls[0]["teacher_nll"], nlls[0]["own_nll"]
    greedy = torch_continue(student, prompts, GREEDY_TOKENS, np.random.default_rng(0), temperature=0.0)
    out["repeated_4grams"] = repeated_ngrams(greedy[:, PROMPT_TOKENS:])
    return out


@torch.no_grad()
def sample_nlls(student, teacher, prompts, seed: int = 5, temperature: float = 1.0) -> dict:
    """The student's continuations (seeded, sampled at ``temperature``) of ``prompts``, scored by the
    teacher and by the student itself: mean NLL per token of the sampled tokens, and each model's mean
    entropy at those positions."""
    student.eval()
    ids = torch.from_numpy(student_samples(student, prompts, OnPolicy(PROMPT_TOKENS, SAMPLE_TOKENS, temperature, 1.0),
                                           np.random.default_rng(seed)))
    out = {}
    for name, model in (("teacher", teacher),) if student is teacher else (("teacher", teacher), ("own", student)):
        logp = torch.log_softmax(model(ids).logits[:, PROMPT_TOKENS - 1:-1].float(), -1)
        out[f"{name}_nll"] = float(-logp.gather(-1, ids[:, PROMPT_TOKENS:, None]).mean())
        out[f"{name}_entropy"] = float(-(logp.exp() * logp).sum(-1).mean())
    if student is teacher:  # its own scores are the teacher's: one forward pass, not two
        out["own_nll"], out["own_entropy"] = out["teacher_nll"], out["teacher_entropy"]
    return out


def measure_prompts(heldout: np.ndarray, windows: int) -> np.ndarray:
    """The generation measures' prompts: ``windows`` evenly spaced ``PROMPT_TOKENS``-token windows of
    every held-out block (one window, 24 prompts, left the teacher-NLL measure noisy: 4.120 -> 4.422
    for one row between 6 and 10 minutes while its KL fell)."""
    starts = np.linspace(0, heldout.shape[1] - PROMPT_TOKENS, windows).astype(int)
    return np.concatenate([heldout[:, s:s + PROMPT_TOKENS] for s in starts]).astype(np.int64)


def repeated_ngrams(rows: np.ndarray, n: int = 4) -> float:
    """Share of each continuation's n-grams that repeat an earlier one of the same continuation (mean over rows)."""
    rates = []
    for row in rows:
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        rates.append(1 - len(set(grams)) / len(grams))
    return float(np.mean(rates))


def engine_speeds(setup) -> dict:
    """Tokens/s of the teacher's sampling in torch (batched) and in llama.cpp (one sequence), same prompts."""
    s = replace(gen.Generation.of_profile(setup.profile), tokens=1, new_tokens=64, batch_size=16)
    src = gen.prompt_source("corpus", setup.teacher.tokenizer, s, setup.train)
    out = {}
    for engine in ("torch", "llama.cpp"):
        e = replace(s, engine=engine, batch_size=16 if engine == "torch" else 4)
        r = gen.generate(setup.teacher.model, setup.teacher.tokenizer, src, e, Path(f"export/data-sources/engine-{engine}-{time.time_ns()}"),
                         gguf_path=setup.source.path)
        out[engine] = {"tokens_per_s": round(r.tokens_per_s, 1), "batch": e.batch_size}
    print(f"generation engines: {out}")
    return out


def rollout_speeds(setup, batches=(1, 4, 8, 16)) -> dict:
    """Tokens/s of on-policy sampling by the fake-quantized full-depth Q4_0 student at several rows per
    batch (the rows of ``steps_per_generation`` steps are sampled as one batch): 32 prompt tokens, 64 sampled."""
    from edgekd.methods.qat import prepare

    student = copy.deepcopy(setup.teacher.model)
    prepare(student, FormatPlan.uniform("q4_0"))
    policy = OnPolicy(PROMPT_TOKENS, SAMPLE_TOKENS, 1.0, 1.0)
    out = {}
    for batch in batches:
        prompts = setup.train[:batch, :PROMPT_TOKENS].astype(np.int64)
        student_samples(student, prompts, replace(policy, new_tokens=4), np.random.default_rng(0))  # warm-up
        t0 = time.perf_counter()
        student_samples(student, prompts, policy, np.random.default_rng(0))
        seconds = time.perf_counter() - t0
        out[str(batch)] = {"seconds": round(seconds, 2), "tokens_per_s": round(batch * SAMPLE_TOKENS / seconds, 1)}
    print(f"on-policy sampling by rows per batch: {out}", flush=True)
    return out


def print_row(r: dict) -> None:
    print(f"{r['stage']:8s} {r['row']:40s} steps {r['steps']:4d} (planned {r.get('planned_steps')}) gen {r['generation_s']:6.1f}s | held-out KL {r['heldout_kl']:.4f} "
          f"top1 {r['heldout_top1']:.3f} ppl {r['heldout_ppl']:.2f} | OOD KL {r['ood_kl']:.4f} ppl {r['ood_ppl']:.2f} | "
          f"teacher NLL {r['teacher_nll_of_samples']:.3f} (seeds {min(r['teacher_nll_by_seed']):.3f}-{max(r['teacher_nll_by_seed']):.3f}) "
          f"rep4 {r['repeated_4grams']:.3f}", flush=True)


def print_table(result: dict) -> None:
    print(f"\nteacher: repeated 4-grams (greedy) {result['teacher_repeated_4grams']:.3f}, NLL of its own samples "
          f"{result['teacher_nll_of_own_samples']:.3f}; engines: {result['engines']}")
    print("| stage | data | steps | samples (s) | held-out KL | top-1 | ppl | OOD KL | OOD top-1 | OOD ppl | "
          "teacher NLL of student samples | repeated 4-grams (greedy) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['stage']} | {r['row']} | {r['steps']} | {r['generation_s']:.0f} | {r['heldout_kl']:.4f} | {r['heldout_top1']:.3f} | "
              f"{r['heldout_ppl']:.2f} | {r['ood_kl']:.4f} | {r['ood_top1']:.3f} | {r['ood_ppl']:.2f} | "
              f"{r['teacher_nll_of_samples']:.3f} | {r['repeated_4grams']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
