"""On-device benchmark of an exported model, following llama-bench's conventions.

- pp: prompt processing tokens/s for a ``prompt_tokens`` prompt of fixed random token ids
  (llama-bench uses random tokens too), from an empty context;
- tg: decode tokens/s generating ``gen_tokens`` tokens one at a time from an empty context;
- TTFT: time from submitting the ``prompt_tokens`` prompt to the first token's logits;
- one warm-up, then ``repeats`` timed repeats; medians with min/max;
- peak resident memory of the benchmark process, the file size, the KV cache at the
  profile's context length; CPU-seconds per token from the process's own accounting;
- energy per token from a real counter when one exists, else the profile's power model.

The measurement runs in a fresh subprocess (``python -m edgekd.benchmark``): peak memory is
the runtime's and not the caller's (say, a training process), and a crash of the native
runtime becomes a clear error instead of killing the caller. Needs no torch.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .budgets import BudgetCheck, check_budgets
from .errors import EdgekdError
from .profiles import DeviceProfile, load_profile

NOISE_WARN_FRACTION = 0.25  # of one core, used by other processes on average


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


# ---------------------------------------------------------------- load sampling


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


# ---------------------------------------------------------------- GGUF via llama.cpp


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


def _peak_rss_mb() -> float:
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


def _timed_repeats(prefill: Callable[[], None], decode: Callable[[], None], prompt_tokens: int, gen_tokens: int,
                   repeats: int) -> dict[str, Any]:
    """llama-bench's protocol: one warm-up, then ``repeats`` timed prefills and decodes from an empty context.

    The wall-clock windows of the timed decodes are kept for a power meter's log, and the
    RAPL package counters (where readable) are read around them.
    """
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


def _random_tokens(vocab: int, prompt_tokens: int, gen_tokens: int) -> tuple[list[int], list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    low = min(100, vocab - 1)
    return ([int(t) for t in rng.integers(low, vocab, size=prompt_tokens)],
            [int(t) for t in rng.integers(low, vocab, size=gen_tokens)])


def _measure_gguf(path: Path, threads: int, n_ctx: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    from . import llamacpp

    baseline = _rss_mb()
    t0 = time.perf_counter()
    llm = llamacpp.load(path, n_ctx=max(n_ctx, prompt_tokens + gen_tokens + 8), threads=threads, n_batch=max(prompt_tokens, 32))
    load_s = time.perf_counter() - t0
    prompt, gen = _random_tokens(llm.n_vocab(), prompt_tokens, gen_tokens)

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))  # the first token is available

    def decode() -> None:
        llm.reset()
        for tok in gen:
            llm.eval([tok])

    timed = _timed_repeats(prefill, decode, prompt_tokens, gen_tokens, repeats)
    facts = llamacpp.model_facts(llm)
    return {"runtime": f"llama.cpp (llama-cpp-python {llamacpp.version()}, {llamacpp.build_isa()})", "load_s": load_s, **timed,
            "baseline_rss_mb": baseline, "peak_rss_mb": _peak_rss_mb(), "kv_cache_mb": _kv_cache_mb(facts, n_ctx, 2),
            "facts": facts}


def _measure_onnx(path: Path, threads: int, n_ctx: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict[str, Any]:
    """The same protocol as for GGUF, through onnxruntime and the exported KV-cache decoder."""
    import numpy as np

    from . import onnxrt

    baseline = _rss_mb()
    t0 = time.perf_counter()
    dec = onnxrt.Decoder(path, threads)
    load_s = time.perf_counter() - t0
    vocab_dim = dec.session.get_outputs()[0].shape[-1]
    prompt, gen = _random_tokens(vocab_dim if isinstance(vocab_dim, int) else 1000, prompt_tokens, gen_tokens)
    prompt_ids = np.array([prompt])

    def prefill() -> None:
        logits, _ = dec.step(prompt_ids, dec.empty_past(1), 0)
        int(logits[0, -1].argmax())

    def decode() -> None:
        past = dec.empty_past(1)
        for length, tok in enumerate(gen):
            _, past = dec.step(np.array([[tok]]), past, length)

    timed = _timed_repeats(prefill, decode, prompt_tokens, gen_tokens, repeats)
    kv = len(dec.past_names) * n_ctx * dec.kv_heads * dec.head_dim * 4 / 1e6  # K and V per layer, fp32 cache
    return {"runtime": f"onnxruntime {onnxrt.version()}", "load_s": load_s, **timed,
            "baseline_rss_mb": baseline, "peak_rss_mb": _peak_rss_mb(), "kv_cache_mb": kv,
            "facts": dec.model_facts(model_file_mb(path) * 1e6)}


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


# ---------------------------------------------------------------- driver


def _energy(m: dict[str, Any], tg: Stat, hw: Any, threads: int, tokens: int, energy_log: str | None) -> Any:
    """A real reading where there is one (the user's power-meter log, then RAPL), else the power model."""
    from .energy import from_power_log, measured_estimate, power_model_estimate

    if energy_log:
        try:
            return from_power_log(energy_log, m["decode_windows"], tokens, hw)
        except OSError as exc:
            raise EdgekdError(f"cannot read the power log {energy_log}: {exc.strerror}", fix="pass the meter's CSV (unix_time_s,watts)") from None
        except ValueError as exc:
            raise EdgekdError(f"the power log {energy_log} does not fit this run: {exc}",
                              fix="keep the meter logging during the whole benchmark; rows are unix_time_s,watts") from None
    if m.get("rapl_joules") is not None:
        return measured_estimate(m["rapl_joules"], tokens, hw, f"RAPL package counters ({', '.join(m['rapl_counters'])}), "
                                 "whole package incl. other processes")
    return power_model_estimate(1.0 / tg.median, hw, threads)


def _projection(facts: dict[str, Any] | None, profile: DeviceProfile, threads: int, tg: Stat, pp: Stat,
                prompt_tokens: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    from . import hostperf
    from .costmodel import ModelFacts, project_from_host

    if facts is None:
        return None, None
    host = hostperf.measure(threads)
    proj = project_from_host(ModelFacts(**facts), profile.hardware, host.copy_bandwidth_gbs, host.gemm_gflops_fp32,
                             tg.median, pp.median, prompt_tokens)
    proj["device"] = profile.name
    return proj, host.to_dict()


def _run_in_process(model: Path, profile: DeviceProfile, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int,
                    energy_log: str | None = None, projection: bool = True, budgets_on: str = "measured") -> BenchResult:
    from .versions import host_info

    measure = {".gguf": _measure_gguf, ".onnx": _measure_onnx}.get(model.suffix.lower())
    if measure is None:
        raise EdgekdError(f"cannot benchmark {model.name}: edgekd bench runs .gguf (llama.cpp) and .onnx (onnxruntime) files",
                          fix="pass a file exported by edgekd compress")
    load_before = os.getloadavg()[0]
    with CpuSampler() as sampler:
        m = measure(model, threads, profile.deployment.context_length, prompt_tokens, gen_tokens, repeats)
    tg, pp = Stat.of(m["tg"]), Stat.of(m["pp"])
    energy = _energy(m, tg, profile.hardware, threads, repeats * gen_tokens, energy_log)
    other = sampler.other_cores()
    warnings = []
    if other > NOISE_WARN_FRACTION:
        warnings.append(f"other processes used {other:.2f} cores on average during the run; "
                        "timings are unreliable (on a 2-core machine a competing process can slow decode many times)")
    proj, host_perf = _projection(m["facts"], profile, threads, tg, pp, prompt_tokens) if projection else (None, None)
    if projection and proj is None:
        warnings.append("no projection to the device: the file does not say its parameter count (export it with edgekd)")
    host = host_info()
    result = BenchResult(
        model=str(model), runtime=m["runtime"], profile=profile.name, threads=threads,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, file_mb=model_file_mb(model),
        load_s=m["load_s"], pp_tokens_per_s=pp, tg_tokens_per_s=tg, ttft_ms=Stat.of(m["ttft"]),
        peak_rss_mb=m["peak_rss_mb"], baseline_rss_mb=m["baseline_rss_mb"], kv_cache_mb=m["kv_cache_mb"],
        context_length=profile.deployment.context_length, cpu_s_per_token=m["cpu_s_per_token"],
        energy=energy.to_dict(), host=host,
        load={"loadavg_1m_before": load_before, "other_process_cores_during": other}, warnings=warnings,
        model_facts=m["facts"], projection=proj, host_perf=host_perf,
    )
    where = f"measured on this host ({host['cpu']}, {threads} threads), not projected to {profile.name}"
    sources = {k: where for k in ("decode_tokens_per_s", "ttft_ms", "peak_memory_mb")}
    sources["model_mb"] = "measured: file size" + (" (with external data)" if model.suffix == ".onnx" else "")
    sources["energy_mj_per_token"] = energy.method + ("; host time" if energy.method.startswith("proxy") else "")
    values = result.measured()
    if budgets_on == "projected":
        if proj is None:
            raise EdgekdError("--budgets-on projected needs a projection, and this file has none",
                              fix="bench a file exported by edgekd, or check the budgets on the measured numbers")
        values["decode_tokens_per_s"], values["ttft_ms"] = proj["decode_tokens_per_s"], proj["ttft_ms"]
        for k in ("decode_tokens_per_s", "ttft_ms"):
            sources[k] = f"PROJECTION to {profile.name} (host-calibrated roofline), not measured on the device"
    result.budgets = check_budgets(profile.budgets, values, sources)
    return result


def bench(
    model: str | os.PathLike,
    profile: str | os.PathLike | DeviceProfile = "raspberry-pi-5",
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    threads: int | None = None,
    repeats: int = 3,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    isolated: bool = True,
    energy_log: str | os.PathLike | None = None,
    projection: bool = True,
    budgets_on: str = "measured",
) -> BenchResult:
    """Benchmark ``model`` (a .gguf or an edgekd .onnx file) with the settings and budgets of ``profile``.

    Returns a :class:`BenchResult`; ``result.passed`` is False when a measured number
    breaks a budget, and ``result.failures`` says which. Usable inside a pytest test.

    ``threads`` defaults to the profile's, capped at this machine's cores (more threads than
    cores makes llama.cpp's decode several times slower). ``energy_log``: a power meter's CSV
    (``unix_time_s,watts``) covering the run. ``projection``: also project decode speed and
    TTFT to the profile's device (host-calibrated roofline); ``budgets_on="projected"`` checks
    the speed budgets on that projection instead of on this host's measurement.
    """
    from .versions import usable_threads

    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, overrides)
    path = Path(model).expanduser()
    if not path.is_file():
        raise EdgekdError(f"model file not found: {path}", fix="pass the path of an exported model (export/<run>/model-q4_0.gguf or model-q4_0.onnx)")
    if repeats < 1 or prompt_tokens < 1 or gen_tokens < 1:
        raise EdgekdError("repeats, prompt tokens and generated tokens must be at least 1", fix="pass positive values")
    if budgets_on not in ("measured", "projected"):
        raise EdgekdError(f"budgets_on must be 'measured' or 'projected', not {budgets_on!r}", fix="pass one of the two")
    if energy_log is not None and not Path(energy_log).is_file():
        raise EdgekdError(f"power log not found: {energy_log}", fix="pass the CSV your meter wrote (unix_time_s,watts)")
    n_threads = threads or usable_threads(prof.deployment.threads)
    options = {"energy_log": None if energy_log is None else str(energy_log), "projection": projection, "budgets_on": budgets_on}
    if not isolated:
        return _run_in_process(path, prof, n_threads, prompt_tokens, gen_tokens, repeats, **options)
    job = {"model": str(path), "profile": prof.model_dump(mode="json"), "threads": n_threads,
           "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats, **options}
    proc = subprocess.run([sys.executable, "-m", "edgekd.benchmark"], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode < 0 or (proc.returncode != 0 and not proc.stdout.strip()):
        raise EdgekdError(
            f"the runtime crashed while benchmarking {path} (exit {proc.returncode}): {proc.stderr.strip()[-400:]}",
            fix="llama.cpp was built for another CPU's instruction sets: run `make install` on this machine (see README)"
            if proc.returncode == -signal.SIGILL else
            "check the file with `edgekd bench --repeats 1`; if llama.cpp was built with -march=native on an "
            "AMX-capable Xeon, rebuild it with `make install`, which never compiles the AMX kernels (see README)",
        )
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in reply:
        raise EdgekdError(reply["error"]["problem"], fix=reply["error"].get("fix"), details=reply["error"].get("details"))
    return BenchResult.from_dict(reply["result"])


def _worker() -> int:
    job = json.loads(sys.stdin.read())
    prof = DeviceProfile.model_validate(job["profile"])
    try:
        result = _run_in_process(Path(job["model"]), prof, job["threads"], job["prompt_tokens"], job["gen_tokens"], job["repeats"],
                                 job["energy_log"], job["projection"], job["budgets_on"])
    except EdgekdError as exc:
        print(json.dumps({"error": {"problem": exc.problem, "fix": exc.fix, "details": exc.details}}))
        return 2
    print(json.dumps({"result": result.to_dict()}))
    return 0


# ---------------------------------------------------------------- output


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
        t.add_row(f"KV cache MB @ {result.context_length} ctx", f"{result.kv_cache_mb:.1f}", "f16")
    t.add_row("CPU-s / token", f"{result.cpu_s_per_token:.4f}", "")
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
    from xml.sax.saxutils import quoteattr

    from .fileio import atomic_write_text

    cases = []
    for c in result.budgets:
        body = ""
        if c.passed is False:
            body = f"<failure message={quoteattr(c.describe())}/>"
        elif c.passed is None:
            body = f"<skipped message={quoteattr(c.describe())}/>"
        cases.append(f'  <testcase classname="edgekd.bench.{result.profile}" name={quoteattr(c.budget)}>{body}</testcase>')
    failures = sum(c.passed is False for c in result.budgets)
    skipped = sum(c.passed is None for c in result.budgets)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<testsuite name={quoteattr("edgekd bench " + Path(result.model).name)} tests="{len(result.budgets)}" '
        f'failures="{failures}" skipped="{skipped}">\n' + "\n".join(cases) + "\n</testsuite>\n"
    )
    atomic_write_text(path, xml)


if __name__ == "__main__":
    sys.exit(_worker())
