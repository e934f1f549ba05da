"""Stages that score the teacher's blocks and prune it into the student."""

from __future__ import annotations

import json
from typing import Any

from ..pipeline.context import PRUNE_PLAN, Student
from ..report import StageRecord

SCORES = ("prune", "scores.json")
TABLE = "Block importance (teacher)"


def score_blocks(ctx: Any) -> StageRecord:
    from ..fileio import atomic_write_json
    from ..methods.prune import loss_increase_scores, predict_scoring_peak, score_blocks

    settings = ctx.profile.compression.prune
    calib = ctx.calibration_blocks()
    model = ctx.teacher.model
    predicted = predict_scoring_peak(model.config, calib.shape[1])
    with ctx.reporter.task("scoring blocks (calibration pass)", total=len(calib), unit="blocks") as advance:
        scores = score_blocks(model, calib, progress=advance)
    if settings.method == "loss_increase":
        with ctx.reporter.task("measuring loss increase per dropped block", total=model.config.num_hidden_layers, unit="blocks") as advance:
            scores.loss_increase = loss_increase_scores(model, calib, progress=advance)
    atomic_write_json(ctx.run.path(*SCORES), scores.to_dict())
    return StageRecord("score_blocks", settings={"method": settings.method, "calibration_blocks": len(calib)},
                       metrics={"calibration_tokens": scores.calibration_tokens, "predicted_peak_rss_mb": round(predicted / 2**20, 1)},
                       artifacts={"block scores": "prune/scores.json"})


def prune(ctx: Any) -> StageRecord:
    from ..fileio import atomic_write_json
    from ..methods.evaluate import evaluate, torch_logits_fn
    from ..methods.memory import kept_bytes, predict_evaluation_peak
    from ..methods.models import model_summary
    from ..methods.planner import describe
    from ..methods.prune import BlockScores, plan_pruning, resolve_keep_layers, select_layers
    from ..plots import block_scores_plot

    settings = ctx.profile.compression.prune
    teacher = ctx.teacher.model
    n_layers = teacher.config.num_hidden_layers
    scores = BlockScores.from_dict(json.loads(ctx.run.path(*SCORES).read_text()))
    chosen = ctx.planned()
    if chosen is not None:  # the planner chose blocks (by their measured KL), width and formats together
        keep, fraction = chosen.keep, chosen.mlp_fraction
        reason = {"reason": f"planner: the least predicted KL that meets the {ctx.profile.name} budgets "
                            f"({chosen.layers} blocks, MLP x{chosen.mlp_fraction:g}, {describe(chosen.formats)})",
                  "predicted_kl": chosen.predicted_kl, "model_mb": chosen.model_mb}
    else:
        keep = select_layers(scores, resolve_keep_layers(settings.keep_layers, n_layers), settings.method)
        fraction, reason = settings.mlp_keep_fraction, {"reason": f"keep_layers={settings.keep_layers} from the profile"}
    plan = plan_pruning(teacher, keep, fraction, ctx.calibration_blocks(), reason)
    predicted = predict_evaluation_peak(teacher.config, ctx.heldout_blocks().shape[1], with_teacher=True,
                                        extra_bytes=kept_bytes(teacher, keep))  # the student copy, then its evaluation
    pruned_model = plan.make_student(teacher)
    _check_exportable(ctx, pruned_model)
    ctx.prune_plan = plan
    atomic_write_json(ctx.run.path(*PRUNE_PLAN), plan.to_dict())
    ctx.student = Student(pruned_model, plan.layer_map)
    keep = plan.keep
    removed = [i for i in range(n_layers) if i not in keep]
    block_scores_plot(ctx.run.path("prune", "scores.png"),
                      {"block_influence": scores.block_influence, "angular_distance": scores.angular_distance,
                       "loss_increase": scores.loss_increase}, removed)
    rows = [[i, "kept" if i in keep else "removed", round(scores.block_influence[i], 5), round(scores.angular_distance[i], 5),
             None if scores.loss_increase is None else round(scores.loss_increase[i], 5)] for i in range(n_layers)]
    blocks = ctx.heldout_blocks()
    student = ctx.student.model
    with ctx.reporter.task("evaluating pruned student (no healing)", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(student), blocks, torch_logits_fn(teacher), progress=advance)
    return StageRecord(
        "prune",
        settings={"method": settings.method, "keep_layers": settings.keep_layers, "mlp_keep_fraction": settings.mlp_keep_fraction},
        metrics={"kept_layers": len(keep), "removed_blocks": removed, "layer_map": plan.layer_map,
                 "intermediate_size": student.config.intermediate_size, "depth_plan": plan.depth_plan,
                 "student": model_summary(student), "heldout": m.to_dict(), "block_table": rows,
                 "predicted_peak_rss_mb": round(predicted / 2**20, 1)},
        artifacts={"prune plan": "prune/plan.json", "block scores plot": "prune/scores.png"},
    )


def _check_exportable(ctx: Any, student: Any) -> None:
    """Refuse now, before any training, a pruned student the profile's GGUF cannot hold (a SmolLM3
    student whose blocks without rotary embedding no longer fall where llama.cpp puts them)."""
    from ..errors import EdgekdError
    from ..families import family_of

    if "gguf" not in ctx.profile.deployment.formats:
        return
    refusal = family_of(student).unsupported_gguf_config(student.config)
    if refusal:
        raise EdgekdError(f"the pruned student cannot be written as GGUF: {refusal}",
                          fix="keep blocks that preserve the pattern (compression.prune.keep_layers), or set deployment.formats: [onnx]")


def pruned(record: StageRecord, ctx: Any) -> bool:
    """Did this prune stage remove anything? (A full-depth "student" is the teacher itself.)"""
    return record.metrics["student"].get("params") != ctx.report.teacher.get("params")


def report_prune(record: StageRecord, ctx: Any) -> None:
    if pruned(record, ctx):  # no rows that only repeat the teacher
        ctx.report.add_model_row("pruned, no healing", record.metrics["student"], record.metrics["heldout"])
    ctx.report.tables[TABLE] = {
        "headers": ["block", "decision", "Block Influence", "angular distance (n=1)", "loss increase"],
        "rows": record.metrics["block_table"]}
