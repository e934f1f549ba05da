"""Plan and run a compression: profile -> plan -> stages -> report.

Each stage is a function ``(ctx) -> StageRecord``. Completed stages are recorded in
the run directory's ``state.json`` with their artifacts, so ``--resume`` skips them.
Loading the teacher and the corpus is cheap and always re-done (the objects live in
memory); everything expensive is a resumable stage.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budgets import check_budgets
from .errors import EdgekdError
from .profiles import DeviceProfile, load_profile
from .progress import Reporter
from .report import Report, StageRecord
from .rundir import RunDir, now_iso
from .versions import edgekd_version, host_info, library_versions


@dataclass
class RunContext:
    profile: DeviceProfile
    run: RunDir
    report: Report
    reporter: Reporter
    teacher_spec: Any = None
    data_spec: Any = None
    text_field: str = "text"
    trust_remote_code: bool = False
    teacher: Any = None  # models.LoadedModel
    corpus: Any = None  # data.Corpus
    student: Any = None  # transformers model, once pruned (or distilled)
    prune_plan: dict[str, Any] | None = None  # keep list, layer map, MLP channels
    # metric name -> value, for the budget check (filled by bench stages)
    measured: dict[str, float] = field(default_factory=dict)
    measured_sources: dict[str, str] = field(default_factory=dict)


Stage = Callable[[RunContext], StageRecord]


# ---------------------------------------------------------------- stages


def stage_load_teacher(ctx: RunContext) -> StageRecord:
    from .models import load_causal_lm, resolve_model_source

    source = resolve_model_source(ctx.teacher_spec)
    with ctx.reporter.task(f"loading teacher {source.name}"):
        ctx.teacher = load_causal_lm(source, trust_remote_code=ctx.trust_remote_code)
    ctx.report.teacher = {**source.describe(), **ctx.teacher.info}
    return StageRecord("load_teacher", settings=source.describe(), metrics=dict(ctx.teacher.info))


def stage_load_corpus(ctx: RunContext) -> StageRecord:
    from .data import Corpus, load_corpus

    corpus_dir = ctx.run.path("corpus")
    settings = {
        "source": str(ctx.data_spec or "default"),
        "block_len": ctx.profile.compression.distill.seq_len,
        "heldout_fraction": ctx.profile.compression.evaluation.heldout_fraction,
    }
    if (corpus_dir / "corpus.json").exists():
        ctx.corpus = Corpus.load(corpus_dir)  # resume: the exact same blocks
    else:
        with ctx.reporter.task("tokenising corpus"):
            ctx.corpus = load_corpus(
                ctx.data_spec, ctx.teacher.tokenizer, settings["block_len"],
                settings["heldout_fraction"], ctx.text_field,
            )
        ctx.corpus.save(corpus_dir)
    ctx.report.corpus = ctx.corpus.describe()
    return StageRecord(
        "load_corpus", settings=settings, metrics=dict(ctx.corpus.stats),
        artifacts={"train blocks": "corpus/train.npy", "held-out blocks": "corpus/heldout.npy"},
    )


def heldout_eval_blocks(ctx: RunContext):
    return ctx.corpus.heldout[: ctx.profile.compression.evaluation.max_heldout_blocks]


def stage_evaluate_teacher(ctx: RunContext) -> StageRecord:
    from .evaluate import evaluate, torch_logits_fn

    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating teacher on held-out blocks", total=len(blocks), unit="blocks") as advance:
        metrics = evaluate(torch_logits_fn(ctx.teacher.model), blocks, progress=advance)
    return StageRecord(
        "evaluate_teacher",
        settings={"heldout_blocks": len(blocks), "block_len": int(blocks.shape[1])},
        metrics=metrics.to_dict(),
    )


def _calibration_blocks(ctx: RunContext):
    """Evenly spaced training blocks (never held-out ones) for the calibration pass."""
    import numpy as np

    train = ctx.corpus.train
    n = min(ctx.profile.compression.prune.calibration_blocks, len(train))
    return train[np.linspace(0, len(train) - 1, n).astype(int)]


def stage_score_blocks(ctx: RunContext) -> StageRecord:
    from .fileio import atomic_write_json
    from .prune import loss_increase_scores, score_blocks

    settings = ctx.profile.compression.prune
    calib = _calibration_blocks(ctx)
    model = ctx.teacher.model
    with ctx.reporter.task("scoring blocks (calibration pass)", total=len(calib), unit="blocks") as advance:
        scores = score_blocks(model, calib, progress=advance)
    if settings.method == "loss_increase":
        with ctx.reporter.task("measuring loss increase per dropped block", total=model.config.num_hidden_layers, unit="blocks") as advance:
            scores.loss_increase = loss_increase_scores(model, calib, progress=advance)
    atomic_write_json(ctx.run.path("prune", "scores.json"), scores.to_dict())
    return StageRecord(
        "score_blocks", settings={"method": settings.method, "calibration_blocks": len(calib)},
        metrics={"calibration_tokens": scores.calibration_tokens}, artifacts={"block scores": "prune/scores.json"},
    )


def _rebuild_student(ctx: RunContext) -> Any:
    """The pruned student from the stored plan (deterministic; used on resume)."""
    from .prune import apply_mlp_channels, make_student

    plan = ctx.prune_plan or json.loads(ctx.run.path("prune", "plan.json").read_text())
    ctx.prune_plan = plan
    student = make_student(ctx.teacher.model, plan["keep"])
    if plan.get("mlp_channels"):
        apply_mlp_channels(student, plan["mlp_channels"])
    return student.eval()


def stage_prune(ctx: RunContext) -> StageRecord:
    from .costmodel import ArchShape
    from .evaluate import evaluate, torch_logits_fn
    from .fileio import atomic_write_json
    from .planner import plan_depth
    from .plots import block_scores_plot
    from .prune import BlockScores, mlp_channel_importance, resolve_keep_layers, select_layers, select_mlp_channels

    settings = ctx.profile.compression.prune
    teacher = ctx.teacher.model
    n_layers = teacher.config.num_hidden_layers
    scores = BlockScores.from_dict(json.loads(ctx.run.path("prune", "scores.json").read_text()))
    keep_n = resolve_keep_layers(settings.keep_layers, n_layers)
    depth_plan: dict[str, Any] = {"reason": f"keep_layers={settings.keep_layers} from the profile"}
    if keep_n is None:
        keep_n, depth_plan = plan_depth(ctx.profile, ArchShape.from_config(teacher.config))
    keep = select_layers(scores, keep_n, settings.method)
    mlp_channels = None
    if settings.mlp_keep_fraction < 1.0:
        importance = mlp_channel_importance(teacher, _calibration_blocks(ctx))
        mlp_channels = select_mlp_channels(importance, settings.mlp_keep_fraction)
    ctx.prune_plan = {"keep": keep, "layer_map": keep, "mlp_channels": mlp_channels, "depth_plan": depth_plan}
    atomic_write_json(ctx.run.path("prune", "plan.json"), ctx.prune_plan)
    ctx.student = _rebuild_student(ctx)
    removed = [i for i in range(n_layers) if i not in keep]
    block_scores_plot(ctx.run.path("prune", "scores.png"),
                      {"block_influence": scores.block_influence, "angular_distance": scores.angular_distance,
                       "loss_increase": scores.loss_increase}, removed)
    rows = [[i, "kept" if i in keep else "removed", round(scores.block_influence[i], 5), round(scores.angular_distance[i], 5),
             None if scores.loss_increase is None else round(scores.loss_increase[i], 5)] for i in range(n_layers)]
    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating pruned student (no healing)", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(ctx.student), blocks, torch_logits_fn(teacher), progress=advance)
    from .models import model_summary

    return StageRecord(
        "prune",
        settings={"method": settings.method, "keep_layers": settings.keep_layers, "mlp_keep_fraction": settings.mlp_keep_fraction},
        metrics={"kept_layers": len(keep), "removed_blocks": removed, "layer_map": keep,
                 "intermediate_size": ctx.student.config.intermediate_size, "depth_plan": depth_plan,
                 "student": model_summary(ctx.student), "heldout": m.to_dict(), "block_table": rows},
        artifacts={"prune plan": "prune/plan.json", "block scores plot": "prune/scores.png"},
    )


def stage_distill(ctx: RunContext) -> StageRecord:
    from .distill import DistillConfig, check_memory, distill, estimate_training_memory
    from .fileio import atomic_path
    from .plots import loss_curves_plot

    if ctx.student is None:
        ctx.student = _rebuild_student(ctx)
    cfg = DistillConfig.from_settings(ctx.profile.compression.distill)
    teacher_cfg = ctx.teacher.model.config
    if ctx.student.config.num_hidden_layers == teacher_cfg.num_hidden_layers and \
            ctx.student.config.intermediate_size == teacher_cfg.intermediate_size:
        # nothing was pruned: the student is the teacher, and distilling it from itself changes nothing
        with atomic_path(ctx.run.path("student")) as tmp:
            ctx.student.save_pretrained(tmp)
            ctx.teacher.tokenizer.save_pretrained(tmp)
        return StageRecord("distill", settings={"steps": 0}, metrics={"skipped": "nothing was pruned; the student equals the teacher"},
                           artifacts={"student (Hugging Face directory)": "student"})
    estimate = estimate_training_memory(ctx.teacher.model, ctx.student, cfg.batch_size, ctx.corpus.block_len,
                                        attention_loss=cfg.w_attention > 0, hidden_loss=cfg.w_hidden > 0)
    check_memory(estimate)
    with ctx.reporter.task("distilling", total=cfg.steps, unit="steps") as advance:
        outcome = distill(ctx.student, ctx.teacher.model, ctx.corpus.train, cfg, ctx.prune_plan["layer_map"],
                          run_dir=ctx.run.path("distill"), resume=True, progress=advance)
    with atomic_path(ctx.run.path("student")) as tmp:
        ctx.student.save_pretrained(tmp)
        ctx.teacher.tokenizer.save_pretrained(tmp)
    loss_curves_plot(ctx.run.path("distill", "loss.png"), outcome.history, "distillation losses")
    from dataclasses import asdict

    return StageRecord(
        "distill", settings=asdict(cfg),
        metrics={**outcome.summary(), "memory_estimate_gb": round(estimate["total"] / 1e9, 2)},
        artifacts={"student (Hugging Face directory)": "student", "loss curves": "distill/loss.png"},
    )


def stage_evaluate_student(ctx: RunContext) -> StageRecord:
    from .evaluate import evaluate, torch_logits_fn
    from .models import model_summary

    if ctx.student is None:
        from transformers import AutoModelForCausalLM

        ctx.student = AutoModelForCausalLM.from_pretrained(str(ctx.run.path("student"))).eval()
    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating student on held-out blocks", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(ctx.student), blocks, torch_logits_fn(ctx.teacher.model), progress=advance)
    return StageRecord("evaluate_student", settings={"heldout_blocks": len(blocks)},
                       metrics={**m.to_dict(), "student": model_summary(ctx.student)})


STAGES: dict[str, Stage] = {
    "load_teacher": stage_load_teacher,
    "load_corpus": stage_load_corpus,
    "evaluate_teacher": stage_evaluate_teacher,
    "score_blocks": stage_score_blocks,
    "prune": stage_prune,
    "distill": stage_distill,
    "evaluate_student": stage_evaluate_student,
}
ALWAYS_RUN = {"load_teacher", "load_corpus"}


def plan_stages(profile: DeviceProfile) -> list[str]:
    """The stages this version of edgekd runs for ``profile``, in order."""
    stages = ["load_teacher", "load_corpus", "evaluate_teacher"]
    comp = profile.compression
    if comp.prune.method != "none":
        stages += ["score_blocks", "prune"]
    if comp.distill.steps > 0 and comp.prune.method != "none":
        stages += ["distill", "evaluate_student"]
    return stages


def _collect_evaluation(ctx: RunContext) -> None:
    """The held-out comparison table: teacher, pruned student, distilled student."""
    def row(summary: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
        return {"params": summary.get("params"), "layers": summary.get("layers"), "perplexity": m["perplexity"],
                "kl_to_teacher": m.get("kl_to_teacher"), "top1_agreement": m.get("top1_agreement"), "tokens": m["tokens"]}

    rec = ctx.report.stage("evaluate_teacher")
    if rec is not None:
        ctx.report.evaluation["teacher (fp32)"] = row(ctx.report.teacher, rec.metrics)
    rec = ctx.report.stage("prune")
    if rec is not None:
        ctx.report.evaluation["pruned, no healing"] = row(rec.metrics["student"], rec.metrics["heldout"])
        ctx.report.tables["Block importance (teacher)"] = {
            "headers": ["block", "decision", "Block Influence", "angular distance (n=1)", "loss increase"],
            "rows": rec.metrics["block_table"]}
    rec = ctx.report.stage("evaluate_student")
    if rec is not None:
        ctx.report.evaluation["student, distilled"] = row(rec.metrics["student"], rec.metrics)


# ---------------------------------------------------------------- driver


def _run_stages(ctx: RunContext) -> None:
    report, run = ctx.report, ctx.run
    for stage_name in report.plan:
        done = None if stage_name in ALWAYS_RUN else run.completed(stage_name)
        if done is not None:
            ctx.reporter.info(f"  {stage_name}: done earlier, reused")
            report.stages.append(done)
            continue
        t0 = time.perf_counter()
        record = STAGES[stage_name](ctx)
        record.wall_time_s = round(time.perf_counter() - t0, 3)
        run.record(record)
        report.stages.append(record)
        report.save(run.root)  # a readable (status: running) report after every stage


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def compress(
    teacher: str | Path | None = None,
    profile: str | Path | DeviceProfile = "raspberry-pi-5",
    data: str | Path | None = None,
    *,
    output: str | Path = "export",
    run_name: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    text_field: str = "text",
    quiet: bool = False,
) -> Report:
    """Compress ``teacher`` for the device ``profile`` and return the run's :class:`Report`.

    ``teacher``: a Hugging Face model directory, a GGUF file, or None for the embedded
    SmolLM2-135M-Instruct. ``data``: a text/JSONL file, a directory, a saved datasets
    directory, or None for Python's bundled documentation. ``report.passed`` tells
    whether every measured budget of the profile holds.
    """
    from .data import check_corpus_spec
    from .models import resolve_model_source

    reporter = Reporter(quiet=quiet)
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, overrides)
    # fail fast on bad paths, before any directory is made
    source = resolve_model_source(teacher)
    check_corpus_spec(data)
    name = run_name or f"{prof.name}-{_slug(source.name)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EdgekdError(f"bad run name {name!r}", fix="use letters, digits, '.', '_' and '-' only")
    run = RunDir(Path(output) / name)
    run_config = {
        "profile": prof.model_dump(mode="json"),
        "teacher": source.describe(),
        "data": str(data or "default"),
        "text_field": text_field,
    }
    resumed = run.open(run_config, overwrite=overwrite, resume=resume)
    report = Report(
        run_name=name, run_dir=str(run.root), profile=prof.model_dump(mode="json"),
        edgekd_version=edgekd_version(), created_at=now_iso(),
        host=host_info(), versions=library_versions(), plan=plan_stages(prof),
    )
    ctx = RunContext(prof, run, report, reporter, teacher, data, text_field, trust_remote_code)
    reporter.info(f"[bold]edgekd[/] {'resuming' if resumed else 'run'} {run.root}  plan: {' -> '.join(report.plan)}")
    try:
        _run_stages(ctx)
    except EdgekdError:
        # A user error before any expensive stage finished: remove the run this call
        # created, so fixing the input and re-running needs no --overwrite.
        if not resumed and not any(s.name not in ALWAYS_RUN for s in report.stages):
            run.discard()
        raise
    _collect_evaluation(ctx)
    report.budgets = check_budgets(
        prof.budgets, ctx.measured, ctx.measured_sources,
        missing_reason="no exported model was benchmarked in this run",
    )
    report.status = "complete"
    report.finished_at = now_iso()
    report.save(run.root)
    reporter.info(f"[green]done[/]: {run.root / 'report.md'}")
    return report
