"""Plan and run a compression: profile -> plan -> stages -> report.

Each stage is a function ``(ctx) -> StageRecord``. Completed stages are recorded in
the run directory's ``state.json`` with their artifacts, so ``--resume`` skips them.
Loading the teacher and the corpus is cheap and always re-done (the objects live in
memory); everything expensive is a resumable stage.
"""

from __future__ import annotations

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


STAGES: dict[str, Stage] = {
    "load_teacher": stage_load_teacher,
    "load_corpus": stage_load_corpus,
    "evaluate_teacher": stage_evaluate_teacher,
}
ALWAYS_RUN = {"load_teacher", "load_corpus"}


def plan_stages(profile: DeviceProfile) -> list[str]:
    """The stages this version of edgekd runs for ``profile``, in order."""
    return ["load_teacher", "load_corpus", "evaluate_teacher"]


def _collect_evaluation(ctx: RunContext) -> None:
    rec = ctx.report.stage("evaluate_teacher")
    if rec is not None:
        info = ctx.report.teacher
        ctx.report.evaluation["teacher (fp32)"] = {
            "params": info.get("params"), "layers": info.get("layers"),
            "perplexity": rec.metrics["perplexity"], "kl_to_teacher": None, "top1_agreement": None,
            "tokens": rec.metrics["tokens"],
        }


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
