"""The stage that puts the student's weights on the exact grid of the shipped format (QAT-KD)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..methods.planner import describe
from ..pipeline.context import SHIPPED_DIR, RunContext, Shipped
from ..report import StageRecord
from .distill import cached_teacher, fit_to_time_budget, memory_metrics, mixture_settings

PREDICTION_TABLE = "Planner prediction against the measurement"
EXACT_NOTE = "exact: every tensor of the teacher is already on its planned grid (a teacher distributed in these formats); no QAT steps"
METHOD_NOTE = {"clipped scales": "clipped scales, no QAT steps", "round-to-nearest": "round-to-nearest (no QAT steps)",
               "no quantization": "{} (no quantization)"}


def qat(ctx: RunContext) -> StageRecord:
    """QAT-KD on the exact grid of the shipped format (or clipped / round-to-nearest scales when qat.steps is 0)."""
    from .. import kquants as kq
    from ..fileio import atomic_path
    from ..methods.evaluate import evaluate, torch_logits_fn
    from ..methods.models import model_summary
    from ..methods.qat import GRIDS_FILE, LEARNED_CLIP_LR_SCALE, grids
    from ..methods.qat_kd import qat_config, qat_kd
    from ..plots import loss_curves_plot

    plan = ctx.format_plan()
    linear = plan.format_of("linear")
    qs = ctx.profile.compression.qat
    student = ctx.current_student()
    cfg = qat_config(ctx.profile.compression.distill, qs)
    mixture = ctx.mixture()
    cfg.on_policy_share = mixture.on_policy_share
    exact = _holds_the_teacher_exactly(ctx, student.model, plan)
    if exact:  # nothing to recover: the plan's grids already hold the teacher's weights
        cfg.steps = 0
    settings: dict[str, Any] = {"weight_format": plan.name, "format_plan": plan.to_dict(), "steps": qs.steps, "learning_rate": qs.learning_rate,
                                "clip_search": qs.clip_search and linear.clip_search,
                                "learn_clip": qs.learn_clip and linear.grid is not None}
    fitted: dict = {}

    def fit(probe: Any) -> int:
        fitted.update(fit_to_time_budget(ctx, "qat", cfg.steps, probe) or {})
        return fitted.get("steps", cfg.steps)

    result = qat_kd(student.model, ctx.teacher.model, ctx.training_blocks(), ctx.calibration_blocks(), plan, cfg,
                    clip_search=qs.clip_search and not exact, learn_clip=qs.learn_clip, layer_map=student.layer_map,
                    run_dir=ctx.run.path("qat"), reporter=ctx.reporter, logit_cache=cached_teacher(ctx, cfg),
                    fit_steps=fit if ctx.time_budget is not None else None,
                    deadline=ctx.time_budget.deadline() if ctx.time_budget is not None else None,
                    memory_gb=ctx.profile.compression.memory_gb, memory_target_gb=ctx.profile.compression.memory_target_gb,
                    mixture=mixture)
    metrics: dict[str, Any] = dict(result.clip_stats)
    artifacts = {"QAT student (weights on the shipped grid)": SHIPPED_DIR}
    if result.outcome is not None:
        loss_curves_plot(ctx.run.path("qat", "loss.png"), result.outcome.history, f"QAT-KD losses ({plan.name})")
        artifacts["QAT loss curves"] = "qat/loss.png"
        settings.update(asdict(cfg))
        settings.update(mixture_settings(mixture, cfg))
        settings["clip_lr_scale"] = LEARNED_CLIP_LR_SCALE
        if fitted:
            settings["time_budget"] = fitted
        metrics.update(result.outcome.summary())
        metrics.update(result.learned_clip)
        metrics.update(memory_metrics(result.memory))
    else:
        settings["steps"] = 0
        settings["method"] = EXACT_NOTE if exact else METHOD_NOTE[result.method].format(plan.name)
    model = result.model
    with atomic_path(ctx.run.path(SHIPPED_DIR)) as tmp:
        model.save_pretrained(tmp)
        ctx.teacher.tokenizer.save_pretrained(tmp)
        fixed = grids(model)
        if fixed:  # K-quant tensors: the exporters write their codes on these grids
            kq.save_grids(tmp / GRIDS_FILE, fixed)
            artifacts["fixed K-quant grids"] = f"{SHIPPED_DIR}/{GRIDS_FILE}"
    ctx.student = None  # the student object now holds the shipped weights
    blocks = ctx.heldout_blocks()
    with ctx.reporter.task("evaluating the quantized student (torch)", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(model.eval()), blocks, torch_logits_fn(ctx.teacher.model), progress=advance)
    ctx.shipped = Shipped(model, plan, m)
    return StageRecord("qat", settings=settings, metrics={**metrics, "heldout": m.to_dict(), "student": model_summary(model)},
                       artifacts=artifacts)


def _holds_the_teacher_exactly(ctx: RunContext, model: Any, plan: Any) -> bool:
    """The student is the unpruned teacher and round-tripping each tensor through its planned
    format changes nothing (say, Q4_1 layers of a teacher that ships as Q4_1)."""
    import torch

    from ..methods.qat import quantized_tensors

    t = ctx.teacher.model.config
    if (model.config.num_hidden_layers, model.config.intermediate_size) != (t.num_hidden_layers, t.intermediate_size):
        return False
    with torch.no_grad():
        return all(torch.equal(fmt.torch_round_trip(mod.weight), mod.weight) for mod, fmt in quantized_tensors(model, plan))


def shipped(ctx: RunContext) -> Shipped:
    """The shipped student: from this process, or from the run directory when qat finished earlier."""
    if ctx.shipped is None:
        ctx.shipped = Shipped(load_shipped_model(ctx.run.path(SHIPPED_DIR)), ctx.format_plan(), shipped_heldout(ctx))
    return ctx.shipped


def load_shipped_model(directory: Path) -> Any:
    """The QAT student a run wrote (``<run>/student-qat``), with the K-quant grids its exporters write codes on."""
    from .. import kquants as kq
    from ..methods.qat import GRIDS_ATTRIBUTE, GRIDS_FILE
    from ..pipeline.context import load_hf

    model = load_hf(directory)
    setattr(model, GRIDS_ATTRIBUTE, kq.load_grids(Path(directory) / GRIDS_FILE))
    return model


def shipped_heldout(ctx: RunContext) -> Any:
    """The shipped weights' held-out quality in torch (HeldoutMetrics), without loading the model; None before qat."""
    if ctx.shipped is not None:
        return ctx.shipped.heldout
    from ..methods.evaluate import HeldoutMetrics

    record = ctx.report.stage("qat") or ctx.run.completed("qat")
    return HeldoutMetrics(**record.metrics["heldout"]) if record else None


def report_qat(record: StageRecord, ctx: RunContext) -> None:
    method = "QAT-KD" if record.settings.get("steps") else ("clipped scales" if record.settings.get("clip_search") else "round-to-nearest")
    if record.settings.get("method") == EXACT_NOTE:
        method = "exact"
    ctx.report.add_model_row(f"student, {record.settings.get('weight_format')} {method} (torch)", record.metrics["student"],
                             record.metrics["heldout"])
    chosen = ctx.planned()
    if chosen is not None:  # how good was the planner's prediction?
        measured = record.metrics["heldout"]["kl_to_teacher"]
        ctx.report.tables[PREDICTION_TABLE] = {
            "headers": ["plan", "predicted KL after training (PROJECTION)", "measured KL (held-out, torch)", "measured / predicted"],
            "rows": [[f"{chosen.layers} blocks, MLP x{chosen.mlp_fraction:g}, {describe(chosen.formats)}", round(chosen.predicted_kl, 4),
                      round(measured, 4), round(measured / chosen.predicted_kl, 2) if chosen.predicted_kl else None]]}
