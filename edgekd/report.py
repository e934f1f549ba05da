"""Run reports: ``report.json`` (versioned, machine-readable) and ``report.md`` (the human card).

Torch-free: ``edgekd report RUN_DIR`` and the device-side ``bench`` use it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .device.budgets import BudgetCheck
from .errors import EdgekdError
from .fileio import atomic_write_json, atomic_write_text

SCHEMA = "edgekd.report/2"
# Older schemas this version reads. /1 differs only inside the embedded profile (before
# compression.data.block_len and compression.distill.logit_cache took over from
# compression.distill.seq_len and logit_cache_top_k / logit_cache_kind).
READABLE_SCHEMAS = ("edgekd.report/1", SCHEMA)
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class StageRecord:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # label -> path relative to the run dir
    wall_time_s: float = 0.0
    status: str = "done"
    peak_rss_mb: float | None = None  # the process's peak resident memory during the stage (edgekd.pipeline.peak_memory)


@dataclass
class Report:
    run_name: str
    run_dir: str
    profile: dict[str, Any]
    status: str = "running"  # running | complete
    schema: str = SCHEMA
    edgekd_version: str = ""
    created_at: str = ""
    finished_at: str | None = None
    teacher: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    stages: list[StageRecord] = field(default_factory=list)
    # model label -> held-out metrics (perplexity, kl_to_teacher, top1_agreement, ...)
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    budgets: list[BudgetCheck] = field(default_factory=list)
    # title -> {"headers": [...], "rows": [[...], ...]}: extra tables for report.md
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ verdict
    @property
    def passed(self) -> bool:
        """True when no checked budget failed. Unmeasured budgets are listed by :meth:`unchecked`."""
        return not any(c.passed is False for c in self.budgets)

    def failures(self) -> list[str]:
        return [c.describe() for c in self.budgets if c.passed is False]

    def unchecked(self) -> list[str]:
        return [c.describe() for c in self.budgets if c.passed is None]

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    def add_model_row(self, label: str, summary: dict[str, Any], metrics: dict[str, Any]) -> None:
        """One row of the held-out quality table: a model's size facts and its metrics against the teacher."""
        self.evaluation[label] = {
            "params": summary.get("params"), "layers": summary.get("layers"), "perplexity": metrics["perplexity"],
            "kl_to_teacher": metrics.get("kl_to_teacher"), "top1_agreement": metrics.get("top1_agreement"),
            "tokens": metrics["tokens"]}

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        d = dict(d)
        d.pop("passed", None)
        schema = d.get("schema", "")
        if not str(schema).startswith("edgekd.report/"):
            raise EdgekdError("not an edgekd report (no 'schema' field)", fix="pass a run directory written by edgekd compress")
        if schema not in READABLE_SCHEMAS:
            raise EdgekdError(
                f"report schema {schema!r} is not supported by this edgekd (reads {', '.join(READABLE_SCHEMAS)})",
                fix="re-render it with the edgekd version that wrote it",
            )
        d["stages"] = [StageRecord(**s) for s in d.get("stages", [])]
        d["budgets"] = [BudgetCheck(**b) for b in d.get("budgets", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, run_dir: str | Path) -> Report:
        path = Path(run_dir)
        if path.is_dir():
            path = path / REPORT_JSON
        if not path.is_file():
            raise EdgekdError(f"no {REPORT_JSON} in {path.parent}", fix="pass the directory of a run (export/<run-name>)")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise EdgekdError(f"{path} is not a readable edgekd report: {exc}", fix="re-run the compression") from None

    def save(self, run_dir: str | Path | None = None) -> None:
        run_dir = Path(run_dir or self.run_dir)
        atomic_write_json(run_dir / REPORT_JSON, self.to_dict())
        atomic_write_text(run_dir / REPORT_MD, render_markdown(self, run_dir))


# ---------------------------------------------------------------- markdown


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(report: Report, run_dir: Path | None = None) -> str:
    run_dir = Path(run_dir or report.run_dir)
    prof = report.profile
    lines = [f"# edgekd run `{report.run_name}`", ""]
    verdict = "all checked budgets pass" if report.passed else "BUDGETS FAILED"
    lines += [
        f"- status: **{report.status}**; {verdict}",
        f"- profile: `{prof.get('name')}`: {prof.get('description', '')}",
        f"- teacher: {report.teacher.get('name', '?')} ({report.teacher.get('kind', '?')}: `{report.teacher.get('path', '')}`)",
        f"- corpus: {report.corpus.get('name', '?')}",
        f"- edgekd {report.edgekd_version}, created {report.created_at}, finished {report.finished_at or 'n/a'}",
        "",
    ]
    if report.evaluation:
        lines += ["## Held-out quality against the teacher", ""]
        headers = ["model", "params", "layers", "perplexity", "KL to teacher (nats/token)", "top-1 agreement", "tokens"]
        rows = [
            [name, m.get("params"), m.get("layers"), m.get("perplexity"), m.get("kl_to_teacher"), m.get("top1_agreement"), m.get("tokens")]
            for name, m in report.evaluation.items()
        ]
        lines += _table(headers, rows) + [""]
    if report.budgets:
        lines += ["## Budgets", ""]
        rows = [
            [c.budget, c.limit, c.unit, c.measured, {True: "pass", False: "FAIL", None: "not measured"}[c.passed], c.source]
            for c in report.budgets
        ]
        lines += _table(["budget", "limit", "unit", "measured", "verdict", "source"], rows) + [""]
    if report.stages:
        total = sum(s.wall_time_s for s in report.stages) or 1.0
        lines += ["## Stages", ""]
        rows = [[s.name, s.status, round(s.wall_time_s, 1), f"{100 * s.wall_time_s / total:.0f}%", s.peak_rss_mb,
                 s.metrics.get("predicted_peak_rss_mb")] for s in report.stages]
        lines += _table(["stage", "status", "wall time (s)", "share", "peak resident memory (MiB, measured)",
                         "predicted peak (MiB, PROJECTION)"], rows) + [""]
        for s in report.stages:
            if s.metrics or s.settings:
                lines += [f"### {s.name}", ""]
                if s.settings:
                    lines.append("settings: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in s.settings.items()))
                    lines.append("")
                scalar = {k: v for k, v in s.metrics.items() if not isinstance(v, (dict, list))}
                if scalar:
                    lines += _table(["metric", "value"], [[k, v] for k, v in scalar.items()]) + [""]
            for label, rel in s.artifacts.items():
                if rel.endswith(".png") and (run_dir / rel).exists():
                    lines += [f"![{label}]({rel})", ""]
    for title, table in report.tables.items():
        lines += [f"## {title}", ""] + _table(table["headers"], table["rows"]) + [""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    lines += ["## Environment", ""]
    lines.append("host: " + ", ".join(f"{k}={v}" for k, v in report.host.items()))
    lines.append("")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items() if v))
    lines.append("")
    return "\n".join(lines)
