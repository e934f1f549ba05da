"""``edgekd eval``: a model's token statistics against a reference on held-out text, and its quality budgets.

A quality budget (``budgets.max_kl_to_teacher``, ``budgets.min_top1_agreement`` in the profile,
or ``--max-kl`` / ``--min-top1``) is checked on the mean KL and the same-top-1 rate of the file
against the teacher. One that could not be measured fails: "not measured" is never a pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..device.budgets import BudgetCheck
from ..errors import EdgekdError
from ..methods.kl_stats import KlStats, compare
from .sources import Scored, check_model, open_model, torch_model, torch_reference

QUALITY_BUDGETS = {"max_kl_to_teacher": ("kl_mean", "nats/token", "max"), "min_top1_agreement": ("same_top1", "fraction", "min")}
DEFAULT_BLOCKS = 24


@dataclass
class Comparison:
    model: str
    runtime: str
    against: str  # what the reference is: "teacher" or "QAT master (torch)"
    stats: KlStats

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "runtime": self.runtime, "against": self.against, **self.stats.to_dict()}


@dataclass
class EvalResult:
    model: str
    against: str
    text: str  # where the held-out blocks came from
    blocks: int
    comparisons: list[Comparison] = field(default_factory=list)
    checks: list[BudgetCheck] = field(default_factory=list)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {"model": acc, "teacher": acc}

    @property
    def passed(self) -> bool:
        return all(c.passed is True for c in self.checks)  # not measured is never a pass

    @property
    def failures(self) -> list[str]:
        return [c.describe() for c in self.checks if c.passed is not True]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "against": self.against, "text": self.text, "blocks": self.blocks, "passed": self.passed,
                "comparisons": [c.to_dict() for c in self.comparisons], "tasks": self.tasks,
                "budgets": [c.to_dict() for c in self.checks]}


def quality_checks(limits: dict[str, float | None], stats: KlStats | None, source: str) -> list[BudgetCheck]:
    """Each set quality budget against ``stats`` (None: not measured, which fails)."""
    checks = []
    for name, (key, unit, direction) in QUALITY_BUDGETS.items():
        limit = limits.get(name)
        if limit is None:
            continue
        value = None if stats is None else float(getattr(stats, key))
        if value is None:
            checks.append(BudgetCheck(name, limit, unit, None, False, f"not measured ({source})"))
            continue
        checks.append(BudgetCheck(name, limit, unit, value, value <= limit if direction == "max" else value >= limit, source))
    return checks


def evaluate(model: Any, against: Any = None, data: Any = None, *, blocks: int = DEFAULT_BLOCKS, profile: Any = None,
             max_kl: float | None = None, min_top1: float | None = None, threads: int | None = None,
             reporter: Any = None, tasks: list[str] | None = None, limit: int | None = None, include_path: Any = None,
             min_accuracy: dict[str, float] | None = None, max_accuracy_drop: float | None = None) -> EvalResult:
    """Score ``model`` against ``against`` (default: the run's teacher for a run directory, else the
    embedded default teacher) on ``blocks`` held-out blocks of ``data`` (default: the run's split,
    else the default corpus's). Budgets: ``max_kl`` / ``min_top1``, else ``profile``'s.

    ``tasks``: lm-evaluation-harness tasks (``limit`` items each; ``include_path``: task YAMLs of
    one's own) run on the model in its runtime and on the teacher in torch, side by side;
    ``min_accuracy`` (task -> floor) and ``max_accuracy_drop`` (below the teacher's) gate them."""
    from ..profiles import load_profile
    from ..progress import Reporter
    from ..versions import usable_threads

    reporter = reporter or Reporter(quiet=True)
    budgets = (load_profile(profile) if isinstance(profile, (str, Path)) else profile).budgets if profile is not None else None
    limits = {"max_kl_to_teacher": max_kl if max_kl is not None else getattr(budgets, "max_kl_to_teacher", None),
              "min_top1_agreement": min_top1 if min_top1 is not None else getattr(budgets, "min_top1_agreement", None)}
    threads = usable_threads(threads or 1 << 10)  # default: every core this process may use
    path = Path(model).expanduser()
    if (path / ".edgekd-run").exists():
        return _evaluate_run(path, against, data, blocks, limits, threads, reporter)
    check_model(path)  # a bad file fails before the reference loads
    reference = torch_reference(against)
    text, heldout = _heldout(data, reference.tokenizer, blocks)
    scored = open_model(path, heldout.shape[1], threads)
    result = EvalResult(str(path), str(reference.path), text, len(heldout))
    stats = _compare(scored, reference, heldout, "teacher", reporter)
    result.comparisons.append(Comparison(path.name, scored.runtime, "teacher", stats))
    result.checks = quality_checks(limits, stats, f"measured in {scored.runtime} against {reference.path.name}")
    if tasks:
        from .tasks import run_side_by_side, task_checks

        result.tasks = run_side_by_side(scored, reference, tasks, limit, include_path, heldout.shape[1], reporter)
        result.checks += task_checks(result.tasks, min_accuracy or {}, max_accuracy_drop)
    return result


def compare_in_runtimes(model: Any, against: Any, data: Any = None, *, blocks: int = DEFAULT_BLOCKS, threads: int = 1,
                        reporter: Any = None) -> tuple[Comparison, str]:
    """``model`` against ``against``, each scored in the runtime that ships it (a GGUF in llama.cpp,
    ONNX in onnxruntime; a Hugging Face directory in torch): what ``edgekd bench --against`` checks on
    a device without torch. The held-out text is ``data`` (as ``--data`` of compress; a ``.npy`` of
    token blocks, such as a run's ``corpus/heldout.npy``, is used as it is), tokenized by the
    reference's tokenizer, else a GGUF's own (llama.cpp's). Returns the comparison and where the text came from."""
    from ..progress import Reporter

    reporter = reporter or Reporter(quiet=True)
    ref_path, path = Path(against).expanduser(), Path(model).expanduser()
    if not ref_path.exists():
        raise EdgekdError(f"reference model not found: {ref_path}", fix="pass the teacher's file (its F16 or Q8_0 GGUF) with --against")
    check_model(path)
    check_model(ref_path)
    tokens_given = data is not None and str(data).endswith(".npy")
    heldout = _token_blocks(Path(data), blocks) if tokens_given else None
    block_len = heldout.shape[1] if tokens_given else _shipped_block_len()
    reference = open_model(ref_path, block_len, threads)
    scored = open_model(path, block_len, threads)
    if tokens_given:
        text = f"the token blocks of {data}"
    else:
        text, heldout = _heldout(data, reference.tokenizer or _gguf_tokenizer(ref_path, path), blocks)
    stats = _compare(scored, reference, heldout, ref_path.name, reporter)
    return Comparison(path.name, scored.runtime, ref_path.name, stats), text


def _token_blocks(path: Path, blocks: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EdgekdError(f"cannot read token blocks from {path}: {exc}", fix="pass a (blocks, length) .npy of token ids, such as a run's corpus/heldout.npy") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or len(arr) == 0:
        raise EdgekdError(f"{path} holds a {arr.dtype} array of shape {arr.shape}, not (blocks, length) token ids",
                          fix="pass a run's corpus/heldout.npy, or held-out text")
    return arr[:blocks].astype(np.int64)


def _gguf_tokenizer(*paths: Path) -> Any:
    from ..device.llamacpp import Tokenizer

    gguf = next((p for p in paths if p.suffix == ".gguf"), None)
    if gguf is None:
        raise EdgekdError("neither model carries a tokenizer edgekd can use without transformers",
                          fix="pass --data as a .npy of token blocks (a run's corpus/heldout.npy), or a GGUF as one of the two")
    return Tokenizer(gguf)


def _evaluate_run(run: Path, against: Any, data: Any, blocks: int, limits: dict, threads: int, reporter: Any) -> EvalResult:
    """Every exported file of a run against its teacher and against its QAT master; the master against the teacher."""
    from ..stages.qat import load_shipped_model

    config = json.loads((run / "run-config.json").read_text())
    teacher_spec = against if against is not None else (None if config["teacher"]["kind"] == "default" else config["teacher"]["path"])
    reference = torch_reference(teacher_spec)
    if data is None:
        heldout, text = np.load(run / "corpus" / "heldout.npy")[:blocks], f"the run's held-out split ({run / 'corpus'})"
    else:
        text, heldout = _heldout(data, reference.tokenizer, blocks)
    files = sorted([*run.glob("model-*.gguf"), *run.glob("model-*.onnx"), *(p for p in run.glob("model-*-genai") if p.is_dir())])
    if not files:
        raise EdgekdError(f"{run} holds no exported model (model-*.gguf, model-*.onnx)", fix="finish the run: edgekd compress --resume")
    result = EvalResult(str(run), str(reference.path), text, len(heldout))
    master = None
    if (run / "student-qat" / "config.json").exists():
        master = torch_model(run / "student-qat", load_shipped_model(run / "student-qat"))
        result.comparisons.append(Comparison("student-qat (QAT master)", "torch", "teacher",
                                             _compare(master, reference, heldout, "teacher", reporter)))
    for f in files:
        scored = open_model(f, heldout.shape[1], threads)
        stats = _compare(scored, reference, heldout, "teacher", reporter)
        result.comparisons.append(Comparison(f.name, scored.runtime, "teacher", stats))
        result.checks += [replace_budget(c, f.name) for c in quality_checks(limits, stats, f"measured in {scored.runtime}")]
        if master is not None:  # what the export itself loses
            result.comparisons.append(Comparison(f.name, scored.runtime, "QAT master (torch)",
                                                 _compare(scored, master, heldout, "QAT master", reporter)))
    return result


def replace_budget(check: BudgetCheck, file_name: str) -> BudgetCheck:
    check.budget = f"{check.budget} [{file_name}]"
    return check


def _compare(scored: Scored, reference: Scored, heldout: np.ndarray, label: str, reporter: Any) -> KlStats:
    def checked(block: np.ndarray) -> np.ndarray:  # the vocabularies must match, checked on the logits scored anyway
        logits = np.asarray(scored.logits(block))
        if reference.vocab_size is not None and logits.shape[-1] != reference.vocab_size:
            raise EdgekdError(f"{scored.path.name} has a {logits.shape[-1]}-token vocabulary, the reference {reference.vocab_size}",
                              fix="compare a model with the teacher it was compressed from (--against)")
        return logits

    with reporter.task(f"{scored.path.name} ({scored.runtime}) against the {label}", total=len(heldout), unit="blocks") as advance:
        return compare(checked, reference.logits, heldout, progress=advance)


def _shipped_block_len() -> int:
    from ..profiles import load_profile

    return load_profile("raspberry-pi-5").compression.data.block_len  # the shipped profiles share it


def _heldout(data: Any, tokenizer: Any, blocks: int) -> tuple[str, np.ndarray]:
    from ..methods.data import load_corpus
    from ..profiles import load_profile

    fraction = load_profile("raspberry-pi-5").compression.evaluation.heldout_fraction  # the shipped profiles share it
    corpus = load_corpus(data, tokenizer, _shipped_block_len(), fraction)
    return f"the held-out split of {corpus.name}", corpus.heldout[:blocks]
