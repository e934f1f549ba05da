"""The pipeline's stages: thin adapters between the run directory and the methods.

Each stage is a ``run(ctx) -> StageRecord`` that takes its inputs from the run context, calls
one recipe of :mod:`edgekd.methods` or :mod:`edgekd.exporters`, sets the artifact it makes
and records settings, metrics and files; its optional ``report(record, ctx)`` adds the stage's
rows and tables to the run's report, from its own record (so a stage finished by an earlier
process contributes the same rows). :data:`STAGES` maps the names a plan lists to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import bench, distill, export, inputs, plan, prune, qat, samples


@dataclass(frozen=True)
class Stage:
    run: Callable[[Any], Any]
    report: Callable[[Any, Any], None] | None = None


STAGES: dict[str, Stage] = {
    "load_teacher": Stage(inputs.load_teacher),
    "load_corpus": Stage(inputs.load_corpus),
    "teacher_samples": Stage(samples.teacher_samples),
    "evaluate_teacher": Stage(inputs.evaluate_teacher, inputs.report_teacher),
    "sensitivity": Stage(plan.sensitivity),
    "plan": Stage(plan.plan, plan.report_plan),
    "score_blocks": Stage(prune.score_blocks),
    "prune": Stage(prune.prune, prune.report_prune),
    "teacher_logits": Stage(distill.teacher_logits),
    "distill": Stage(distill.distill),
    "evaluate_student": Stage(distill.evaluate_student, distill.report_student),
    "qat": Stage(qat.qat, qat.report_qat),
    "export": Stage(export.export, export.report_export),
    "bench": Stage(bench.bench, bench.report_bench),
}
