"""Choose the student's depth for a device from the cost model, before any training.

``keep_layers: auto`` picks the deepest student whose projected file size, decode speed and
time to first token on the profile's device all meet its budgets. Pruning beyond half the
depth is not attempted: Minitron (Muralidharan et al. 2024) and Gromov et al. (2024) find
that quality is hard to recover past roughly 50% depth removal.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from ..device.costmodel import ArchShape, project
from ..formats import FormatPlan
from ..profiles import DeviceProfile

MIN_KEEP_FRACTION = 0.5


def plan_depth(profile: DeviceProfile, shape: ArchShape) -> tuple[int, dict[str, Any]]:
    """Return (layers to keep, the projections and the reason) for ``keep_layers: auto``."""
    b = profile.budgets
    plan = FormatPlan.uniform(profile.deployment.weight_format)
    floor = max(1, math.ceil(MIN_KEEP_FRACTION * shape.layers))
    candidates = []
    for layers in range(shape.layers, floor - 1, -1):
        p = project(shape.with_layers(layers), plan, profile.hardware, profile.deployment.context_length)
        ok = (b.max_model_mb is None or p.model_mb <= b.max_model_mb) and \
             (b.min_decode_tokens_per_s is None or p.decode_tokens_per_s >= b.min_decode_tokens_per_s) and \
             (b.max_ttft_ms is None or p.ttft_ms <= b.max_ttft_ms)
        candidates.append({"layers": layers, **asdict(p), "meets_budgets": ok})
        if ok:
            return layers, {"reason": f"deepest student whose projection meets the {profile.name} budgets",
                            "projection": candidates[-1], "considered": len(candidates)}
    return floor, {
        "reason": f"no depth down to {floor} layers meets the budgets by projection; pruning stops at "
        f"{int(MIN_KEEP_FRACTION * 100)}% depth (quality is hard to recover beyond it)",
        "projection": candidates[-1], "considered": len(candidates),
    }
