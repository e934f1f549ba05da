"""The resident memory of a training step phase by phase: sampled every millisecond beside marks
set where the step enters each phase (benchmarks/qat_step_phases.py, benchmarks/memory_fit.py --phases)."""

from __future__ import annotations

import bisect
import os
import threading
import time
from array import array


class PhaseSampler:
    """The process's resident bytes every millisecond while it runs (``with sampler:``, as often as
    wanted), and named marks; the peak between marks."""

    def __init__(self) -> None:
        self.times, self.rss = array("d"), array("q")  # compact: a long stage takes ~1,000 samples a second
        self.marks: list[tuple[float, str]] = []
        self._stop = False
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop:
                f.seek(0)
                self.times.append(time.perf_counter())
                self.rss.append(int(f.read().split()[1]) * self._page)
                time.sleep(0.001)

    def mark(self, name: str) -> None:
        self.marks.append((time.perf_counter(), name))

    def wrap(self, owner: object, name: str, label: str | None = None, static: bool = False) -> None:
        """Mark entry and exit of ``owner.name`` (a function looked up at call time; ``static``: a
        class's staticmethod) as the phase ``label`` (default: ``name``)."""
        fn, label = getattr(owner, name), label or name

        def marked(*args, **kwargs):
            self.mark(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.mark(f"after {label}")

        setattr(owner, name, staticmethod(marked) if static else marked)

    def __enter__(self) -> PhaseSampler:
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()

    def timeline(self, since: float = 0.0) -> list[tuple[str, int]]:
        """Each window marked after ``since``, in order: (phase, its highest resident MiB)."""
        bounds = sorted(m for m in self.marks if m[0] >= since) + [(time.perf_counter(), "end")]
        out = []
        for (begin, name), (end, _) in zip(bounds, bounds[1:]):
            lo, hi = bisect.bisect_left(self.times, begin), bisect.bisect_left(self.times, end)
            if hi > lo:
                out.append((name, round(max(self.rss[lo:hi]) / 2**20)))
        return out

    def phases(self, since: float = 0.0) -> dict[str, dict[str, float]]:
        """Per phase marked after ``since`` (a perf_counter time): its windows, their highest and median peak (MiB)."""
        bounds = sorted(m for m in self.marks if m[0] >= since) + [(time.perf_counter(), "end")]
        start = bisect.bisect_left(self.times, since)
        times, rss = self.times[start:], self.rss[start:]
        peaks: dict[str, list[float]] = {}
        for (begin, name), (end, _) in zip(bounds, bounds[1:]):
            lo, hi = bisect.bisect_left(times, begin), bisect.bisect_left(times, end)
            if hi > lo:
                peaks.setdefault(name, []).append(max(rss[lo:hi]) / 2**20)
        return {k: {"windows": len(v), "max_mb": round(max(v)), "median_mb": round(sorted(v)[len(v) // 2])} for k, v in peaks.items()}


def mark_training_step(sampler: PhaseSampler) -> None:
    """Marks at the phases of a distillation or QAT-KD step: reading the output head (``head_of``:
    a QAT round trip of the tied table), the chunked head's loop, each chunk's closed-form loss and
    the table-gradient update, backward, gradient clipping and the optimizer's update."""
    import torch

    from edgekd.methods import chunked_head, distill, optim, step_losses

    for name in ("forward_kl_and_ce_with_grad", "_add_product"):
        sampler.wrap(chunked_head, name)
    sampler.wrap(distill, "micro_step", "forward")  # up to the head: the student's (and teacher's) blocks
    sampler.wrap(step_losses, "head_of")  # imported into step_losses by name, as trim_heap into distill
    sampler.wrap(distill, "trim_heap", "trim")
    sampler.wrap(chunked_head._GradInForward, "forward", "chunk loop", static=True)
    sampler.wrap(torch.Tensor, "backward")
    sampler.wrap(optim.AdamWBf16Moments, "step", "optimizer step")
    sampler.wrap(torch.optim.AdamW, "step", "optimizer step")
    sampler.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    sampler.wrap(distill, "clip_grad_norm", "clip")  # the bf16-gradient path's, imported there by name


def mark_gguf_export(sampler: PhaseSampler) -> None:
    """Marks at the phases of a GGUF export and its llama.cpp check (edgekd.exporters.ship.write_checked):
    the fp32 state read, each tensor's quantization, the file's write, llama.cpp's load and the parity check."""
    import gguf

    from edgekd.device import llamacpp
    from edgekd.exporters import gguf as gguf_export
    from edgekd.exporters import ship
    from edgekd.methods import qat

    sampler.wrap(qat, "grids", "state and grids")  # imported by export_gguf at call time, as llamacpp by write_checked
    sampler.wrap(gguf_export, "_tensor", "quantize a tensor")
    sampler.wrap(gguf.GGUFWriter, "write_tensors_to_file", "write tensors")
    sampler.wrap(llamacpp, "logits_fn", "llama.cpp load")
    sampler.wrap(ship, "check_parity", "parity check")
