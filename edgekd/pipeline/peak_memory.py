"""The peak resident memory of one stage of a run, measured.

Linux keeps the process's resident high-water mark (``VmHWM`` in ``/proc/self/status``). When a
stage raises it, the new mark is the stage's exact peak. When the stage stays below an earlier
stage's peak, a thread sampling the resident size every 10 ms gives the stage's own (a peak
shorter than that can be missed; ``method`` says which). The mark is never reset (proc(5)'s
``clear_refs``), since that would also reset what ``/usr/bin/time`` and ``getrusage`` report.
Elsewhere only the sampler runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
SAMPLE_S = 0.01


@dataclass
class PeakMemory:
    start_mb: float = 0.0  # resident at the start
    peak_mb: float | None = None
    method: str = ""  # "VmHWM" (exact) or "sampled"


def _high_water_mark_mb() -> float | None:
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


@functools.lru_cache(maxsize=1)
def _this_process():
    import psutil

    return psutil.Process()


def current_rss_mb() -> float:
    return _this_process().memory_info().rss / 2**20


def mapped_unread_bytes(suffix: str = ".safetensors") -> float:
    """Bytes of the process's mappings of ``suffix`` files that are not resident (Linux; 0 elsewhere)."""
    total, size, path = 0, 0, ""
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if head == "Size:":
                    size = int(line.split()[1]) * 1024
                elif head == "Rss:" and path.endswith(suffix):
                    total += max(size - int(line.split()[1]) * 1024, 0)
                elif "-" in head and not head.endswith(":"):  # a mapping's header line: its range, then its file
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
    except OSError:
        return 0.0
    return float(total)


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, looked up once (``find_library`` starts a subprocess); None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the resident size at a stage's
    start is what it holds, not what earlier stages freed."""
    gc.collect()
    trim_heap()


@contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """``with peak_memory() as pm: ...``; afterwards ``pm.peak_mb`` is the block's peak resident MiB."""
    pm = PeakMemory(start_mb=current_rss_mb())
    mark_before = _high_water_mark_mb()
    stop = threading.Event()
    peak = [pm.start_mb]

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            peak[0] = max(peak[0], current_rss_mb())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield pm
    finally:
        stop.set()
        thread.join()
        sampled = max(peak[0], current_rss_mb())
        mark = _high_water_mark_mb()
        if mark is not None and mark_before is not None and mark > mark_before:
            pm.peak_mb, pm.method = mark, "VmHWM"
        else:
            pm.peak_mb, pm.method = sampled, "sampled"
