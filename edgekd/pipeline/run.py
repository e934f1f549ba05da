"""Run a compression: profile -> plan -> stages -> report.

Completed stages are recorded in the run directory's ``state.json`` with their artifacts, so
``--resume`` skips them. Loading the teacher and the corpus is cheap and always re-done (the
objects live in memory); everything expensive is a resumable stage. After the last stage each
stage adds its rows and tables to the report from its record, and the budget checks of the
benchmark of the runtime's own file become the run's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from .. import faults
from ..errors import EdgekdError
from ..profiles import DeviceProfile, load_profile
from ..progress import Reporter
from ..report import Report
from ..stages import STAGES
from ..stages.bench import budget_checks
from ..stages.samples import data_free_notes, sampling_notes
from ..versions import edgekd_version, host_info, library_versions
from .context import RunContext, RunInputs, is_data_free
from .peak_memory import peak_memory, release_freed_memory
from .plan import ALWAYS_RUN, plan_stages
from .rundir import RunDir, now_iso
from .timebudget import TimeBudget, budget_notes, parse_duration


def _run_stages(ctx: RunContext) -> None:
    report, run = ctx.report, ctx.run
    for stage_name in report.plan:
        done = None if stage_name in ALWAYS_RUN else run.completed(stage_name)
        if done is not None:
            ctx.reporter.info(f"  {stage_name}: done earlier, reused")
            report.stages.append(done)
            continue
        if stage_name in run.stale:
            ctx.reporter.info(f"  {stage_name}: finished earlier, but {run.stale[stage_name]}: running it again")
        release_freed_memory()
        faults.set_stage(stage_name)
        faults.point("stage start")
        t0 = time.perf_counter()
        with peak_memory() as peak:
            record = STAGES[stage_name].run(ctx)
        record.wall_time_s = round(time.perf_counter() - t0, 3)
        record.peak_rss_mb = round(peak.peak_mb, 1) if peak.peak_mb is not None else None
        run.record(record)
        report.stages.append(record)
        report.save(run.root)  # a readable (status: running) report after every stage


def _assemble_report(ctx: RunContext) -> None:
    for record in ctx.report.stages:
        stage = STAGES.get(record.name)
        if stage is not None and stage.report is not None:
            stage.report(record, ctx)
    ctx.report.budgets = budget_checks(ctx)
    ctx.report.notes += budget_notes(ctx.report.stages) + sampling_notes(ctx.report.stages) + data_free_notes(ctx.report.stages)


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
    time_budget: str | float | None = None,
    prompts: str | Path | None = None,
) -> Report:
    """Compress ``teacher`` for the device ``profile`` and return the run's :class:`Report`.

    ``teacher``: a Hugging Face model directory, a GGUF file, or None for the embedded
    SmolLM2-135M-Instruct. ``data``: a text/JSONL file, a directory, a saved datasets
    directory, None for Python's bundled documentation, or ``"teacher"``: no corpus, the
    teacher's samples are the training data (data-free). ``prompts``: a JSONL file of prompts
    for the teacher's samples (``compression.data.generation``). ``report.passed`` tells
    whether every measured budget of the profile holds. ``time_budget`` ("30m"; default: the
    profile's ``compression.time_budget``) fits the training steps to a wall-clock budget.
    """
    from ..methods.data import check_corpus_spec
    from ..methods.models import resolve_model_source

    reporter = Reporter(quiet=quiet)
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, overrides)
    # fail fast on bad paths, before any directory is made
    source = resolve_model_source(teacher)
    if not is_data_free(data):
        check_corpus_spec(data)
    if prompts is not None:
        from ..methods.generate import check_prompt_file

        check_prompt_file(prompts)
        if "teacher_samples" not in plan_stages(prof, is_data_free(data)):  # the plan's own decision
            raise EdgekdError("--prompts feeds the teacher's samples, and this run trains on none of them (the profile's "
                              "compression.data.mixture has no teacher_samples)",
                              fix="add --data teacher to train on the teacher's samples alone, or put them in the mixture: "
                              "--set 'compression.data.mixture={corpus: 0.5, teacher_samples: 0.5}'")
    budget = time_budget if time_budget is not None else prof.compression.time_budget
    budget_s = None if budget is None else parse_duration(budget)
    name = run_name or f"{prof.name}-{_slug(source.name)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EdgekdError(f"bad run name {name!r}", fix="use letters, digits, '.', '_' and '-' only")
    run = RunDir(Path(output) / name)
    run_config = {
        "profile": prof.model_dump(mode="json"),
        "teacher": source.describe(),
        "data": str(data or "default"),
        "text_field": text_field,
        **({"prompts": str(prompts)} if prompts is not None else {}),
    }
    resumed = run.open(run_config, overwrite=overwrite, resume=resume)
    try:
        report = _execute(run, prof, resumed, name, reporter, budget_s, RunInputs(teacher, data, text_field, trust_remote_code, prompts))
    finally:
        run.close()
    reporter.info(f"[green]done[/]: {run.root / 'report.md'}")
    return report


def _execute(run: RunDir, prof: DeviceProfile, resumed: bool, name: str, reporter: Reporter, budget_s: float | None,
             inputs: RunInputs) -> Report:
    """The plan's stages in the opened (and locked) run directory, then the report."""
    report = Report(
        run_name=name, run_dir=str(run.root), profile=prof.model_dump(mode="json"),
        edgekd_version=edgekd_version(), created_at=now_iso(),
        host=host_info(), versions=library_versions(), plan=plan_stages(prof, is_data_free(inputs.data)),
    )
    ctx = RunContext(prof, run, report, reporter, inputs)
    try:
        if budget_s is not None:
            spent = sum(rec.wall_time_s for stage in report.plan if stage not in ALWAYS_RUN and (rec := run.finished(stage)))
            ctx.time_budget = TimeBudget(budget_s, spent_before_s=spent)
        reporter.info(f"[bold]edgekd[/] {'resuming' if resumed else 'run'} {run.root}  plan: {' -> '.join(report.plan)}")
        _run_stages(ctx)
        _assemble_report(ctx)
    except EdgekdError:
        # A user error before any expensive stage finished: remove the run this call
        # created, so fixing the input and re-running needs no --overwrite.
        if not resumed and not any(s.name not in ALWAYS_RUN for s in report.stages):
            run.discard()
        raise
    report.status = "complete"
    report.finished_at = now_iso()
    report.save(run.root)
    return report
