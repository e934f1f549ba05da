"""What the stages of one run share: the run's inputs and the typed artifacts stages hand each other.

Each artifact is set by the stage that makes it and, when that stage was finished by an earlier
process (``--resume``), loaded back from the run directory by one method here: stages never read
each other's metric dicts or parse file names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..formats import FormatPlan
from ..profiles import DeviceProfile
from ..progress import Reporter
from ..report import Report
from .plan import format_plan
from .rundir import RunDir

STUDENT_DIR = "student"  # the distilled student (Hugging Face directory)
SHIPPED_DIR = "student-qat"  # the student with its weights on the shipped grid
PRUNE_PLAN = ("prune", "plan.json")
COMPRESSION_PLAN = ("plan", "plan.json")


@dataclass
class RunInputs:
    teacher: Any = None  # --teacher: path, or None for the embedded default
    data: Any = None  # --data
    text_field: str = "text"
    trust_remote_code: bool = False


@dataclass
class Student:
    """A student model and, for each of its blocks, the teacher block it came from."""

    model: Any
    layer_map: list[int]


@dataclass
class Shipped:
    """The student as it ships: weights on the grids of ``plan``, and its held-out quality in torch."""

    model: Any
    plan: FormatPlan
    heldout: Any  # edgekd.methods.evaluate.HeldoutMetrics


@dataclass
class Exported:
    export: Any  # edgekd.exporters.ship.PlannedExport
    path: Path


@dataclass
class RunContext:
    profile: DeviceProfile
    run: RunDir
    report: Report
    reporter: Reporter
    inputs: RunInputs = field(default_factory=RunInputs)
    teacher: Any = None  # edgekd.methods.models.LoadedModel
    corpus: Any = None  # edgekd.methods.data.Corpus
    compression_plan: Any = None  # edgekd.methods.planner.Candidate: the planner's choice, when a knob is auto
    prune_plan: Any = None  # edgekd.methods.prune.PrunePlan
    student: Student | None = None
    shipped: Shipped | None = None
    exports: list[Exported] = field(default_factory=list)
    bench: Any = None  # edgekd.device.results.BenchResult of the file the budgets are checked on
    time_budget: Any = None  # edgekd.pipeline.timebudget.TimeBudget, when the run has one

    # ------------------------------------------------------------ shared inputs
    def heldout_blocks(self) -> Any:
        return self.corpus.heldout[: self.profile.compression.evaluation.max_heldout_blocks]

    def calibration_blocks(self) -> Any:
        from ..methods.data import calibration_blocks

        return calibration_blocks(self.corpus.train, self.profile.compression.prune.calibration_blocks)

    def format_plan(self) -> FormatPlan:
        """The formats the run ships: the planner's choice, else the profile's."""
        chosen = self.planned()
        return chosen.formats if chosen is not None else format_plan(self.profile)

    def planned(self) -> Any:
        """The planner's chosen plan (edgekd.methods.planner.Candidate), or None when nothing was planned."""
        if self.compression_plan is None:
            self.compression_plan = read_compression_plan(self.run.root)
        return self.compression_plan

    # ------------------------------------------------------------ artifacts, loaded on resume
    def pruned_plan(self) -> Any:
        """The prune plan, or None when no prune stage is planned."""
        from ..methods.prune import PrunePlan

        if self.prune_plan is None and self.run.path(*PRUNE_PLAN).exists():
            self.prune_plan = PrunePlan.from_dict(json.loads(self.run.path(*PRUNE_PLAN).read_text()))
        return self.prune_plan

    def current_student(self) -> Student:
        """The newest student: distilled if the distill stage ran, else pruned, else a copy of the teacher."""
        if self.student is not None:
            return self.student
        plan = self.pruned_plan()
        if self.run.path(STUDENT_DIR, "config.json").exists():
            model = load_hf(self.run.path(STUDENT_DIR))
        elif plan is not None:
            model = plan.make_student(self.teacher.model)
        else:
            import copy

            model = copy.deepcopy(self.teacher.model)
        self.student = Student(model, plan.layer_map if plan else list(range(model.config.num_hidden_layers)))
        return self.student

    def exported_files(self) -> list[Exported]:
        if not self.exports:
            from .plan import planned_exports

            self.exports = [Exported(e, self.run.path(e.file_name)) for e in planned_exports(self.profile, self.format_plan())]
        return self.exports


def read_compression_plan(run_root: Path) -> Any:
    """The plan stage's chosen plan in a run directory (edgekd.methods.planner.Candidate), or None."""
    path = Path(run_root).joinpath(*COMPRESSION_PLAN)
    if not path.exists():
        return None
    from ..methods.planner import Candidate

    return Candidate.from_dict(json.loads(path.read_text())["chosen"])


def load_hf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()
