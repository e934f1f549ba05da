"""What a benchmark returns, and the two ways it is shown: a rich table and JUnit XML."""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .budgets import BudgetCheck


@dataclass
class Stat:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class BenchResult:
    model: str
    runtime: str
    profile: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    file_mb: float
    load_s: float
    pp_tokens_per_s: Stat
    tg_tokens_per_s: Stat
    ttft_ms: Stat
    peak_rss_mb: float
    baseline_rss_mb: float
    kv_cache_mb: float | None
    context_length: int
    cpu_s_per_token: float
    energy: dict[str, Any]
    host: dict[str, Any]
    load: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    budgets: list[BudgetCheck] = field(default_factory=list)
    model_facts: dict[str, Any] | None = None  # bytes, params and attention shape read from the file (costmodel.ModelFacts)
    projection: dict[str, Any] | None = None  # PROJECTION to the profile's device (see costmodel.project_from_host)
    host_perf: dict[str, Any] | None = None  # this host's measured copy bandwidth and GEMM throughput
    quality: dict[str, Any] | None = None  # KL statistics against the reference (bench --against), in both runtimes

    @property
    def passed(self) -> bool:
        return not any(c.passed is False for c in self.budgets)

    @property
    def failures(self) -> list[str]:
        return [c.describe() for c in self.budgets if c.passed is False]

    def measured(self) -> dict[str, float | None]:
        return {
            "model_mb": self.file_mb,
            "decode_tokens_per_s": self.tg_tokens_per_s.median,
            "ttft_ms": self.ttft_ms.median,
            "peak_memory_mb": self.peak_rss_mb,
            "energy_mj_per_token": self.energy.get("energy_mj_per_token"),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["failures"] = self.failures
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("pp_tokens_per_s", "tg_tokens_per_s", "ttft_ms"):
            d[k] = Stat(**d[k])
        d["budgets"] = [BudgetCheck(**b) for b in d.get("budgets", [])]
        return cls(**d)


def print_bench(result: BenchResult, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{Path(result.model).name}  [{result.runtime}, {result.threads} threads, profile {result.profile}]")
    t.add_column("metric")
    t.add_column("median", justify="right")
    t.add_column("min .. max", justify="right")

    def row(name: str, s: Stat, fmt: str = "{:.1f}") -> None:
        t.add_row(name, fmt.format(s.median), f"{fmt.format(s.min)} .. {fmt.format(s.max)}")

    row(f"pp{result.prompt_tokens} tokens/s", result.pp_tokens_per_s)
    row(f"tg{result.gen_tokens} tokens/s", result.tg_tokens_per_s)
    row(f"TTFT ms ({result.prompt_tokens}-token prompt)", result.ttft_ms)
    t.add_row("load s", f"{result.load_s:.2f}", "")
    t.add_row("file MB", f"{result.file_mb:.1f}", "")
    t.add_row("peak RSS MB", f"{result.peak_rss_mb:.0f}", f"baseline {result.baseline_rss_mb:.0f}")
    if result.kv_cache_mb is not None:
        t.add_row(f"KV cache MB @ {result.context_length} ctx", f"{result.kv_cache_mb:.1f}",
                  "f16" if result.runtime.startswith("llama.cpp") else "fp32")  # llama.cpp caches f16; the ONNX decoders fp32
    t.add_row("CPU-s / token", f"{result.cpu_s_per_token:.4f}", "")
    q = result.quality
    if q:
        t.add_row(f"mean KL to {q['against']}", f"{q['kl_mean']:.5f}", f"± {q['kl_stderr']:.5f}; p99 {q['kl_p99']:.4f}, max {q['kl_max']:.3f}")
        t.add_row("same top-1 %", f"{100 * q['same_top1']:.2f}", f"{q['tokens']:,} tokens of {q['text']}")
    e = result.energy
    t.add_row("energy mJ / token", f"{e['energy_mj_per_token']:.1f}", e["method"])
    if e.get("tokens_per_charge"):
        t.add_row("tokens per full charge", f"{e['tokens_per_charge']:,.0f}", f"{e['battery_pct_per_1k_tokens']:.3f}% battery / 1k tokens")
    console.print(t)
    if result.projection:
        p = result.projection
        console.print(f"[bold]{p['label']}[/] for {p['device']}: decode {p['decode_tokens_per_s']:.1f} tokens/s, "
                      f"TTFT {p['ttft_ms']:.0f} ms (roofline alone: {p['roofline_decode_tokens_per_s']:.1f} tokens/s, "
                      f"{p['roofline_ttft_ms']:.0f} ms; this host reaches {100 * p['host_efficiency_decode']:.0f}% of its "
                      f"decode roofline, {result.host_perf['copy_bandwidth_gbs']:.1f} GB/s copy, "
                      f"{result.host_perf['gemm_gflops_fp32']:.0f} GFLOP/s fp32)")
    for w in result.warnings:
        console.print(f"[yellow]warning[/]: {escape(w)}")
    for c in result.budgets:
        color = {True: "green", False: "red", None: "yellow"}[c.passed]
        console.print(f"[{color}]{escape(c.describe())}[/]")


def write_junit(result: BenchResult, path: str | os.PathLike) -> None:
    """Each budget becomes one JUnit test case, so CI systems show them individually."""
    write_checks_junit(path, "edgekd bench " + Path(result.model).name, f"edgekd.bench.{result.profile}", result.budgets)


def write_checks_junit(path: str | os.PathLike, suite: str, classname: str, checks: list[Any]) -> None:
    """``checks`` (BudgetCheck) as JUnit test cases: failed ones as failures, unmeasured ones as
    skipped (``edgekd eval`` marks those failed itself: a quality budget not measured fails)."""
    from xml.sax.saxutils import quoteattr

    from ..fileio import atomic_write_text

    cases = []
    for c in checks:
        body = ""
        if c.passed is False:
            body = f"<failure message={quoteattr(c.describe())}/>"
        elif c.passed is None:
            body = f"<skipped message={quoteattr(c.describe())}/>"
        cases.append(f'  <testcase classname={quoteattr(classname)} name={quoteattr(c.budget)}>{body}</testcase>')
    failures = sum(c.passed is False for c in checks)
    skipped = sum(c.passed is None for c in checks)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuite name={quoteattr(suite)} tests="{len(checks)}" '
        f'failures="{failures}" skipped="{skipped}">\n' + "\n".join(cases) + "\n</testsuite>\n"
    )
    atomic_write_text(path, xml)
