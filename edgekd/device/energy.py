"""Energy and battery proxies from measured time and a profile's power model.

Without a power meter, the energy a token costs is estimated as

    E_token = t_token * (P_active - P_idle) * threads / cores        (incremental, above idle)

i.e. the extra power of the busy cores times how long they were busy. Battery figures
use the whole-device draw while generating, t_token * (P_idle + (P_active - P_idle) *
threads / cores), because the battery also pays for idle power during generation.
:func:`measured_estimate` turns a real energy reading (a meter's log) into the same figures;
the method is always reported, and "not measured" is never shown as zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..profiles import Hardware


@dataclass
class EnergyEstimate:
    energy_mj_per_token: float | None  # incremental above idle
    device_mj_per_token: float | None  # whole device while generating (for battery figures)
    tokens_per_charge: float | None
    battery_pct_per_1k_tokens: float | None
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def power_model_estimate(seconds_per_token: float, hw: Hardware, threads: int) -> EnergyEstimate:
    share = min(threads, hw.cores) / hw.cores
    busy_w = (hw.power_active_w - hw.power_idle_w) * share
    incremental_j = seconds_per_token * busy_w
    device_j = seconds_per_token * (hw.power_idle_w + busy_w)
    return _with_battery(incremental_j, device_j, hw, f"proxy: measured time x profile power model "
                         f"(({hw.power_active_w:g} W - {hw.power_idle_w:g} W) x {min(threads, hw.cores)}/{hw.cores} cores)")


def _with_battery(incremental_j: float, device_j: float, hw: Hardware, method: str) -> EnergyEstimate:
    tokens_per_charge = pct = None
    if hw.battery_wh:
        battery_j = hw.battery_wh * 3600.0
        tokens_per_charge = battery_j / device_j if device_j > 0 else None
        pct = 100.0 * 1000 * device_j / battery_j
    return EnergyEstimate(incremental_j * 1e3, device_j * 1e3, tokens_per_charge, pct, method)


def measured_estimate(joules: float, tokens: int, hw: Hardware, counter: str) -> EnergyEstimate:
    """From a real counter: the counter covers the whole package, so it is used for both figures."""
    per_token = joules / tokens
    return _with_battery(per_token, per_token, hw, f"measured: {counter}")


# ---------------------------------------------------------------- real counters


def _interp(log: list[tuple[float, float]], t: float) -> float:
    import bisect

    times = [p[0] for p in log]
    i = bisect.bisect_left(times, t)
    if i < len(log) and times[i] == t:
        return log[i][1]
    (t0, w0), (t1, w1) = log[i - 1], log[i]
    return w0 + (w1 - w0) * (t - t0) / (t1 - t0)


def integrate_power_log(log: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Joules in ``windows`` (unix start, end) from a power log of (unix time s, watts) samples.

    Trapezoid rule over the samples inside each window, with the power at the window's edges
    interpolated linearly between the neighbouring samples.
    """
    log = sorted(log)
    if len(log) < 2:
        raise ValueError("the power log needs at least two samples")
    total = 0.0
    for start, end in windows:
        if start < log[0][0] or end > log[-1][0]:
            raise ValueError(f"the power log covers {log[0][0]:.1f}..{log[-1][0]:.1f} but the run measured {start:.1f}..{end:.1f}")
        points = [(start, _interp(log, start))] + [p for p in log if start < p[0] < end] + [(end, _interp(log, end))]
        total += sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    return total


def read_power_log(path: str) -> list[tuple[float, float]]:
    """A CSV of ``unix_time_s,watts`` rows (a header line and other columns after the second are ignored)."""
    import csv

    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.reader(f):
            try:
                rows.append((float(rec[0]), float(rec[1])))
            except (ValueError, IndexError):
                continue  # header or comment line
    return rows


def from_power_log(path: str, windows: list[tuple[float, float]], tokens: int, hw: Hardware) -> EnergyEstimate:
    """Energy per token from a whole-device power meter's log over the decode windows.

    The meter sees the whole device, so the battery figures use its reading as is; the
    per-token figure checked against the budget is above idle (the profile's idle power),
    the same quantity the power model estimates.
    """
    joules = integrate_power_log(read_power_log(path), windows)
    seconds = sum(e - s for s, e in windows)
    device_j = joules / tokens
    incremental_j = max(0.0, joules - hw.power_idle_w * seconds) / tokens
    mean_w = joules / seconds if seconds else float("nan")
    return _with_battery(incremental_j, device_j, hw, f"measured: power meter log {path} (mean {mean_w:.2f} W while decoding; "
                         f"{hw.power_idle_w:g} W idle from the profile subtracted for the per-token figure)")


@dataclass
class RaplCounter:
    """One Linux powercap (RAPL) package energy counter, in microjoules, with its wrap-around range."""

    name: str
    energy_path: str
    max_range_uj: int

    def read(self) -> int:
        with open(self.energy_path, encoding="ascii") as f:
            return int(f.read().strip())

    def delta_j(self, before: int, after: int) -> float:
        diff = after - before
        if diff < 0:  # the counter wrapped once
            diff += self.max_range_uj
        return diff / 1e6


def rapl_counters(root: str = "/sys/class/powercap") -> list[RaplCounter]:
    """Readable package-level RAPL counters (``intel-rapl:N``; AMD CPUs use the same interface)."""
    import glob
    import os

    found = []
    for d in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        if os.path.basename(d).count(":") != 1:  # intel-rapl:0:0 and deeper are sub-domains of a package
            continue
        try:
            with open(os.path.join(d, "name"), encoding="ascii") as f:
                name = f.read().strip()
            with open(os.path.join(d, "max_energy_range_uj"), encoding="ascii") as f:
                max_range = int(f.read().strip())
            counter = RaplCounter(name, os.path.join(d, "energy_uj"), max_range)
            counter.read()  # readable? (often root-only since CVE-2020-8694)
        except (OSError, ValueError):
            continue
        found.append(counter)
    return found
