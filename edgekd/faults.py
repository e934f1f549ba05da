"""Fault points for the fault-injection suite (``pytest -m faults``); inert unless asked for.

``EDGEKD_KILL_AT=N`` sends SIGKILL to this process when it reaches its N-th fault point: the
kill no handler can catch, as a power cut or the OOM killer deliver it. The points sit where a
real kill does damage: around every atomic write (before the rename: a complete temporary file
and no final one; after it: the file in place, its stage not yet recorded), at the start of
every stage and at every training step. ``EDGEKD_FAULT_TRACE=FILE`` appends one line per point
("<n> <stage> <where>"), so the suite can choose points in every stage of a run.
``EDGEKD_DISK_FULL_AT=TEXT`` makes the atomic write of the first path containing TEXT fail as a
full disk does (ENOSPC), to reach one chosen write exactly; the suite also fills a real small
filesystem where it may mount one.
"""

from __future__ import annotations

import errno
import os
import signal

_passed = 0
_stage = "setup"


def set_stage(name: str) -> None:
    global _stage
    _stage = name


def point(where: str) -> None:
    kill_at, trace = os.environ.get("EDGEKD_KILL_AT"), os.environ.get("EDGEKD_FAULT_TRACE")
    if not kill_at and not trace:
        return
    global _passed
    _passed += 1
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_passed} {_stage} {where}\n")
    if kill_at and _passed == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


_disk_filled = False


def disk_full(path: os.PathLike) -> None:
    """Raise ENOSPC at the first write of a path containing ``EDGEKD_DISK_FULL_AT`` (then the disk stays "full")."""
    global _disk_filled
    target = os.environ.get("EDGEKD_DISK_FULL_AT")
    if target and (_disk_filled or target in str(path)):
        _disk_filled = True
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
