"""``edgekd bench``: measure an exported model on this machine and check a profile's budgets.

The measurement (:mod:`edgekd.device.measure`) runs in a fresh subprocess
(``python -m edgekd.device.bench``): peak memory is the runtime's and not the caller's (say, a
training process), and a crash of the native runtime becomes a clear error instead of killing
the caller. Energy comes from a power meter's log, else RAPL, else the profile's power model;
decode speed and TTFT are also projected to the profile's device. Needs no torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import EdgekdError
from ..profiles import DeviceProfile, load_profile
from .budgets import check_budgets
from .measure import MEASURE, CpuSampler, model_file_mb
from .results import BenchResult, Stat

NOISE_WARN_FRACTION = 0.25  # of one core, used by other processes on average


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
    from ..versions import host_info

    measure = MEASURE.get(model.suffix.lower())
    if measure is None:
        raise EdgekdError(f"cannot benchmark {model.name}: edgekd bench runs .gguf (llama.cpp) files, onnxruntime-genai "
                          "folders and .onnx (onnxruntime) files",
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
    against: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    quality_blocks: int = 24,
    quality_budgets: bool = True,
) -> BenchResult:
    """Benchmark ``model`` (a .gguf, an onnxruntime-genai folder or an edgekd .onnx file) with the
    settings and budgets of ``profile``. An onnxruntime-genai folder runs through onnxruntime-genai
    where it is installed, else its decoder through onnxruntime; ``result.runtime`` says which.

    Returns a :class:`BenchResult`; ``result.passed`` is False when a measured number
    breaks a budget, and ``result.failures`` says which. Usable inside a pytest test.

    ``threads`` defaults to the profile's, capped at this machine's cores (more threads than
    cores makes llama.cpp's decode several times slower). ``energy_log``: a power meter's CSV
    (``unix_time_s,watts``) covering the run. ``projection``: also project decode speed and
    TTFT to the profile's device (host-calibrated roofline); ``budgets_on="projected"`` checks
    the speed budgets on that projection instead of on this host's measurement.

    ``against``: a reference model (the teacher's F16 or Q8_0 GGUF; an ONNX file) scored with
    ``model`` in their runtimes on ``quality_blocks`` held-out blocks of ``data`` (text as
    ``--data`` of compress, or a run's ``corpus/heldout.npy``; default: the default corpus's split),
    so the profile's quality budgets (``max_kl_to_teacher``, ``min_top1_agreement``) are checked on
    the device without torch. A quality budget the profile sets is a failure when no reference is given
    (``quality_budgets=False``: left to the caller, as ``compress`` scores its files against the fp32 teacher).
    """
    from ..versions import usable_threads

    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, overrides)
    path = Path(model).expanduser()
    if path.is_dir():
        from .onnxgenai import decoder_file, folder_of

        if folder_of(path) is not None:  # an onnxruntime-genai folder: its decoder
            path = decoder_file(path)
    if not path.is_file():
        raise EdgekdError(f"model file not found: {path}", fix="pass the path of an exported model (export/<run>/model-<format>.gguf, model-<format>-genai or .onnx)")
    if repeats < 1 or prompt_tokens < 1 or gen_tokens < 1:
        raise EdgekdError("repeats, prompt tokens and generated tokens must be at least 1", fix="pass positive values")
    if budgets_on not in ("measured", "projected"):
        raise EdgekdError(f"budgets_on must be 'measured' or 'projected', not {budgets_on!r}", fix="pass one of the two")
    if energy_log is not None and not Path(energy_log).is_file():
        raise EdgekdError(f"power log not found: {energy_log}", fix="pass the CSV your meter wrote (unix_time_s,watts)")
    if path.suffix == ".gguf":
        from .gguf_check import check_gguf

        check_gguf(path)  # here, so the measuring process holds no reader (its memory is the runtime's)
    n_threads = threads or usable_threads(prof.deployment.threads)
    options = {"energy_log": None if energy_log is None else str(energy_log), "projection": projection, "budgets_on": budgets_on}
    if not isolated:
        result = _run_in_process(path, prof, n_threads, prompt_tokens, gen_tokens, repeats, **options)
    else:
        result = _run_isolated(path, prof, n_threads, prompt_tokens, gen_tokens, repeats, options)
    if quality_budgets:
        _check_quality(result, Path(model).expanduser(), prof, against, data, quality_blocks, n_threads)
    return result


def _check_quality(result: BenchResult, model: Path, profile: DeviceProfile, against: Any, data: Any, blocks: int,
                   threads: int) -> None:
    """The profile's quality budgets on the file against ``against`` (both in their runtimes), after the timed
    run so the measured memory stays the runtime's own; not measured (no reference) is a failure."""
    from ..quality.check import compare_in_runtimes, quality_checks

    b = profile.budgets
    limits = {"max_kl_to_teacher": b.max_kl_to_teacher, "min_top1_agreement": b.min_top1_agreement}
    if against is None:
        result.budgets += quality_checks(limits, None, "no reference: pass --against the teacher's GGUF")
        return
    comparison, text = compare_in_runtimes(model, against, data, blocks=blocks, threads=threads)
    result.quality = {**comparison.to_dict(), "text": text}
    result.budgets += quality_checks(limits, comparison.stats, f"measured in {comparison.runtime} against {comparison.against}")


def _run_isolated(path: Path, prof: DeviceProfile, n_threads: int, prompt_tokens: int, gen_tokens: int, repeats: int,
                  options: dict[str, Any]) -> BenchResult:
    job = {"model": str(path), "profile": prof.model_dump(mode="json"), "threads": n_threads,
           "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats, **options}
    proc = subprocess.run([sys.executable, "-m", "edgekd.device.bench"], input=json.dumps(job), capture_output=True, text=True)
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
    from .gguf_check import mark_checked

    job = json.loads(sys.stdin.read())
    prof = DeviceProfile.model_validate(job["profile"])
    if job["model"].endswith(".gguf"):
        mark_checked(job["model"])  # the parent checked it
    try:
        result = _run_in_process(Path(job["model"]), prof, job["threads"], job["prompt_tokens"], job["gen_tokens"], job["repeats"],
                                 job["energy_log"], job["projection"], job["budgets_on"])
    except EdgekdError as exc:
        print(json.dumps({"error": {"problem": exc.problem, "fix": exc.fix, "details": exc.details}}))
        return 2
    print(json.dumps({"result": result.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
