"""lm-evaluation-harness tasks on a model and its teacher side by side, and the accuracy floors that gate them."""

from __future__ import annotations

from typing import Any

from ..device.budgets import BudgetCheck

ACCURACY = ("acc", "acc_norm", "exact_match")  # the first a task reports is its accuracy


def run_side_by_side(scored: Any, reference: Any, tasks: list[str], limit: int | None, include_path: Any, max_length: int,
                     reporter: Any, teacher_accuracy: dict[str, float | None] | None = None) -> dict[str, dict[str, float]]:
    """Each task's accuracy for the model (in its runtime) and for the teacher (lm-eval's HF model in
    torch; ``teacher_accuracy``: already measured)."""
    from .harness import hf_lm, run_tasks, runtime_lm

    model_lm = hf_lm(scored.model, reference.tokenizer) if scored.model is not None else \
        runtime_lm(scored.logits, reference.tokenizer, max_length)
    with reporter.task(f"lm-eval {','.join(tasks)} on {scored.path.name} ({scored.runtime})"):
        got = run_tasks(model_lm, tasks, limit, include_path)
    ref = teacher_accuracy if teacher_accuracy is not None else \
        teacher_accuracies(reference, tasks, limit, include_path, reporter)
    return {task: {"model": accuracy(got[task]), "teacher": ref.get(task)} for task in got}


def teacher_accuracies(reference: Any, tasks: list[str], limit: int | None, include_path: Any, reporter: Any) -> dict[str, float | None]:
    from .harness import hf_lm, run_tasks

    with reporter.task(f"lm-eval {','.join(tasks)} on the teacher (torch)"):
        ref = run_tasks(hf_lm(reference.model, reference.tokenizer), tasks, limit, include_path)
    return {task: accuracy(metrics) for task, metrics in ref.items()}


def accuracy(metrics: dict[str, float]) -> float | None:
    return next((metrics[k] for k in ACCURACY if k in metrics), None)


def task_checks(results: dict[str, dict[str, float]], floors: dict[str, float], max_drop: float | None) -> list[BudgetCheck]:
    """Absolute floors per task and a largest drop below the teacher, each a check (not measured: failed)."""
    checks = []
    for task, floor in floors.items():
        acc = results.get(task, {}).get("model")
        checks.append(BudgetCheck(f"min_accuracy[{task}]", floor, "accuracy", acc, acc is not None and acc >= floor,
                                  "lm-eval" if acc is not None else "not measured (task not run)"))
    if max_drop is not None:
        for task, r in results.items():
            if r.get("model") is None or r.get("teacher") is None:
                checks.append(BudgetCheck(f"max_accuracy_drop[{task}]", max_drop, "accuracy", None, False, "not measured"))
                continue
            drop = r["teacher"] - r["model"]
            checks.append(BudgetCheck(f"max_accuracy_drop[{task}]", max_drop, "accuracy", drop, drop <= max_drop,
                                      f"lm-eval: teacher {r['teacher']:.4f}, model {r['model']:.4f}"))
    return checks
