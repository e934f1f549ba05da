"""Stages that measure what each knob costs and choose the compression plan (when a knob is ``auto``)."""

from __future__ import annotations

import json
from typing import Any

from ..pipeline.context import RunContext
from ..report import StageRecord

SENSITIVITY = ("plan", "sensitivity.json")
PLAN = ("plan", "plan.json")
TABLE = "Compression plan (PROJECTION from the cost model and the measured knob costs; chosen first)"
RUNNERS_UP = 5
# of a time budget's training time, the most the knob measurements may take: a short budget measures
# on fewer calibration blocks rather than leave the training stages a few steps
# (benchmarks/RESULTS.md, "The planner's measurements under a short time budget")
SENSITIVITY_SHARE = 0.2


def needs_planner(profile: Any) -> bool:
    c, d = profile.compression, profile.deployment
    return d.tensor_formats == "auto" or (c.prune.method != "none" and "auto" in (c.prune.keep_layers, c.prune.mlp_keep_fraction))


def candidate_formats(profile: Any) -> tuple[list[str], list[str]]:
    """The planner's format choices; where the budgets are checked on an ONNX file it keeps to what
    that runtime holds in int form (``WeightFormat.onnx_int_form``): other formats are stored as fp32 there,
    outside the size the plan counts. A GGUF-first profile that also exports ONNX gets a larger
    ONNX file for such tensors (still exact)."""
    from ..formats import FORMATS

    p = profile.compression.planner
    linear, embedding = list(p.candidates), list(p.embedding_candidates)
    runtime = profile.deployment.runtime
    if runtime in ("onnxruntime", "onnxruntime-genai"):
        linear = [n for n in linear if FORMATS[n].onnx_int_form(runtime)] or [profile.deployment.weight_format]
        embedding = ([n for n in embedding if FORMATS[n].onnx_int_form(runtime, embedding=True)]
                     or [FORMATS[profile.deployment.weight_format].embedding])
    return linear, embedding


def sensitivity(ctx: RunContext) -> StageRecord:
    from ..fileio import atomic_write_json
    from ..methods.data import calibration_blocks
    from ..methods.sensitivity import (
        batches_of,
        measure_sensitivity,
        measurements,
        sensitivity_layout,
    )

    p = ctx.profile.compression.planner
    linear, embedding = candidate_formats(ctx.profile)
    names = list(dict.fromkeys(linear + embedding))
    fractions = tuple(p.mlp_fractions) if ctx.profile.compression.prune.mlp_keep_fraction == "auto" else ()
    blocks = calibration_blocks(ctx.corpus.train, p.sensitivity_blocks)
    model = ctx.teacher.model
    keep_logprobs, predicted = sensitivity_layout(model, blocks, ctx.profile.compression.memory_gb,
                                                  ctx.profile.compression.memory_target_gb)
    seconds = SENSITIVITY_SHARE * max(0.0, ctx.time_budget.training_left_s()) if ctx.time_budget is not None else None
    runs = measurements(model, names, fractions)
    batches = batches_of(blocks) if seconds is not None else 1  # under a time budget: the runs again for each batch that fits
    with ctx.reporter.task("measuring what each format, block and width costs (KL to the teacher)",
                           total=runs * batches, unit="runs") as advance:
        result = measure_sensitivity(model, blocks, names, fractions, progress=advance, keep_teacher_logprobs=keep_logprobs,
                                     seconds=seconds)
        advance(0, total=runs * (len(result.batch_seconds) if result.batch_seconds else 1))  # the batches measured
    atomic_write_json(ctx.run.path(*SENSITIVITY), result.to_dict())
    cheapest = sorted(range(len(result.blocks)), key=lambda i: result.blocks[i])[:5]
    return StageRecord("sensitivity", settings={"formats": names, "mlp_fractions": list(fractions), "blocks": len(blocks)},
                       metrics={"tokens": result.tokens, "seconds": round(result.seconds, 1), "calibration_blocks": result.calibration_blocks,
                                "seconds_allowed": round(seconds, 1) if seconds is not None else None,
                                "batch_seconds": [round(t, 1) for t in result.batch_seconds] if result.batch_seconds else None,
                                "formats": result.formats,
                                "block_kl": result.blocks, "cheapest_blocks": cheapest, "mlp_width_kl": result.mlp_width,
                                "teacher_logprobs_kept": keep_logprobs, "predicted_peak_rss_mb": round(predicted / 2**20, 1)},
                       artifacts={"knob costs": "plan/sensitivity.json"})


def plan(ctx: RunContext) -> StageRecord:
    from ..device.costmodel import ArchShape
    from ..families import family_of
    from ..fileio import atomic_write_json
    from ..methods.planner import Search, choose, depths, describe
    from ..methods.prune import resolve_keep_layers
    from ..methods.sensitivity import Sensitivity
    from ..pipeline.plan import format_plan
    from ..plots import pareto_plot

    prof = ctx.profile
    c = prof.compression
    teacher = ctx.teacher.model
    layers = teacher.config.num_hidden_layers
    sens = Sensitivity.from_dict(json.loads(ctx.run.path(*SENSITIVITY).read_text()))
    linear, embedding = candidate_formats(prof)
    pruning = c.prune.method != "none"
    auto_formats = prof.deployment.tensor_formats == "auto"
    keep = None if not pruning else resolve_keep_layers(c.prune.keep_layers, layers)
    width = c.prune.mlp_keep_fraction if pruning else 1.0
    search = Search(
        shape=ArchShape.from_config(teacher.config), sensitivity=sens, roles=family_of(teacher).roles(),
        base=format_plan(prof), format_candidates=linear if auto_formats else None,
        embedding_candidates=embedding if auto_formats else None,
        depths=depths(layers, keep if pruning else layers), mlp_fractions=[1.0, *c.planner.mlp_fractions] if width == "auto" else [width],
        qat_steps=c.qat.steps, distill_steps=c.distill.steps if pruning else 0, max_kl=c.planner.max_kl)
    chosen, ranked, points = choose(search, prof)
    atomic_write_json(ctx.run.path(*PLAN), {"chosen": chosen.to_dict(), "candidates": [r.to_dict() for r in ranked], "points": points})
    ctx.compression_plan = chosen
    pareto_plot(ctx.run.path("plan", "pareto.png"), points, chosen.to_dict(), prof.budgets.max_model_mb, prof.name)
    return StageRecord("plan", settings={"searched_depths": search.depths, "mlp_fractions": search.mlp_fractions,
                                         "format_candidates": search.format_candidates, "embedding_candidates": search.embedding_candidates,
                                         "qat_steps": search.qat_steps, "distill_steps": search.distill_steps, "max_kl": search.max_kl},
                       metrics={"chosen": chosen.to_dict(), "described": describe(chosen.formats), "candidates": len(ranked),
                                "runners_up": [r.to_dict() for r in ranked[1:RUNNERS_UP + 1]]},
                       artifacts={"compression plan": "plan/plan.json", "size vs predicted KL": "plan/pareto.png"})


def report_plan(record: StageRecord, ctx: RunContext) -> None:
    from ..formats import FormatPlan
    from ..methods.planner import describe

    rows = []
    for c in [record.metrics["chosen"], *record.metrics["runners_up"]]:
        rows.append([c["layers"], c["mlp_fraction"], describe(FormatPlan.from_dict(c["formats"])), round(c["model_mb"], 1),
                     round(c["decode_tokens_per_s"], 1), round(c["ttft_ms"]), round(c["peak_memory_mb"]), round(c["format_kl"], 4),
                     round(c["prune_kl"], 4), round(c["predicted_kl"], 4), "yes" if not c["violations"] else ", ".join(c["violations"])])
    ctx.report.tables[TABLE] = {
        "headers": ["blocks", "MLP width", "formats", "file MB", "decode tok/s", "TTFT ms", "peak MB", "format KL (RTN)",
                    "pruning KL", "predicted KL after training", "meets budgets"], "rows": rows}
