"""The stage that writes every file the profile names and proves each one in its runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipeline.context import Exported, RunContext
from ..report import StageRecord
from ..versions import usable_threads
from .qat import shipped

PARITY_BLOCKS = 8
TABLE = "Export parity (runtime vs torch, held-out blocks)"
TASKS_TABLE = "lm-evaluation-harness tasks (each file in its runtime, the teacher in torch)"
CHAT_TABLE = "Chat side by side (greedy, through the teacher's chat template)"
STATS_TABLE = "Shipped files against the teacher (held-out blocks, in each file's runtime; llama.cpp's KL statistics)"


def export(ctx: RunContext) -> StageRecord:
    """Write every format the profile names, then prove each file reproduces the torch model."""
    from ..exporters.checks import require
    from ..exporters.ship import write_checked
    from ..methods.memory import predict_export_peak, refuse_over_limit
    from ..pipeline.plan import planned_exports

    student = shipped(ctx)
    blocks = ctx.heldout_blocks()[:PARITY_BLOCKS]
    source = ctx.teacher.source
    source_gguf = source.path if source.kind in ("gguf", "default") else None
    gguf_planned = any(p.container == "gguf" for p in planned_exports(ctx.profile, student.plan))
    floor_bytes = source_gguf.stat().st_size if source_gguf is not None and gguf_planned else 0.0  # the noise floor's file
    predicted = max(predict_export_peak(student.model, student.plan, p.runtime, blocks.shape[1], reference_file_bytes=floor_bytes)
                    for p in planned_exports(ctx.profile, student.plan))
    refuse_over_limit(predicted, ctx.profile.compression.memory_gb, "writing and checking the exported files",
                      "export fewer formats at once (deployment.formats)")
    threads = usable_threads(ctx.profile.deployment.threads)
    artifacts, checks = {}, []
    ctx.exports = []
    for planned in planned_exports(ctx.profile, student.plan):
        check = "incl. KV-cache greedy decoding" if planned.container == "onnx" else ""
        with ctx.reporter.task(f"writing {planned.file_name} and checking it in {planned.runtime} {check}".strip()):
            path, result = write_checked(planned, student.model, ctx.teacher.tokenizer, student.plan, ctx.run.root, blocks,
                                         threads, source_gguf=source_gguf, source_name=source.name,
                                         metadata={"profile": ctx.profile.name},
                                         context_length=ctx.profile.deployment.context_length)
            if result.note:
                ctx.reporter.info(f"{planned.file_name}: {result.note}")
        checks.append(result.to_dict())
        artifacts[planned.file_name] = planned.file_name
        require(result)
        ctx.exports.append(Exported(planned, path))
    floor = _llamacpp_floor(ctx, blocks, threads) if gguf_planned else None
    stats = {e.path.name: _against_teacher(ctx, e.path, threads) for e in ctx.exports}
    chat = _chat(ctx, threads)
    tasks = _tasks(ctx, threads)
    return StageRecord("export", settings={"formats": ctx.profile.deployment.formats, "weight_format": student.plan.name,
                                           "parity_blocks": int(len(blocks))},
                       metrics={"parity": checks, "llamacpp_floor": floor, "predicted_peak_rss_mb": round(predicted / 2**20, 1),
                                "against_teacher": stats, "chat": chat, "tasks": tasks},
                       artifacts=artifacts)


def _against_teacher(ctx: RunContext, path: Path, threads: int) -> dict[str, Any]:
    """The file's token statistics against the fp32 teacher, in its own runtime (edgekd.methods.kl_stats)."""
    from ..methods.evaluate import torch_logits_fn
    from ..methods.kl_stats import compare
    from ..quality.sources import open_model

    blocks = ctx.heldout_blocks()
    scored = open_model(path, blocks.shape[1], threads)
    with ctx.reporter.task(f"{path.name} against the teacher ({scored.runtime})", total=len(blocks), unit="blocks") as advance:
        stats = compare(scored.logits, torch_logits_fn(ctx.teacher.model), blocks, progress=advance)
    return {"runtime": scored.runtime, **stats.to_dict()}


def _chat(ctx: RunContext, threads: int) -> list[dict[str, Any]]:
    """The profile's chat prompts, greedy, through the teacher and every shipped file (edgekd.quality.chat)."""
    from ..methods.chat_template import stop_ids
    from ..quality.chat import prompt_ids, runtime_greedy, side_by_side, torch_greedy

    ev = ctx.profile.compression.evaluation
    tokenizer = ctx.teacher.tokenizer
    prompts = prompt_ids(tokenizer, ev.chat_prompts, ev.chat_prompts_file) if ev.chat_new_tokens else []
    if not prompts:
        return []
    stop = stop_ids(ctx.teacher.model, tokenizer)  # the EOS, and the end of an assistant's turn where that is another token
    context = max(len(ids) for _, ids in prompts) + ev.chat_new_tokens + 1
    with ctx.reporter.task(f"chat side by side: {len(prompts)} prompts, teacher and {len(ctx.exports)} files"):
        files = {e.path.name: runtime_greedy(e.path, threads, context, stop) for e in ctx.exports}
        return side_by_side(torch_greedy(ctx.teacher.model, stop), files, prompts, ev.chat_new_tokens, tokenizer, stop)


def _tasks(ctx: RunContext, threads: int) -> dict[str, dict[str, dict[str, float | None]]]:
    """The profile's lm-eval tasks on every shipped file (in its runtime) and the teacher (torch): file -> task -> accuracies."""
    from ..quality.sources import open_model, torch_model
    from ..quality.tasks import run_side_by_side, teacher_accuracies

    ev = ctx.profile.compression.evaluation
    if not ev.tasks:
        return {}
    teacher = torch_model(ctx.teacher.source.path, ctx.teacher.model, ctx.teacher.tokenizer)
    ref = teacher_accuracies(teacher, ev.tasks, ev.task_limit, ev.task_include_path, ctx.reporter)
    block_len = ctx.heldout_blocks().shape[1]
    return {e.path.name: run_side_by_side(open_model(e.path, block_len, threads), teacher, ev.tasks, ev.task_limit,
                                          ev.task_include_path, block_len, ctx.reporter, teacher_accuracy=ref)
            for e in ctx.exports}


def _llamacpp_floor(ctx: RunContext, blocks: Any, threads: int) -> dict[str, Any] | None:
    """llama.cpp's own noise floor: the teacher's GGUF (weights equal to the fp32 teacher) against the fp32 teacher."""
    from ..device import llamacpp
    from ..exporters.checks import PARITY_BATCH
    from ..methods.evaluate import evaluate, torch_logits_fn

    source = ctx.teacher.source
    if source.kind not in ("gguf", "default"):
        return None
    m = evaluate(llamacpp.logits_fn(source.path, blocks.shape[1], threads), blocks, torch_logits_fn(ctx.teacher.model),
                 batch_size=PARITY_BATCH)
    return {"file": source.path.name, "kl": m.kl_to_teacher, "top1_agreement": m.top1_agreement, "tokens": m.tokens}


def report_export(record: StageRecord, ctx: RunContext) -> None:
    rows = [[Path(c["file"]).name, c["runtime"] + (f" ({c['note']})" if c.get("note") else ""), round(c["kl"], 6),
             round(c["top1_agreement"], 4), c["max_kl"], c["min_top1"],
             {True: "yes", False: "NO", None: "n/a"}[c["greedy_match"]] + (f" ({c['greedy_detail']})" if c.get("greedy_detail") else ""),
             "pass" if c["passed"] else "FAIL"]
            for c in record.metrics["parity"]]
    floor = record.metrics.get("llamacpp_floor")
    if floor:
        rows.append([f"{floor['file']} (teacher, reference floor)", "llama.cpp", round(floor["kl"], 6),
                     round(floor["top1_agreement"], 4), None, None, "n/a", "reference"])
    ctx.report.tables[TABLE] = {
        "headers": ["file", "runtime", "KL per token", "top-1 agreement", "KL limit", "top-1 limit", "greedy match", "verdict"],
        "rows": rows}
    stats = record.metrics.get("against_teacher") or {}
    if stats:
        ctx.report.tables[STATS_TABLE] = {
            "headers": ["file", "runtime", "tokens", "mean KL", "± s.e.", "median KL", "p90", "p99", "p99.9", "max KL",
                        "RMS Δp %", "same top-1 %", "perplexity", "teacher perplexity"],
            "rows": [[name, s["runtime"], s["tokens"], round(s["kl_mean"], 5), round(s["kl_stderr"], 5), round(s["kl_median"], 5),
                      round(s["kl_p90"], 4), round(s["kl_p99"], 4), round(s["kl_p999"], 4), round(s["kl_max"], 3),
                      round(s["delta_p_rms_pct"], 2), round(100 * s["same_top1"], 2), round(s["perplexity"], 3),
                      round(s["reference_perplexity"], 3)] for name, s in stats.items()]}
    tasks = record.metrics.get("tasks") or {}
    if tasks:
        ctx.report.tables[TASKS_TABLE] = {
            "headers": ["file", "task", "accuracy", "teacher accuracy"],
            "rows": [[name, task, r["model"], r["teacher"]] for name, per_task in tasks.items() for task, r in per_task.items()]}
    if record.metrics.get("chat"):
        from ..quality.chat import report_table

        ctx.report.tables[CHAT_TABLE] = report_table(record.metrics["chat"])


def quality_budget_checks(ctx: RunContext, budget_file_name: str) -> list[Any]:
    """The profile's quality budgets on the budget file's statistics and task accuracies against the
    teacher (not measured: failed)."""
    from ..methods.kl_stats import KlStats
    from ..quality.check import quality_checks
    from ..quality.tasks import task_checks

    record = ctx.report.stage("export")
    s = ((record.metrics.get("against_teacher") or {}) if record else {}).get(budget_file_name)
    stats = KlStats(**{k: v for k, v in s.items() if k != "runtime"}) if s else None
    b = ctx.profile.budgets
    checks = quality_checks({"max_kl_to_teacher": b.max_kl_to_teacher, "min_top1_agreement": b.min_top1_agreement}, stats,
                            f"measured in {s['runtime']} against the teacher" if s else "no exported file was scored")
    if b.min_task_accuracy or b.max_task_accuracy_drop is not None:
        tasks = ((record.metrics.get("tasks") or {}) if record else {}).get(budget_file_name, {})
        checks += task_checks(tasks, b.min_task_accuracy, b.max_task_accuracy_drop)
    return checks
