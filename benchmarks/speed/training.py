"""Training speed, each figure a ratio measured side by side in one run: edgekd's loop against a
bare PyTorch loop, the teacher-logit cache against the live teacher, bf16 autocast against fp32.

All on the default teacher, the default profile's batch (4 x 256 tokens) and the default run's
24-layer student pruned by Block Influence.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import types

import numpy as np
import torch
from common import default_setup, heldout_metrics, pruned_student_plan, write_result


def setup(args) -> tuple[types.SimpleNamespace, object]:
    torch.manual_seed(0)
    s = default_setup(args.teacher, args.blocks)
    plan = pruned_student_plan(s)
    if torch.cuda.is_available():
        s.teacher.model.to("cuda")
    return s, plan


# ---------------------------------------------------------------- 1. loop overhead


def bare_steps(student, teacher, train, cfg, layer_map, steps: int, start: int) -> list[float]:
    """The same work as one edgekd step, written as a plain PyTorch loop: no Accelerate, no
    checkpoints, no history; same data, losses, precision, clipping and optimizer."""
    from edgekd.families import family_of
    from edgekd.methods.losses import attention_kl, hidden_state_loss, kd_loss
    from edgekd.methods.mixture import Mixture
    from edgekd.methods.precision import forward_precision

    final_norm = family_of(teacher).final_norm_module(teacher)
    student.train().requires_grad_(True)
    for m in (student, teacher):  # attention maps exist only in the eager implementation
        m.set_attn_implementation("eager")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    order = Mixture.single(len(train))
    times = []
    for step in range(start, start + steps):
        t0 = time.perf_counter()
        ids = torch.from_numpy(train[order.indices(step, 0, cfg, 0, 1)[0]].astype(np.int64))  # edgekd's data order
        with torch.no_grad(), forward_precision(cfg.precision, "cpu"):
            t = teacher(input_ids=ids, use_cache=False, output_hidden_states=True, output_attentions=True)
        with forward_precision(cfg.precision, "cpu"):
            s = student(input_ids=ids, use_cache=False, output_hidden_states=True, output_attentions=True)
        terms = kd_loss(s.logits[:, :-1], t.logits[:, :-1], ids[:, 1:], cfg.alpha, cfg.temperature)
        last = len(layer_map) - 1
        s_h = [s.hidden_states[i + 1] for i in range(len(layer_map))]
        t_h = [t.hidden_states[j + 1] if i < last else final_norm(t.hidden_states[j + 1]) for i, j in enumerate(layer_map)]
        loss = terms["loss"] + cfg.w_hidden * hidden_state_loss(s_h, t_h) + \
            cfg.w_attention * attention_kl(list(s.attentions), [t.attentions[j] for j in layer_map])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def cmd_loop(args) -> None:
    from edgekd.methods.distill import DistillConfig, distill

    s, plan = setup(args)
    teacher = s.teacher.model
    cfg = DistillConfig.from_settings(s.profile.compression.distill, steps=args.steps)
    teacher.set_attn_implementation("eager")
    edgekd_times, bare_times, ratios = [], [], []
    for r in range(args.rounds):  # interleaved, so drifting machine load hits both alike
        student = plan.make_student(teacher)
        student.set_attn_implementation("eager")
        out = distill(student, teacher, s.train, cfg, plan.layer_map)
        e = [h["step_s"] for h in out.history][1:]  # the first step of each run warms up allocators
        student = plan.make_student(teacher)
        student.set_attn_implementation("eager")
        b = bare_steps(student, teacher, s.train, cfg, plan.layer_map, args.steps, 0)[1:]
        edgekd_times += e
        bare_times += b
        ratios.append(statistics.median(e) / statistics.median(b))
        print(f"round {r}: edgekd {statistics.median(e):.2f} s, bare {statistics.median(b):.2f} s", file=sys.stderr, flush=True)
    result = {"steps_per_round": args.steps, "rounds": args.rounds, "precision": cfg.precision,
              "edgekd_median_s": statistics.median(edgekd_times), "bare_median_s": statistics.median(bare_times),
              "ratio_of_medians": statistics.median(edgekd_times) / statistics.median(bare_times), "per_round_ratios": ratios,
              "edgekd_all": edgekd_times, "bare_all": bare_times}
    write_result("speed_loop", result)
    print("| loop | median step (s) | steps timed |\n|---|---|---|")
    print(f"| edgekd distill() | {result['edgekd_median_s']:.2f} | {len(edgekd_times)} |")
    print(f"| bare PyTorch | {result['bare_median_s']:.2f} | {len(bare_times)} |")
    print(f"\nratio {result['ratio_of_medians']:.3f}; per round {', '.join(f'{x:.3f}' for x in ratios)} ({cfg.precision})")


# ---------------------------------------------------------------- 2. logit cache


def cmd_cache(args) -> None:
    import tempfile
    from pathlib import Path

    from edgekd.methods import logit_cache
    from edgekd.methods.distill import DistillConfig, distill

    s, plan = setup(args)
    teacher = s.teacher.model
    ds = s.profile.compression.distill
    cfg = DistillConfig.from_settings(ds, steps=args.steps)
    cfg.w_hidden = cfg.w_attention = 0.0  # logit-only KD: the case the cache serves
    t0 = time.perf_counter()
    full = logit_cache.build(teacher, s.train, max(args.ks), ds.temperature, Path(tempfile.mkdtemp()) / "c", kind=args.kind)
    build_s = time.perf_counter() - t0
    rows = []
    # live-teacher runs at other seeds (other data orders) measure the noise the cache is compared with
    for k, seed in [(None, 0), *[(k, 0) for k in args.ks], *[(None, sd) for sd in args.noise_seeds]]:
        cache = None if k is None else full.first(k)
        student = plan.make_student(teacher)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.seed = seed
        out = distill(student, teacher, s.train, run_cfg, plan.layer_map, logit_cache=cache)
        step = statistics.median(h["step_s"] for h in out.history[1:])
        rows.append({"k": k, "seed": seed, "median_step_s": step, "mb_per_million_tokens": None if k is None else 8 * k,
                     **heldout_metrics(student, s)})
        print(rows[-1], file=sys.stderr, flush=True)
    live = rows[0]["median_step_s"]
    for r in rows:
        r["speedup_vs_live"] = live / r["median_step_s"]
    write_result(f"speed_cache_{args.kind}", {"kind": args.kind, "steps": args.steps, "precision": cfg.precision, "build_s": build_s,
                                              "device": str(teacher.device), "train_tokens": int(s.train.size), "rows": rows})
    print(f"cache built once at k={max(args.ks)} in {build_s:.0f} s over {s.train.size:,} training tokens; "
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
    from edgekd.formats import FormatPlan
    from edgekd.methods.distill import DistillConfig, distill
    from edgekd.methods.precision import bf16_supported
    from edgekd.methods.qat import prepare

    s, plan = setup(args)
    teacher = s.teacher.model
    rows = []
    for precision in ("fp32", "bf16"):
        cfg = DistillConfig.from_settings(s.profile.compression.distill, steps=args.steps)
        cfg.precision = precision
        student = plan.make_student(teacher)
        out = distill(student, teacher, s.train, cfg, plan.layer_map)
        qat_cfg = copy.deepcopy(cfg)
        qat_cfg.steps, qat_cfg.w_hidden, qat_cfg.w_attention = args.qat_steps, 0.0, 0.0
        qat_student = copy.deepcopy(student)
        prepare(qat_student, FormatPlan.uniform(s.profile.deployment.weight_format))
        q_out = distill(qat_student, teacher, s.train, qat_cfg, plan.layer_map)
        rows.append({"precision": precision, "distill_median_step_s": statistics.median(h["step_s"] for h in out.history[1:]),
                     "qat_median_step_s": statistics.median(h["step_s"] for h in q_out.history[1:]),
                     **heldout_metrics(student, s)})
        print(rows[-1], file=sys.stderr, flush=True)
    fp32, bf16 = rows
    write_result("speed_bf16", {"steps": args.steps, "qat_steps": args.qat_steps, "bf16_supported": bf16_supported(), "rows": rows,
                                "distill_speedup": fp32["distill_median_step_s"] / bf16["distill_median_step_s"],
                                "qat_speedup": fp32["qat_median_step_s"] / bf16["qat_median_step_s"]})
    print("| precision | distill step (s) | QAT step (s) | KL to teacher | perplexity | top-1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['distill_median_step_s']:.2f} | {r['qat_median_step_s']:.2f} | {r['kl_to_teacher']:.4f} | "
              f"{r['perplexity']:.3f} | {r['top1_agreement']:.4f} |")
    print(f"\nbf16 speed-up: distillation {fp32['distill_median_step_s'] / bf16['distill_median_step_s']:.2f}x, "
          f"QAT {fp32['qat_median_step_s'] / bf16['qat_median_step_s']:.2f}x (after {args.steps} distillation steps)")
