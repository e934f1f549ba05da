"""What keeps a run directory honest: one writer at a time, and artifacts checked before a resume reuses them.

- **The lock** (``.edgekd-lock``): an exclusive ``flock`` held for the run's lifetime, so a second
  ``compress`` or ``--resume`` on the same directory is refused with the holder's pid and start
  time instead of writing the same files. The kernel drops the lock when the holder dies, even by
  SIGKILL, so a crashed run never leaves a stale lock behind.
- **Fingerprints**: each artifact a finished stage names is recorded with its size and SHA-256
  (a directory: of every file in it, by relative path). A resume recomputes them before reusing
  the stage; a truncated checkpoint, a cache file cut short or a GGUF the user overwrote makes the
  stage run again, with the file named.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import EdgekdError

LOCK = ".edgekd-lock"


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or the process's end."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise EdgekdError(
                f"{self.path.parent} is in use by another edgekd run ({holder})",
                fix="wait for that run to finish (or stop it), or give this run another --run-name / --output",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid', '?')}, started {info.get('started_at', '?')}"


def fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, or of every file in a directory (relative paths, sorted)."""
    if path.is_dir():
        digest, size = hashlib.sha256(), 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            digest.update(rel.encode() + b"\0" + _file_sha256(f).encode() + b"\0")
            size += f.stat().st_size
        return {"kind": "dir", "bytes": size, "sha256": digest.hexdigest()}
    return {"kind": "file", "bytes": path.stat().st_size, "sha256": _file_sha256(path)}


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def artifact_problem(root: Path, rel: str, recorded: dict[str, Any] | None) -> str | None:
    """Why the artifact ``rel`` of a finished stage cannot be reused, or None when it can."""
    path = root / rel
    if not path.exists():
        return f"{rel} is missing"
    if recorded is None:  # recorded by an edgekd that kept no fingerprints: existence is all there is to check
        return None
    try:
        now = fingerprint(path)
    except OSError as exc:
        return f"{rel} cannot be read ({exc.strerror})"
    if now["bytes"] != recorded["bytes"]:
        return f"{rel} changed since its stage finished ({recorded['bytes']:,} bytes then, {now['bytes']:,} now)"
    if now["sha256"] != recorded["sha256"]:
        return f"{rel} changed since its stage finished (same size, different SHA-256)"
    return None
