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

from .profiles import Hardware


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
