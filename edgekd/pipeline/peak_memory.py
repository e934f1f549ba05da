"""The peak resident memory of one stage of a run, measured.

On Linux the kernel keeps the process's resident high-water mark (``VmHWM`` in
``/proc/self/status``) and resets it to the current resident size when ``5`` is written to
``/proc/self/clear_refs`` (proc(5)): reset before a stage, read after it, and the number is the
stage's exact peak. Elsewhere a sampling thread reads the resident size every 20 ms (a peak
shorter than that can be missed, so the value is labelled ``sampled``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakMemory:
    peak_mb: float | None = None
    method: str = ""  # "VmHWM" (exact) or "sampled"


def _vm(field: str) -> float | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """``with peak_memory() as pm: ...``; afterwards ``pm.peak_mb`` is the block's peak resident MiB."""
    pm = PeakMemory()
    if _reset_high_water_mark() and _vm("VmHWM") is not None:
        try:
            yield pm
        finally:
            pm.peak_mb, pm.method = _vm("VmHWM"), "VmHWM"
        return
    stop = threading.Event()
    peak = [current_rss_mb()]

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], current_rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield pm
    finally:
        stop.set()
        thread.join()
        pm.peak_mb, pm.method = max(peak[0], current_rss_mb()), "sampled"
