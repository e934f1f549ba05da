"""Timing one exported model in its runtime, following llama-bench's conventions.

- pp: prompt processing tokens/s for a ``prompt_tokens`` prompt of fixed random token ids
  (llama-bench uses random tokens too), from an empty context;
- tg: decode tokens/s generating ``gen_tokens`` tokens one at a time from an empty context;
- TTFT: time from submitting the ``prompt_tokens`` prompt to the first token's logits;
- one warm-up, then ``repeats`` timed repeats; medians with min/max;
- peak resident memory of this process, the KV cache at the profile's context length,
  CPU-seconds per token from the process's own accounting, and the wall-clock windows of the
  timed decodes (for a power meter's log) with the RAPL counters read around them.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CpuSampler:
    """Samples system-wide and own CPU use in the background, to flag competing processes."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process()
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (system busy cores, own busy cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ncpu = os.cpu_count() or 1
        self.psutil.cpu_percent(None)
        self.proc.cpu_percent(None)
        while not self._stop.wait(self.interval):
            system = self.psutil.cpu_percent(None) / 100.0 * ncpu
            own = self.proc.cpu_percent(None) / 100.0
            self.samples.append((system, own))

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def other_cores(self) -> float:
        if not self.samples:
            return 0.0
        return statistics.median(max(0.0, s - o) for s, o in self.samples)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def peak_rss_mb() -> float:
    """Peak resident memory of this process.

    On Linux, VmHWM of the current address space. Not ru_maxrss: the kernel carries the
    maximum across execve, so a benchmark started from a large process (a training run,
    pytest with torch loaded) would report its parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB elsewhere


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_repeats(prefill: Callable[[], None], decode: Callable[[], None], prompt_tokens: int, gen_tokens: int,
                  repeats: int) -> dict[str, Any]:
    """llama-bench's protocol: one warm-up, then ``repeats`` timed prefills and decodes from an empty context."""
    from .energy import rapl_counters

    counters = rapl_counters()
    pp, tg, ttft, windows = [], [], [], []
    cpu_total, rapl_j = 0.0, 0.0
    for i in range(repeats + 1):
        t = time.perf_counter()
        prefill()
        dt_prompt = time.perf_counter() - t
        before = [c.read() for c in counters]
        c0, w0, t = _cpu_s(), time.time(), time.perf_counter()
        decode()
        dt_gen = time.perf_counter() - t
        w1, after = time.time(), [c.read() for c in counters]
        if i == 0:
            continue
        cpu_total += _cpu_s() - c0
        rapl_j += sum(c.delta_j(a, b) for c, a, b in zip(counters, before, after))
        windows.append((w0, w1))
        pp.append(prompt_tokens / dt_prompt)
        ttft.append(dt_prompt * 1e3)
        tg.append(gen_tokens / dt_gen)
    return {"pp": pp, "tg": tg, "ttft": ttft, "cpu_s_per_token": cpu_total / (repeats * gen_tokens),
            "decode_windows": windows, "rapl_joules": rapl_j if counters else None,
            "rapl_counters": [c.name for c in counters]}


def random_tokens(vocab: int, prompt_tokens: int, gen_tokens: int) -> tuple[list[int], list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    low = min(100, vocab - 1)
    return ([int(t) for t in rng.integers(low, vocab, size=prompt_tokens)],
            [int(t) for t in rng.integers(low, vocab, size=gen_tokens)])


def measure_gguf(path: Path, threads: int, n_ctx: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    from . import llamacpp

    baseline = rss_mb()
    t0 = time.perf_counter()
    llm = llamacpp.load(path, n_ctx=max(n_ctx, prompt_tokens + gen_tokens + 8), threads=threads, n_batch=max(prompt_tokens, 32))
    load_s = time.perf_counter() - t0
    prompt, gen = random_tokens(llm.n_vocab(), prompt_tokens, gen_tokens)

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))  # the first token is available

    def decode() -> None:
        llm.reset()
        for tok in gen:
            llm.eval([tok])

    timed = timed_repeats(prefill, decode, prompt_tokens, gen_tokens, repeats)
    facts = llamacpp.model_facts(llm)
    llm.close()
    return {"runtime": f"llama.cpp (llama-cpp-python {llamacpp.version()}, {llamacpp.build_isa()})", "load_s": load_s, **timed,
            "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(), "kv_cache_mb": _kv_cache_mb(facts, n_ctx, 2),
            "facts": facts}


def measure_onnx(path: Path, threads: int, n_ctx: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict[str, Any]:
    """The same protocol as for GGUF, through onnxruntime and the exported KV-cache decoder."""
    import numpy as np

    from . import onnxrt

    baseline = rss_mb()
    t0 = time.perf_counter()
    dec = onnxrt.Decoder(path, threads)
    load_s = time.perf_counter() - t0
    vocab_dim = dec.session.get_outputs()[0].shape[-1]
    prompt, gen = random_tokens(vocab_dim if isinstance(vocab_dim, int) else 1000, prompt_tokens, gen_tokens)
    prompt_ids = np.array([prompt])

    def prefill() -> None:
        logits, _ = dec.step(prompt_ids, dec.empty_past(1), 0)
        int(logits[0, -1].argmax())

    def decode() -> None:
        past = dec.empty_past(1)
        for length, tok in enumerate(gen):
            _, past = dec.step(np.array([[tok]]), past, length)

    timed = timed_repeats(prefill, decode, prompt_tokens, gen_tokens, repeats)
    kv = len(dec.past_names) * n_ctx * dec.kv_heads * dec.head_dim * 4 / 1e6  # K and V per layer, fp32 cache
    return {"runtime": f"onnxruntime {onnxrt.version()}", "load_s": load_s, **timed,
            "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(), "kv_cache_mb": kv,
            "facts": dec.model_facts(model_file_mb(path) * 1e6)}


def measure_genai(path: Path, threads: int, n_ctx: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict[str, Any]:
    """The same protocol through onnxruntime-genai's generator (what a phone app calls), its KV
    buffer allocated for the profile's context length as the app's would be."""
    import numpy as np

    from . import onnxgenai, onnxrt

    baseline = rss_mb()
    t0 = time.perf_counter()
    model = onnxgenai.GenaiModel(onnxgenai.folder_of(path), threads)
    load_s = time.perf_counter() - t0
    prompt, gen = random_tokens(model.vocab, prompt_tokens, gen_tokens)
    # the profile's context where the model holds it (a model trained on less cannot be given more)
    max_length = max(min(n_ctx, model.context_length), prompt_tokens + gen_tokens + 1)
    prompt_ids, gen_ids = np.array(prompt, np.int32), np.array(gen, np.int32)

    def prefill() -> None:
        g = model.generator(max_length)
        g.append_tokens(prompt_ids)
        int(np.argmax(g.get_logits()))  # the first token is available

    def decode() -> None:
        g = model.generator(max_length)
        for tok in gen_ids:
            g.append_tokens(tok[None])

    timed = timed_repeats(prefill, decode, prompt_tokens, gen_tokens, repeats)
    return {"runtime": f"onnxruntime-genai {onnxgenai.version()} (onnxruntime {onnxrt.version()})", "load_s": load_s, **timed,
            "baseline_rss_mb": baseline, "peak_rss_mb": peak_rss_mb(), "kv_cache_mb": model.kv_cache_mb(max_length),
            "facts": model.model_facts(model_file_mb(path) * 1e6)}


def measure_onnx_file(path: Path, *args: Any) -> dict[str, Any]:
    """An onnxruntime-genai folder's decoder through onnxruntime-genai where it is installed, else
    (and for a plain edgekd ONNX file) through onnxruntime."""
    from . import onnxgenai

    if onnxgenai.folder_of(path) is not None and onnxgenai.available():
        return measure_genai(path, *args)
    return measure_onnx(path, *args)


MEASURE = {".gguf": measure_gguf, ".onnx": measure_onnx_file}


def _kv_cache_mb(facts: dict[str, Any] | None, n_ctx: int, bytes_per_value: int) -> float | None:
    from .costmodel import ModelFacts

    return None if facts is None else ModelFacts(**facts).kv_bytes(n_ctx, bytes_per_value) / 1e6


def model_file_mb(path: Path) -> float:
    """Size on disk, counting an ONNX file's external data."""
    size = path.stat().st_size
    data = path.parent / f"{path.name}.data"
    if path.suffix == ".onnx" and data.exists():
        size += data.stat().st_size
    return size / 1e6
