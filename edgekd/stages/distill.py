"""Stages that heal the pruned student by distillation: the teacher-logit cache, training, evaluation."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..pipeline.context import STUDENT_DIR, RunContext
from ..report import StageRecord
from .prune import pruned

CACHE_DIR = "teacher-logits"


def teacher_logits(ctx: RunContext) -> StageRecord:
    """The teacher's targets of every training position, computed once (``compression.distill.logit_cache``)."""
    import numpy as np

    from ..methods import logit_cache
    from ..methods.memory import refuse_over_limit
    from ..methods.precision import resolve_precision

    ds = ctx.profile.compression.distill
    spec = ds.logit_cache
    train = ctx.training_blocks()
    predicted = logit_cache.predict_build_peak(spec, ctx.teacher.model.config, ds.batch_size, train)
    refuse_over_limit(predicted, ctx.profile.compression.memory_gb,
                      f"caching the teacher's {'final hidden states' if spec.kind == 'hidden' else 'logits'}",
                      "lower compression.distill.batch_size" + ("" if spec.kind == "hidden" else " or compression.distill.logit_cache.k"))
    what = "final hidden states" if spec.kind == "hidden" else (f"{spec.k} sampled tokens" if spec.kind == "sample" else f"top-{spec.k} logits")
    precision = resolve_precision(ds.precision)
    rows = cache_rows(ctx) if spec.kind == "hidden" else np.arange(len(train))
    with ctx.reporter.task(f"caching the teacher's {what} per position", total=len(rows), unit="blocks") as advance:
        cache = logit_cache.build_cache(spec, ctx.teacher.model, train, ctx.run.path(CACHE_DIR), temperature=ds.temperature,
                                        precision=precision, batch_size=ds.batch_size, seed=ds.seed, progress=advance, rows=rows)
    tokens = int(len(rows) * (train.shape[1] - 1))
    per_token = cache.bytes_per_token if spec.kind == "hidden" else logit_cache.cache_size_bytes(1, cache.k)
    settings = {"kind": "hidden", "precision": precision} if spec.kind == "hidden" else \
        {"k": cache.k, "kind": cache.kind, "temperature": ds.temperature}
    return StageRecord("teacher_logits", settings=settings,
                       metrics={"tokens": tokens, "blocks": len(rows), "training_blocks": len(train),
                                "size_mb": tokens * per_token / 1e6, "mb_per_million_tokens": per_token,
                                "predicted_peak_rss_mb": round(predicted / 2**20, 1)},
                       artifacts={"teacher cache": CACHE_DIR})


def cache_readers(profile: Any) -> dict[str, int]:
    """The training stages whose steps would read the profile's teacher cache, with their planned
    steps; empty when the profile asks for none or no step would read it (then none is built: the
    shipped profiles' hidden-state cache serves only a logit-only step, and their distillation and
    QAT-KD steps match hidden states too, so they run the teacher)."""
    from ..methods.distill import DistillConfig
    from ..methods.qat_kd import qat_config
    from ..methods.step_losses import reads_teacher_cache

    comp = profile.compression
    if comp.distill.logit_cache is None:
        return {}
    kind, readers = comp.distill.logit_cache.kind, {}
    if comp.prune.method != "none" and comp.distill.steps > 0 and reads_teacher_cache(DistillConfig.from_settings(comp.distill), kind):
        readers["distill"] = comp.distill.steps
    if comp.qat.steps > 0 and reads_teacher_cache(qat_config(comp.distill, comp.qat), kind):
        readers["qat"] = comp.qat.steps
    return readers


def cache_rows(ctx: RunContext) -> Any:
    """The training blocks the planned steps that read the cache take: a hidden-state cache holds
    these (never more teacher passes than the live teacher would make)."""
    from ..methods.distill import DistillConfig
    from ..methods.logit_cache import blocks_read

    comp = ctx.profile.compression
    return blocks_read(ctx.mixture(), DistillConfig.from_settings(comp.distill), max(cache_readers(ctx.profile).values(), default=0))


def cached_teacher(ctx: RunContext, cfg: Any) -> Any:
    """The teacher cache of this run (logits or final hidden states) for a step with ``cfg``'s loss
    terms, or None: the profile asks for the live teacher, or this step does not read the cache."""
    from ..methods import logit_cache
    from ..methods.precision import resolve_precision
    from ..methods.step_losses import reads_teacher_cache

    ds = ctx.profile.compression.distill
    if ds.logit_cache is None or not reads_teacher_cache(cfg, ds.logit_cache.kind):
        return None
    return logit_cache.load(ctx.run.path(CACHE_DIR), ds.logit_cache.k, ds.temperature, ctx.training_blocks(), ds.logit_cache.kind,
                            resolve_precision(ds.precision), rows=cache_rows(ctx) if ds.logit_cache.kind == "hidden" else None)


def fit_to_time_budget(ctx: RunContext, stage: str, steps: int, probe: Any, later: list[int] = ()) -> dict | None:
    """With a time budget: this stage's step count, measured (``probe()``: seconds per step) and
    fitted with the ``later`` stages' steps at the same step time; stored for ``--resume``."""
    from ..pipeline.timebudget import fit_steps, fitted_steps

    if ctx.time_budget is None or steps <= 0:
        return None

    def decide() -> dict:
        per_step, left = probe(), ctx.time_budget.training_left_s()
        fitted = fit_steps([(steps, per_step), *[(n, per_step) for n in later]], left)[0]
        return {"planned_steps": steps, "steps": fitted, "seconds_per_step": round(per_step, 3),
                "training_seconds_left": round(left, 1), "later_stage_steps": list(later)}

    return fitted_steps(ctx.run.path(stage), decide)


def mixture_settings(mixture: Any, cfg: Any) -> dict[str, Any]:
    """The rows each batch takes from each data source (edgekd.methods.mixture), for the record."""
    counts, on_policy = mixture.slots(cfg.batch_size)
    names = ["corpus", "teacher_samples"][: len(counts)]
    out: dict[str, Any] = {"batch_rows": {**dict(zip(names, counts)), "on_policy": on_policy}}
    if mixture.policy is not None:
        out["on_policy"] = asdict(mixture.policy)
        joined = mixture.on_policy_from(cfg.steps)
        if joined:  # the steps before the on-policy rows join
            out["on_policy_from_step"] = joined
            out["batch_rows_before_on_policy"] = dict(zip(names, mixture.slots(cfg.batch_size, on_policy=False)[0]))
    return out


def memory_metrics(memory: Any) -> dict[str, Any]:
    """A training stage's predicted peak (PROJECTION, compared with the measured one in the report) and its parts."""
    return {"predicted_peak_rss_mb": round(memory.total / 2**20, 1),
            "predicted_peak_parts_mb": {k: round(v / 2**20, 1) for k, v in memory.parts.items()},
            "teacher_while_training": teacher_while_training(memory)}


def teacher_while_training(memory: Any) -> str:
    if memory.teacher_head_kept:
        return "parked on disk but its head (its final hidden states from the cache)"
    if memory.teacher_parked:
        return "parked on disk (every target from the logit cache)"
    return "bf16 linear weights" if memory.teacher_bf16 else "as loaded"


def _save_student(ctx: RunContext, model: Any) -> None:
    from ..fileio import atomic_path

    with atomic_path(ctx.run.path(STUDENT_DIR)) as tmp:
        model.save_pretrained(tmp)
        ctx.teacher.tokenizer.save_pretrained(tmp)


def distill(ctx: RunContext) -> StageRecord:
    from ..methods.distill import DistillConfig, plan_memory, run_distillation
    from ..methods.logit_cache import live_target_bytes_per_token
    from ..methods.step_probe import probe_step_seconds
    from ..plots import loss_curves_plot

    student = ctx.current_student()
    cfg = DistillConfig.from_settings(ctx.profile.compression.distill)
    artifacts = {"student (Hugging Face directory)": STUDENT_DIR}
    teacher_cfg = ctx.teacher.model.config
    if student.model.config.num_hidden_layers == teacher_cfg.num_hidden_layers and \
            student.model.config.intermediate_size == teacher_cfg.intermediate_size:
        # nothing was pruned: the student is the teacher, and distilling it from itself changes nothing
        _save_student(ctx, student.model)
        return StageRecord("distill", settings={"steps": 0}, metrics={"skipped": "nothing was pruned; the student equals the teacher"},
                           artifacts=artifacts)
    cache = cached_teacher(ctx, cfg)
    compression = ctx.profile.compression
    train, mixture = ctx.training_blocks(), ctx.mixture()
    cfg.on_policy_share = mixture.on_policy_share
    cfg, memory = plan_memory(student.model, ctx.teacher.model, cfg, ctx.corpus.block_len, cache, compression.memory_gb,
                              target_gb=compression.memory_target_gb)
    fitted = fit_to_time_budget(ctx, "distill", cfg.steps, lambda: probe_step_seconds(
        student.model, ctx.teacher.model, train, cfg, student.layer_map, cache, mixture=mixture), later=[ctx.profile.compression.qat.steps])
    cfg.steps = fitted["steps"] if fitted else cfg.steps
    deadline = None
    if ctx.time_budget is not None:  # this stage's share of the training time left; QAT's steps come after
        later = ctx.profile.compression.qat.steps
        deadline = ctx.time_budget.deadline(fitted["planned_steps"] / (fitted["planned_steps"] + later) if fitted else 1.0)
    outcome, memory = run_distillation(student.model, ctx.teacher.model, train, cfg, student.layer_map, "distilling",
                                       ctx.reporter, ctx.run.path("distill"), cache, deadline=deadline, memory=memory, mixture=mixture)
    _save_student(ctx, student.model)
    loss_curves_plot(ctx.run.path("distill", "loss.png"), outcome.history, "distillation losses")
    return StageRecord(
        "distill", settings={**asdict(cfg), **mixture_settings(mixture, cfg), **({"time_budget": fitted} if fitted else {})},
        metrics={**outcome.summary(), **memory_metrics(memory),
                 "logit_cache": cache is not None,
                 "live_targets_if_cached_bytes_per_token": live_target_bytes_per_token(teacher_cfg, ctx.corpus.block_len)},
        artifacts={**artifacts, "loss curves": "distill/loss.png"},
    )


def evaluate_student(ctx: RunContext) -> StageRecord:
    from ..methods.evaluate import evaluate, torch_logits_fn
    from ..methods.memory import predict_evaluation_peak
    from ..methods.models import model_summary

    student = ctx.current_student().model
    blocks = ctx.heldout_blocks()
    predicted = predict_evaluation_peak(student.config, blocks.shape[1], with_teacher=True)
    with ctx.reporter.task("evaluating student on held-out blocks", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(student), blocks, torch_logits_fn(ctx.teacher.model), progress=advance)
    return StageRecord("evaluate_student", settings={"heldout_blocks": len(blocks)},
                       metrics={**m.to_dict(), "student": model_summary(student), "predicted_peak_rss_mb": round(predicted / 2**20, 1)})


def report_student(record: StageRecord, ctx: RunContext) -> None:
    if pruned(record, ctx):
        ctx.report.add_model_row("student, distilled", record.metrics["student"], record.metrics)
