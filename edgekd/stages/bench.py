"""The stage that benchmarks every exported file; the runtime's own file is checked against the budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipeline.context import RunContext
from ..report import StageRecord
from ..versions import usable_threads
from .qat import shipped_heldout

TABLE = "On-device benchmark (measured on this host)"


def bench(ctx: RunContext) -> StageRecord:
    from ..device.bench import bench
    from ..pipeline.plan import budget_file
    from ..plots import tradeoff_plot

    exported = ctx.exported_files()
    main_file = budget_file(ctx.profile, ctx.format_plan()).file_name
    names = list(dict.fromkeys([main_file] + [e.export.file_name for e in exported]))
    threads = usable_threads(ctx.profile.deployment.threads)
    results = {}
    for name in names:
        with ctx.reporter.task(f"benchmarking {name} ({threads} threads)"):
            results[name] = bench(ctx.run.path(name), ctx.profile, threads=threads, quality_budgets=False)  # scored in export
    ctx.bench = results[main_file]
    heldout = shipped_heldout(ctx)  # the shipped weights' KL, shared by every exported file
    kl = heldout.kl_to_teacher if heldout is not None else None
    points = [{"label": name, "file_mb": r.file_mb, "host_tps": r.tg_tokens_per_s.median,
               "projected_tps": r.projection["decode_tokens_per_s"] if r.projection else None, "kl": kl}
              for name, r in results.items()]
    b = ctx.profile.budgets
    tradeoff_plot(ctx.run.path("bench", "tradeoff.png"), points, b.max_model_mb, b.min_decode_tokens_per_s, ctx.profile.name)
    return StageRecord("bench", settings={"files": names, "budgets_checked_on": main_file, "threads": threads,
                                          "prompt_tokens": ctx.bench.prompt_tokens, "gen_tokens": ctx.bench.gen_tokens},
                       metrics={"bench": ctx.bench.to_dict(), "all": {n: r.to_dict() for n, r in results.items()}},
                       artifacts={"size vs speed vs KL": "bench/tradeoff.png"})


def budget_checks(ctx: RunContext) -> list[Any]:
    """The run's budget checks: those of the benchmark of the runtime's own file, checked once by
    edgekd.device.bench (from this process or from the stage's record on resume)."""
    from ..device.budgets import check_budgets
    from ..device.results import BenchResult
    from ..pipeline.plan import budget_file
    from .export import quality_budget_checks

    record = ctx.report.stage("bench")
    if ctx.bench is None and record is not None:
        ctx.bench = BenchResult.from_dict(record.metrics["bench"])
    quality = quality_budget_checks(ctx, budget_file(ctx.profile, ctx.format_plan()).file_name)
    if ctx.bench is not None:
        return list(ctx.bench.budgets) + quality
    return check_budgets(ctx.profile.budgets, {}, missing_reason="no exported model was benchmarked in this run") + quality


def report_bench(record: StageRecord, ctx: RunContext) -> None:
    results = record.metrics.get("all") or {Path(record.metrics["bench"]["model"]).name: record.metrics["bench"]}
    rows, proj_rows = [], []
    for name, b in results.items():
        rows.append([name, b["runtime"], b["threads"], round(b["pp_tokens_per_s"]["median"], 1),
                     round(b["tg_tokens_per_s"]["median"], 1), round(b["ttft_ms"]["median"], 1), round(b["peak_rss_mb"]),
                     round(b["file_mb"], 1), round(b["energy"]["energy_mj_per_token"], 1)])
        p = b.get("projection")
        if p:
            proj_rows.append([name, round(p["decode_tokens_per_s"], 1), round(p["ttft_ms"]), round(p["roofline_decode_tokens_per_s"], 1),
                              round(p["roofline_ttft_ms"]), f"{100 * p['host_efficiency_decode']:.0f}%", p["device_decode_bound"]])
    ctx.report.tables[TABLE] = {
        "headers": ["file", "runtime", "threads", "pp tokens/s", "tg tokens/s", "TTFT ms", "peak RSS MB", "file MB", "energy mJ/token"],
        "rows": rows}
    if proj_rows:
        ctx.report.tables[f"PROJECTION to {ctx.profile.name} (host-calibrated roofline; not measured on the device)"] = {
            "headers": ["file", "decode tokens/s", "TTFT ms", "roofline alone tokens/s", "roofline alone TTFT ms",
                        "host efficiency (decode)", "device decode bound"], "rows": proj_rows}
