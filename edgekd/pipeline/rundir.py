"""The run directory ``export/<run-name>/``: ownership marker, stage state, resume rules.

Rules (so nothing the user had is lost):
- a missing or empty directory becomes a new run;
- a directory edgekd did not create (no marker) is never written to or deleted;
- a finished or unfinished run is refused unless ``--overwrite`` (start again) or
  ``--resume`` (continue; completed stages are reused when the run's settings match).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import EdgekdError
from ..fileio import atomic_write_json
from ..report import REPORT_JSON, StageRecord
from ..versions import edgekd_version

MARKER = ".edgekd-run"
STATE = "state.json"
RUN_CONFIG = "run-config.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ------------------------------------------------------------ opening
    def status(self) -> str:
        """'absent' | 'empty' | 'foreign' | 'complete' | 'incomplete'."""
        if not self.root.exists():
            return "absent"
        if not self.root.is_dir():
            return "foreign"
        if not any(self.root.iterdir()):
            return "empty"
        if not self.path(MARKER).exists():
            return "foreign"
        report = self.path(REPORT_JSON)
        if report.exists():
            try:
                if json.loads(report.read_text()).get("status") == "complete":
                    return "complete"
            except (OSError, json.JSONDecodeError):
                pass
        return "incomplete"

    def open(self, run_config: dict[str, Any], overwrite: bool = False, resume: bool = False) -> bool:
        """Prepare the directory; return True when resuming an existing run."""
        if overwrite and resume:
            raise EdgekdError("--overwrite and --resume contradict each other", fix="pass one of them")
        state = self.status()
        if state == "foreign":
            raise EdgekdError(
                f"{self.root} exists and was not created by edgekd; refusing to write into it",
                fix="choose another --output or --run-name (edgekd never deletes files it did not write)",
            )
        if state in ("complete", "incomplete") and not (overwrite or resume):
            what = "a finished run" if state == "complete" else "an unfinished run"
            raise EdgekdError(
                f"{self.root} already holds {what}",
                fix="pass --resume to continue it (finished stages are reused), --overwrite to start again, "
                "or --run-name NAME for a new run",
            )
        if state in ("complete", "incomplete") and overwrite:
            shutil.rmtree(self.root)
            state = "absent"
        if state in ("complete", "incomplete"):  # resume
            self._check_same_config(run_config)
            return True
        if resume and state in ("absent", "empty"):
            raise EdgekdError(f"nothing to resume: {self.root} holds no run", fix="drop --resume to start a new run")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path(MARKER), {"created_at": now_iso(), "edgekd_version": edgekd_version()})
        atomic_write_json(self.path(RUN_CONFIG), run_config)
        atomic_write_json(self.path(STATE), {"stages": {}})
        return False

    def _check_same_config(self, run_config: dict[str, Any]) -> None:
        try:
            saved = json.loads(self.path(RUN_CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            raise EdgekdError(f"{self.root} has no readable {RUN_CONFIG}; it cannot be resumed", fix="pass --overwrite to start again") from None
        diffs = _diff(saved, json.loads(json.dumps(run_config, default=str)))
        if diffs:
            raise EdgekdError(
                f"cannot resume {self.root}: the run's settings changed",
                details=diffs[:10],
                fix="resume with the original settings, or pass --overwrite / --run-name NAME to start a new run",
            )

    def discard(self) -> None:
        """Delete a run this process created (only ever called on a directory with our marker)."""
        if self.path(MARKER).exists():
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ stage state
    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.path(STATE).read_text())
        except (OSError, json.JSONDecodeError):
            return {"stages": {}}

    def completed(self, name: str) -> StageRecord | None:
        rec = self._state()["stages"].get(name)
        if rec is None:
            return None
        record = StageRecord(**rec)
        if all(self.path(p).exists() for p in record.artifacts.values()):
            return record
        return None

    def record(self, record: StageRecord) -> None:
        state = self._state()
        state["stages"][record.name] = asdict(record)
        atomic_write_json(self.path(STATE), state)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: was {a!r}, now {b!r}"]
