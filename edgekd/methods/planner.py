"""Choose formats, depth and MLP width for a device: every budget met, the least predicted KL.

Before any training, from three things: the cost model (edgekd.device.costmodel: file size,
decode speed, time to first token and peak memory on the profile's device, by projection), the
measured cost of each knob (edgekd.methods.sensitivity: KL to the teacher with that knob alone)
and what training is expected to win back. A candidate is a depth (the blocks whose skipping
cost least are removed), an MLP width, and a format for each tensor group; its predicted KL
adds the knobs' measured KLs (a first-order model: the report puts the measured KL after training
beside it) and scales each part by the share training does not recover:

    KL = (1 - r_qat) * linear format KLs + (1 - r_embedding) * embedding format KL
         + (1 - r_distill) * (removed blocks' KLs + width KL)

``r`` comes from measurements on the default teacher (benchmarks/RESULTS.md, "Format plans"):
QAT-KD for 300 steps recovered 84% of round-to-nearest Q4_0's KL on the linear layers; of what a
4-bit tied embedding adds it recovered 29% at Q4_0 and 63% at Q4_1 (whose per-block minimum
fits an embedding's skewed blocks); formats not measured are given the mean of the two;
distillation for 120 steps recovered 61% of a 24-of-30-block student's. With fewer steps the
share falls in proportion (a projection). A
candidate whose predicted KL exceeds ``max_kl`` is not a plan: the training budget cannot heal
it. Per depth and width, the best format choice under the byte budget is exact: groups are
merged one at a time keeping only (bytes, KL) pairs no other pair beats (multiple-choice knapsack
by Pareto frontiers). Pruning beyond half the depth is not searched: Minitron (Muralidharan et al.
2024) and Gromov et al. (2024) find quality hard to recover past roughly 50% depth removal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..device.costmodel import ArchShape, project, projected_peak_memory_mb
from ..errors import EdgekdError
from ..formats import FORMATS, FormatPlan

MIN_KEEP_FRACTION = 0.5
# (reference steps, share of the untrained KL recovered at them), measured on SmolLM2-135M
RECOVERY = {"qat": (300, 0.84), "distill": (120, 0.61)}
EMBEDDING_RECOVERY = {"q4_0": 0.29, "q4_1": 0.63}  # at 300 QAT steps, by the embedding's format
WIDTH_MULTIPLE = 64  # MLP channels kept in multiples of this (edgekd.methods.prune.select_mlp_channels)


def recovered(kind: str, steps: int, embedding_format: str | None = None) -> float:
    """Projected share of the untrained KL that ``steps`` of training win back (``kind``: "qat",
    "distill", or "qat_embedding" for an embedding in ``embedding_format``)."""
    if kind == "qat_embedding":
        ref_steps = RECOVERY["qat"][0]
        share = EMBEDDING_RECOVERY.get(embedding_format, sum(EMBEDDING_RECOVERY.values()) / len(EMBEDDING_RECOVERY))
    else:
        ref_steps, share = RECOVERY[kind]
    return share * min(1.0, steps / ref_steps) if steps > 0 else 0.0


@dataclass
class Candidate:
    layers: int
    keep: list[int]
    mlp_fraction: float
    formats: FormatPlan
    model_mb: float
    decode_tokens_per_s: float
    ttft_ms: float
    peak_memory_mb: float
    format_kl: float  # measured, summed (round-to-nearest)
    prune_kl: float  # measured, summed: removed blocks and MLP width
    predicted_kl: float  # after training (projection)
    violations: dict[str, list[float]] = field(default_factory=dict)  # budget -> [projected value, limit] it breaks

    @property
    def meets_budgets(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["formats"] = self.formats.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(**{**d, "formats": FormatPlan.from_dict(d["formats"])})


@dataclass
class Search:
    """What the planner may change, and the facts it plans with."""

    shape: ArchShape
    sensitivity: Any  # edgekd.methods.sensitivity.Sensitivity
    roles: tuple[str, ...]
    base: FormatPlan  # the profile's plan: kept where a knob is not searched
    format_candidates: list[str] | None  # None: formats fixed to ``base``
    embedding_candidates: list[str] | None
    depths: list[int]
    mlp_fractions: list[float]
    qat_steps: int
    distill_steps: int
    max_kl: float


def width_shape(shape: ArchShape, layers: int, fraction: float) -> ArchShape:
    inter = shape.intermediate if fraction >= 1.0 else max(WIDTH_MULTIPLE, round(shape.intermediate * fraction / WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
    return ArchShape(**{**asdict(shape), "layers": layers, "intermediate": inter})


def _frontier(search: Search, shape: ArchShape) -> list[tuple[float, float, dict[str, str]]]:
    """Pareto-optimal (bytes, format KL left after QAT, choice) over every group's candidate formats."""
    sens, share = search.sensitivity.formats, shape.layers / search.shape.layers
    keep_linear = 1 - recovered("qat", search.qat_steps)
    per_block = shape.role_params()
    groups: list[tuple[str, int, list[str], Any]] = []  # (group, params, formats, format -> KL scale)
    emb_formats = search.embedding_candidates or [search.base.embedding]

    def keep_embedding(n: str) -> float:
        return 1 - recovered("qat_embedding", search.qat_steps, n)

    groups.append(("embedding", shape.embedding_params(), emb_formats, keep_embedding))
    if not shape.tied_embeddings:
        groups.append(("head", shape.embedding_params(), search.embedding_candidates or [search.base.head], keep_embedding))
    for role in search.roles:
        fixed = [search.base.tensors.get(role, search.base.linear)]
        groups.append((role, shape.layers * per_block[role], search.format_candidates or fixed, lambda n: share * keep_linear))
    front: list[tuple[float, float, dict[str, str]]] = [(0.0, 0.0, {})]
    for group, params, names, scale in groups:
        if len(names) > 1:  # searched: only formats measured on this group whose rows, at this width, they fit (K-quants)
            row = shape.role_row_length(group)
            names = [n for n in names if n in sens.get(group, {}) and FORMATS[n].fits(row)] or names[:1]
        merged = [(b + FORMATS[n].tensor_bytes(params), kl + scale(n) * sens.get(group, {}).get(n, 0.0), {**choice, group: n})
                  for b, kl, choice in front for n in names]
        merged.sort(key=lambda t: (t[0], t[1]))
        front = []
        for item in merged:
            if not front or item[1] < front[-1][1]:
                front.append(item)
    return front


def _raw_format_kl(search: Search, choice: dict[str, str], share: float) -> float:
    """The measured (round-to-nearest) KL of a choice, before training: for the report."""
    sens = search.sensitivity.formats
    return sum(sens.get(g, {}).get(n, 0.0) * (1.0 if g in ("embedding", "head") else share) for g, n in choice.items())


def _as_plan(search: Search, choice: dict[str, str]) -> FormatPlan:
    """The format plan of a choice: the most common role format as the linear default (the
    file's name), the other roles as per-tensor entries, the base plan's per-block entries kept."""
    from collections import Counter

    base = search.base
    embedding = choice.get("embedding", base.embedding)
    roles = {role: choice.get(role, base.tensors.get(role, base.linear)) for role in search.roles}
    counts = Counter(roles.values())
    linear = base.linear if counts[base.linear] == max(counts.values()) else counts.most_common(1)[0][0]
    tensors = {k: v for k, v in base.tensors.items() if k.startswith("blk.")}
    tensors.update({role: fmt for role, fmt in roles.items() if fmt != linear})
    return FormatPlan(linear, embedding, choice.get("head", embedding if search.shape.tied_embeddings else base.head),
                      base.norm, tensors)


def candidates(search: Search, profile: Any) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Every searched (depth, width) with its best format choice, sorted (budgets met first, then
    by predicted KL), and every point searched (size, predicted KL, met?) for the Pareto plot."""
    b, hw, dep = profile.budgets, profile.hardware, profile.deployment
    order = sorted(range(search.shape.layers), key=lambda i: search.sensitivity.blocks[i])  # cheapest to remove first
    r_d = recovered("distill", search.distill_steps)
    out, points = [], []
    for layers in search.depths:
        removed = sorted(order[: search.shape.layers - layers])
        keep = [i for i in range(search.shape.layers) if i not in removed]
        block_kl = sum(search.sensitivity.blocks[i] for i in removed)
        for fraction in search.mlp_fractions:
            shape = width_shape(search.shape, layers, fraction)
            prune_kl = block_kl + (search.sensitivity.mlp_width.get(f"{fraction:g}", 0.0) if fraction < 1.0 else 0.0)
            best = None
            for _, kept_kl, choice in _frontier(search, shape):  # fewest bytes first, falling KL
                plan = _as_plan(search, choice)
                format_kl = _raw_format_kl(search, choice, shape.layers / search.shape.layers)
                p = project(shape, plan, hw, dep.context_length, runtime=dep.runtime)
                cand = Candidate(layers, keep, fraction, plan, p.model_mb, p.decode_tokens_per_s, p.ttft_ms,
                                 projected_peak_memory_mb(shape, plan, dep.context_length, dep.runtime), format_kl, prune_kl,
                                 kept_kl + (1 - r_d) * prune_kl)
                cand.violations = _violations(cand, b, search.max_kl)
                points.append({"layers": layers, "mlp_fraction": fraction, "model_mb": cand.model_mb,
                               "predicted_kl": cand.predicted_kl, "meets_budgets": cand.meets_budgets})
                if best is None or cand.meets_budgets or (not best.meets_budgets and _badness(cand) < _badness(best)):
                    best = cand
            out.append(best)
    return sorted(out, key=lambda c: (not c.meets_budgets, c.predicted_kl if c.meets_budgets else _badness(c))), points


def _violations(c: Candidate, b: Any, max_kl: float) -> dict[str, list[float]]:
    checks = [("max_model_mb", c.model_mb, b.max_model_mb, 1), ("min_decode_tokens_per_s", c.decode_tokens_per_s, b.min_decode_tokens_per_s, -1),
              ("max_ttft_ms", c.ttft_ms, b.max_ttft_ms, 1), ("max_peak_memory_mb", c.peak_memory_mb, b.max_peak_memory_mb, 1),
              ("max_kl", c.predicted_kl, max_kl, 1)]
    return {name: [value, limit] for name, value, limit, sign in checks if limit is not None and sign * (value - limit) > 0}


def _badness(c: Candidate) -> float:
    """How far a candidate misses: its broken budgets' relative excess, summed."""
    return sum(abs(value - limit) / limit for value, limit in c.violations.values())


def choose(search: Search, profile: Any) -> tuple[Candidate, list[Candidate], list[dict[str, Any]]]:
    """The plan with the least predicted KL that meets every budget, the candidates and the points
    searched; a clear error, naming the nearest plans and the budgets to relax, when none does."""
    ranked, points = candidates(search, profile)
    if ranked and ranked[0].meets_budgets:
        return ranked[0], ranked, points
    near = ranked[:3]
    details = [f"{c.layers} blocks, MLP x{c.mlp_fraction:g}, {describe(c.formats)}: " +
               ", ".join(f"{k} {v:.4g} (limit {lim:g})" for k, (v, lim) in c.violations.items()) for c in near]
    broken = sorted({k for c in near for k in c.violations})
    raise EdgekdError(
        f"no plan meets the {profile.name} budgets (searched {len(ranked)} depth/width pairs with their best formats); the nearest:",
        details=details,
        fix=f"relax {', '.join(broken)} (with --set budgets.<name>=VALUE or compression.planner.max_kl), or pick a smaller teacher",
    )


def describe(plan: FormatPlan) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in plan.tensors.items())
    return f"{plan.linear} linears, {plan.embedding} embedding" + (f" ({extra})" if extra else "")


def depths(layers: int, keep: Any) -> list[int]:
    """Depths to search: every depth down to half the teacher's for ``auto``, else the one given."""
    if keep is not None:
        return [keep]
    return list(range(layers, max(1, math.ceil(MIN_KEEP_FRACTION * layers)) - 1, -1))
