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
SAMPLES_DIR = "teacher-samples"  # the teacher's samples: shards per split, and their blocks
TEACHER_DATA = "teacher"  # --data teacher: no corpus, the teacher's samples are the training data (data-free)
PRUNE_PLAN = ("prune", "plan.json")
COMPRESSION_PLAN = ("plan", "plan.json")


@dataclass
class RunInputs:
    teacher: Any = None  # --teacher: path, or None for the embedded default
    data: Any = None  # --data
    text_field: str = "text"
    trust_remote_code: bool = False
    prompts: Any = None  # --prompts: a JSONL file of prompts for the teacher's samples

    @property
    def data_free(self) -> bool:
        return is_data_free(self.data)


def is_data_free(data: Any) -> bool:
    """``--data teacher``: the teacher generates the whole corpus."""
    return data is not None and str(data) == TEACHER_DATA


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
    sample_blocks: Any = None  # the teacher's samples packed into blocks (a pool of the training mixture)

    # ------------------------------------------------------------ shared inputs
    def heldout_blocks(self) -> Any:
        return self.corpus.heldout[: self.profile.compression.evaluation.max_heldout_blocks]

    def teacher_sample_blocks(self) -> Any:
        """The teacher's samples as a training pool, or None (none in the mixture, or --data teacher: they are the corpus)."""
        if self.inputs.data_free or not self.profile.compression.data.mixture.teacher_samples:
            return None
        if self.sample_blocks is None:
            import numpy as np

            self.sample_blocks = np.load(self.run.path(SAMPLES_DIR, "blocks.npy"))
        return self.sample_blocks

    def training_blocks(self) -> Any:
        """Every training pool, stacked in the order of :meth:`mixture`'s sizes: the corpus, then the teacher's samples."""
        import numpy as np

        samples = self.teacher_sample_blocks()
        return self.corpus.train if samples is None else np.concatenate([self.corpus.train, samples])

    def mixture(self) -> Any:
        """How a training batch is drawn (edgekd.methods.mixture.Mixture), from the profile's ``compression.data``."""
        from ..errors import EdgekdError
        from ..methods.mixture import Mixture, OnPolicy

        data = self.profile.compression.data
        m, samples = data.mixture, self.teacher_sample_blocks()
        sizes, weights = (len(self.corpus.train),), (m.corpus + (m.teacher_samples if self.inputs.data_free else 0.0),)
        if samples is not None:
            sizes, weights = (*sizes, len(samples)), (*weights, m.teacher_samples)
        policy = OnPolicy.from_settings(data.on_policy) if m.on_policy > 0 else None
        if policy is not None and min(policy.prompt_tokens, data.block_len - 1) + policy.new_tokens > data.block_len:
            raise EdgekdError(f"on-policy rows of {policy.prompt_tokens} + {policy.new_tokens} tokens are longer than a "
                              f"training block ({data.block_len}): the memory check sizes a step by its blocks",
                              fix="lower compression.data.on_policy.new_tokens or prompt_tokens")
        return Mixture(sizes, weights, m.on_policy, policy)

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
