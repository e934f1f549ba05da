"""What a run will do and produce, decided from the profile before anything is loaded."""

from __future__ import annotations

from ..formats import FormatPlan
from ..profiles import RUNTIME_FORMAT, DeviceProfile

ALWAYS_RUN = {"load_teacher", "load_corpus"}  # cheap, and their objects live in memory: redone on --resume


def plan_stages(profile: DeviceProfile, data_free: bool = False) -> list[str]:
    """The stages edgekd runs for ``profile``, in order; ``data_free``: ``--data teacher``, the
    teacher's samples are the corpus."""
    from ..stages.distill import cache_readers
    from ..stages.plan import needs_planner

    stages = ["load_teacher", "load_corpus"]
    if data_free or profile.compression.data.mixture.teacher_samples > 0:
        stages += ["teacher_samples"]
    stages += ["evaluate_teacher"]
    if needs_planner(profile):
        stages += ["sensitivity", "plan"]
    comp = profile.compression
    if comp.prune.method != "none":
        stages += ["score_blocks", "prune"]
    distills = comp.distill.steps > 0 and comp.prune.method != "none"
    if cache_readers(profile):  # a teacher cache that some step reads
        stages += ["teacher_logits"]
    if distills:
        stages += ["distill", "evaluate_student"]
    return stages + ["qat", "export", "bench"]


def format_plan(profile: DeviceProfile) -> FormatPlan:
    """The format of every tensor the run ships as the profile gives it: its weight format for
    block linears, that format's embedding format, and the profile's per-tensor choices. With
    ``tensor_formats: auto`` this is the plan's base; the planner's choice replaces it (RunContext.format_plan)."""
    tensors = profile.deployment.tensor_formats
    return FormatPlan.uniform(profile.deployment.weight_format, None if tensors == "auto" else tensors)


def planned_exports(profile: DeviceProfile, plan: FormatPlan | None = None) -> list:
    """The files the export stage writes for the run's format ``plan`` (default: the profile's),
    in the profile's order (edgekd.exporters.ship.PlannedExport); named after the plan's formats."""
    from ..exporters.ship import onnx_runtime_of, planned_export

    plan = plan or format_plan(profile)
    onnx_runtime = onnx_runtime_of(profile.deployment.runtime)
    return [planned_export(container, plan, onnx_runtime) for container in profile.deployment.formats]


def budget_file(profile: DeviceProfile, plan: FormatPlan | None = None):
    """The exported file whose benchmark is checked against the budgets: the one the runtime loads."""
    want = RUNTIME_FORMAT[profile.deployment.runtime]
    return next(e for e in planned_exports(profile, plan) if e.container == want)
