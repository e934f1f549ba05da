"""The run directory ``export/<run-name>/``: ownership marker, stage state, resume rules.

Rules (so nothing the user had is lost):
- a missing or empty directory becomes a new run;
- a directory edgekd did not create (no marker) is never written to or deleted;
- a finished or unfinished run is refused unless ``--overwrite`` (start again) or
  ``--resume`` (continue; completed stages are reused when the run's settings match and their
  artifacts still have the size and checksum they were recorded with);
- one process at a time: a lock held for the run's lifetime (``edgekd.pipeline.integrity``);
- a refused new run leaves nothing behind, not even the output folders it made.
"""

from __future__ import annotations

import contextlib
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
from .integrity import LOCK, RunLock, artifact_problem, fingerprint

MARKER = ".edgekd-run"
STATE = "state.json"
RUN_CONFIG = "run-config.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = RunLock(self.root)
        self.stale: dict[str, str] = {}  # stage -> why its artifacts cannot be reused
        self._made: list[Path] = []  # folders this process created, removed again by discard()

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ------------------------------------------------------------ opening
    def status(self) -> str:
        """'absent' | 'empty' | 'foreign' | 'complete' | 'incomplete'."""
        if not self.root.exists():
            return "absent"
        if not self.root.is_dir():
            return "foreign"
        names = [p.name for p in self.root.iterdir()]
        # only our lock and temporary files: a run killed before its marker was in place
        if not [n for n in names if n != LOCK and not (LOCK in names and n.startswith(".tmp-"))]:
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
        killed_at_start = state == "empty" and self.path(LOCK).exists()  # a run killed before it wrote anything
        if resume and state in ("absent", "empty") and not killed_at_start:
            raise EdgekdError(f"nothing to resume: {self.root} holds no run", fix="drop --resume to start a new run")
        if state == "absent":
            self._made = [p for p in [self.root, *self.root.parents] if not p.exists()]
            self.root.mkdir(parents=True)
        self.lock.acquire()  # before anything in the directory changes
        try:
            return self._prepare(state, run_config, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _prepare(self, state: str, run_config: dict[str, Any], overwrite: bool) -> bool:
        if state in ("complete", "incomplete") and overwrite:
            for p in self.root.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif state in ("complete", "incomplete") and not self.path(RUN_CONFIG).exists() and not self.path(STATE).exists():
            pass  # killed between its marker and its settings: nothing ran, so it starts afresh
        elif state in ("complete", "incomplete"):  # resume
            self._check_same_config(run_config)
            self._state()  # a corrupt state file is an error now, not a silent restart later
            return True
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
        """Delete a run this process created (only ever called on a directory with our marker),
        and the output folders made for it when they are empty again."""
        if self.path(MARKER).exists():
            shutil.rmtree(self.root, ignore_errors=True)
        self.lock.release()
        for folder in self._made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def close(self) -> None:
        self.lock.release()

    # ------------------------------------------------------------ stage state
    def _state(self) -> dict[str, Any]:
        path = self.path(STATE)
        if not path.exists():
            return {"stages": {}}
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
                raise ValueError("no 'stages' table")
            for rec in state["stages"].values():
                StageRecord(**rec)
        except (OSError, ValueError, TypeError) as exc:
            raise EdgekdError(f"{path} is corrupt ({exc}), so which stages finished is unknown",
                              fix="restore the file, or pass --overwrite to start the run again; edgekd does not guess "
                              "which artifacts to trust") from None
        return state

    def completed(self, name: str) -> StageRecord | None:
        """The stage's record when it finished and every artifact it names is as it was recorded
        (size and SHA-256); otherwise None, with the reason in ``self.stale[name]``."""
        state = self._state()
        rec = state["stages"].get(name)
        record = None if rec is None else StageRecord(**rec)
        prints = state.get("fingerprints", {}).get(name, {})
        if record is not None:
            problems = [p for rel in record.artifacts.values() if (p := artifact_problem(self.root, rel, prints.get(rel)))]
            if problems:
                self.stale[name] = "; ".join(problems)
                record = None
        return record

    def finished(self, name: str) -> StageRecord | None:
        """The stage's record as written when it finished, its artifacts unchecked (for the time it took)."""
        rec = self._state()["stages"].get(name)
        return None if rec is None else StageRecord(**rec)

    def record(self, record: StageRecord) -> None:
        state = self._state()
        state["stages"][record.name] = asdict(record)
        state.setdefault("fingerprints", {})[record.name] = {
            rel: fingerprint(self.path(rel)) for rel in record.artifacts.values() if self.path(rel).exists()}
        atomic_write_json(self.path(STATE), state)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: was {a!r}, now {b!r}"]
