"""What each compression knob costs, measured: KL to the teacher with that knob alone applied.

On a few calibration blocks (never held-out ones), against the teacher's own logits:

- every tensor group at every candidate format, the rest of the model unquantized: the
  token embedding (with a tied head, the head too) and each linear role (``attn_q`` ...
  ``ffn_down``) in all blocks at once (HAWQ, Dong et al. 2019, ranks layers by a Hessian proxy;
  ModelOpt's AutoQuantize and this module measure the loss itself);
- every decoder block skipped alone (the residual stream passes through it; the blocks before it give
  back their outputs recorded in the teacher's pass, :func:`replayed`), the measured-loss
  ranking that agreed best with held-out damage (Spearman 0.97 against Block Influence's 0.74,
  benchmarks/RESULTS.md);
- MLP width pruning of every block at each candidate keep fraction (Minitron's activation
  importance, edgekd.methods.prune).

The planner (edgekd.methods.planner) adds these up, assuming the knobs' damages add: a
first-order model whose error the report shows next to the measured KL after training.
Round-to-nearest on the format's exact grid is measured; clip search and QAT recover part of it.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..families import _set_path, family_of
from ..formats import FORMATS, FormatPlan
from .chunked_head import Head, chunked_kl_sum, forward_to_hidden, head_of, teacher_logprob_chunks
from .prune import (
    apply_mlp_channels,
    decoder_layers,
    mlp_channel_importance,
    select_mlp_channels,
    skip_block,
)


@dataclass
class Sensitivity:
    """Measured KL (nats per token, calibration blocks) of each knob alone."""

    tokens: int
    formats: dict[str, dict[str, float]]  # group ("embedding" or a role) -> format -> KL
    blocks: list[float]  # KL with block i skipped
    mlp_width: dict[str, float] = field(default_factory=dict)  # keep fraction (as text) -> KL
    seconds: float = 0.0
    calibration_blocks: int = 0  # the blocks measured on (fewer than given where a time budget's share fitted them)
    round_trips_s: float | None = None  # with a time budget: the formats' round trips, a PROJECTION (round_trip_seconds)
    batch_s: float | None = None  # with a time budget: one batch's measurements, a PROJECTION (project_batch_seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        return cls(**d)


class _KLMeter:
    """KL(teacher || model) on fixed blocks. The teacher's final hidden states are computed once
    and its logits rebuilt from them a chunk at a time (edgekd.methods.chunked_head): no
    (blocks, T, vocab) log-probabilities are kept (2.5 GB for 16 blocks on Qwen3's vocabulary),
    unless ``keep_teacher_logprobs``: then each chunk's log-probabilities are made once and kept,
    and a measurement runs one head instead of two (the same numbers, bit for bit)."""

    def __init__(self, teacher: Any, blocks: np.ndarray, batch_size: int = 4, keep_teacher_logprobs: bool = False,
                 batches: int | None = None):
        self.available = [torch.from_numpy(blocks[i:i + batch_size].astype(np.int64)) for i in range(0, len(blocks), batch_size)]
        self.teacher = teacher
        head = head_of(teacher)
        # the head's tensors as they are now: measurements swap a weight's .data for its round trip,
        # which leaves the tensor these aliases share untouched
        self.teacher_head = Head(head.weight.detach(), head.bias.detach() if head.bias is not None else None, head.softcap)
        self.teacher_hidden: list[torch.Tensor] = []
        self.teacher_logp: list[list[torch.Tensor]] | None = [] if keep_teacher_logprobs else None
        self.block_outputs: list[list[Any]] = []  # per batch, every decoder block's output in the teacher's pass
        self.use(len(self.available) if batches is None else batches)

    def use(self, batches: int) -> None:
        """Measure on the first ``batches`` batches only (at least one): the teacher's side of each made
        now, with every decoder block's output in the teacher's pass (:meth:`kl`'s ``replay``)."""
        self.batches = self.available[:max(1, batches)]
        for ids in self.batches[len(self.teacher_hidden):]:
            outputs: list[Any] = []
            handles = [layer.register_forward_hook(lambda _m, _a, out, seen=outputs: seen.append(out)) for layer in decoder_layers(self.teacher)]
            try:
                self.teacher_hidden.append(self._hidden(self.teacher, ids))
            finally:
                for h in handles:
                    h.remove()
            self.block_outputs.append(outputs)
            if self.teacher_logp is not None:
                self.teacher_logp.append(teacher_logprob_chunks(self.teacher_hidden[-1], self.teacher_head))
        self.tokens = int(sum(ids[:, :-1].numel() for ids in self.batches))

    @staticmethod
    @torch.no_grad()
    def _hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
        return forward_to_hidden(model, ids.to(model.device))[1][:, :-1].float()

    @torch.no_grad()
    def kl(self, model: Any, replay: Callable[[int], Any] | None = None) -> float:
        """KL(teacher || ``model``) per token; ``replay(b)``: a context the forward pass of batch b runs in."""
        head = head_of(model)
        kept = self.teacher_logp or [None] * len(self.batches)
        total = 0
        for b, (ids, t_hidden, logp) in enumerate(zip(self.batches, self.teacher_hidden, kept)):
            with replay(b) if replay is not None else contextlib.nullcontext():
                hidden = self._hidden(model, ids)
            total += chunked_kl_sum(hidden, head, t_hidden.to(model.device), self.teacher_head, teacher_logp=logp)
        return max(total / self.tokens, 0.0)  # rounding can leave a tiny negative sum where nothing changed


@contextlib.contextmanager
def replayed(layers: list[Any], outputs: list[Any]) -> Iterator[None]:
    """Inside the block, each of ``layers`` returns its entry of ``outputs`` without computing
    anything: a forward pass then computes only the blocks after them, from the very tensors the
    teacher's own pass made, so a block skipped this way costs the same KL bit for bit as the
    full pass with that block skipped, at the cost of the blocks after it only."""
    own = [vars(layer).get("forward") for layer in layers]  # a forward set on the instance (a hook library's) comes back
    try:
        for layer, out in zip(layers, outputs):
            layer.forward = lambda *_args, _out=out, **_kwargs: _out
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = forward


def teacher_logprob_bytes(model: Any, blocks: np.ndarray) -> int:
    """What keeping the teacher's log-probabilities of ``blocks`` costs (fp32, every position but each block's last)."""
    return int(blocks.shape[0] * (blocks.shape[1] - 1) * model.config.vocab_size * 4)


@contextlib.contextmanager
def mlp_width_applied(model: Any, channels: list[list[int]]) -> Iterator[None]:
    """``model`` with only ``channels[i]`` of block i's MLP (edgekd.methods.prune.apply_mlp_channels)
    inside the block, its own modules put back afterwards: no copy of the model."""
    family = family_of(model)
    paths = [*family.mlp.rows, family.mlp.cols]
    kept = [[operator.attrgetter(path)(layer) for path in paths] for layer in family.decoder_layers(model)]
    owner, _, attr = family.mlp.size_attr.rpartition(".")
    sizes = [getattr(operator.attrgetter(owner)(layer) if owner else layer, attr, None) if attr else None
             for layer in family.decoder_layers(model)]
    width = model.config.intermediate_size
    apply_mlp_channels(model, channels)
    try:
        yield
    finally:
        for layer, modules, size in zip(family.decoder_layers(model), kept, sizes):
            for path, module in zip(paths, modules):
                _set_path(layer, path, module)
            target = operator.attrgetter(owner)(layer) if owner else layer
            if attr and size is not None:
                setattr(target, attr, size)
        model.config.intermediate_size = width


def _group_modules(model: Any) -> dict[str, list[Any]]:
    family = family_of(model)
    groups: dict[str, list[Any]] = {"embedding": [family.embedding_module(model)]}
    if not family.tied(model):
        groups["head"] = [family.head_module(model)]
    for _, role, mod in family.linear_modules(model):
        groups.setdefault(role, []).append(mod)
    return groups


@torch.no_grad()
def measure_sensitivity(model: Any, blocks: np.ndarray, candidates: list[str], mlp_fractions: tuple[float, ...] = (),
                        progress: Callable[[int], None] | None = None, keep_teacher_logprobs: bool = False,
                        seconds: float | None = None) -> Sensitivity:
    """Every measurement of the module docstring, on ``blocks``, for the teacher ``model`` (left unchanged).
    ``keep_teacher_logprobs``: hold the teacher's log-probabilities (:func:`teacher_logprob_bytes`)
    instead of making them again for every measurement (the default run's stage: 265 s against 349 s).
    ``seconds``: a time budget's share for the measurements; from passes over the first batch, timed
    (:func:`project_batch_seconds`), only as many batches of ``blocks`` are used as the measurements
    are projected to fit in it (at least one; :func:`batches_within`)."""
    t0 = time.perf_counter()
    meter = _KLMeter(model, blocks, keep_teacher_logprobs=keep_teacher_logprobs, batches=1 if seconds is not None else None)
    groups = _group_modules(model)
    round_trips_s = projection = None
    if seconds is not None:
        projection = project_batch_seconds(model, meter, candidates, mlp_fractions)
        round_trips_s = round_trip_seconds(groups, candidates)  # the same for any number of batches: out of the share first
        fixed_s = round_trips_s + projection.importance_s(len(meter.available))
        meter.use(batches_within(seconds - fixed_s, projection.batch_s, len(meter.available)))
    formats: dict[str, dict[str, float]] = {}
    for group, modules in groups.items():
        # the tensors themselves, not copies: round trips are new tensors, and a copy would move a
        # memory-mapped teacher's weights into the heap while the mapping stays resident (both held)
        originals = [m.weight.data for m in modules]
        formats[group] = {}
        for name in _fitting(candidates, modules):
            fmt = FORMATS[name]
            unchanged = True
            for m, w in zip(modules, originals):
                m.weight.data = fmt.torch_round_trip(w)
                unchanged = unchanged and torch.equal(m.weight.data, w)
            # weights already on this format's grid (a GGUF teacher stored in it: the default teacher's
            # linears are Q4_1) leave the model as it is: KL 0 without a forward pass
            formats[group][name] = 0.0 if unchanged else meter.kl(model)
            if progress:
                progress(1)
        for m, w in zip(modules, originals):
            m.weight.data = w
    skipped = []
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if i == 0:
            handle = layer.register_forward_hook(skip_block, with_kwargs=True)
            try:
                skipped.append(meter.kl(model))
            finally:
                handle.remove()
        else:  # blocks 0 .. i-1 give the teacher's outputs back uncomputed, block i passes block i-1's on
            skipped.append(meter.kl(model, replay=lambda b, i=i: replayed(
                layers[:i + 1], [*meter.block_outputs[b][:i], meter.block_outputs[b][i - 1]])))
        if progress:
            progress(1)
    width = {}
    if mlp_fractions:
        importance = mlp_channel_importance(model, blocks)
        for fraction in mlp_fractions:
            with mlp_width_applied(model, select_mlp_channels(importance, fraction)):
                width[f"{fraction:g}"] = meter.kl(model)
            if progress:
                progress(1)
    return Sensitivity(meter.tokens, formats, skipped, width, time.perf_counter() - t0, sum(len(ids) for ids in meter.batches),
                       round_trips_s, projection.batch_s if projection is not None else None)


@dataclass(frozen=True)
class BatchProjection:
    """What one calibration batch's measurements take, a PROJECTION from passes timed on the first batch.

    The teacher's own pass (its hidden states and block outputs) and every format or width measurement
    are full passes; skipping block i (``replayed``) computes only the blocks after it and the head, so
    the block measurements cost about half the passes they number. Pricing every measurement at one
    timed pass instead let the default run's choice swing between 4 and 8 calibration blocks on one
    host (benchmarks/RESULTS.md, "The planner's measurements under a short time budget")."""

    full_s: float  # a full forward pass with its KL: the faster of two (the first warms up)
    tail_s: float  # the final norm, the head and the KL alone: a pass with every block replayed
    layers: int
    full_passes: int  # the teacher's own pass, formats, MLP widths, the first skipped block (its hook runs after it)
    replayed_blocks: int  # the decoder blocks the replayed skips compute, summed over them
    measures_widths: bool = False  # then the MLP channel importance pass runs too, on every available batch

    @property
    def block_s(self) -> float:
        return max(self.full_s - self.tail_s, 0.0) / self.layers

    @property
    def batch_s(self) -> float:
        return self.full_passes * self.full_s + (self.layers - 1) * self.tail_s + self.replayed_blocks * self.block_s

    def importance_s(self, batches: int) -> float:
        """The MLP channel importance pass (:func:`edgekd.methods.prune.mlp_channel_importance`, every block,
        no logits) over ``batches`` batches: the same for any number of measured batches."""
        return batches * self.layers * self.block_s if self.measures_widths else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "block_s": self.block_s, "batch_s": self.batch_s}


@torch.no_grad()
def project_batch_seconds(model: Any, meter: _KLMeter, candidates: list[str], mlp_fractions: tuple[float, ...] = ()) -> BatchProjection:
    """Time the teacher's full pass twice and its head alone once on the meter's first batch (each a
    measurement of the teacher itself, KL 0) and project one batch's measurements from them."""
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        meter.kl(model)
        runs.append(time.perf_counter() - t0)
    layers = decoder_layers(model)
    t0 = time.perf_counter()
    meter.kl(model, replay=lambda b: replayed(layers, meter.block_outputs[b]))
    tail_s = time.perf_counter() - t0
    formats = sum(len(_fitting(candidates, mods)) for mods in _group_modules(model).values())
    n = len(layers)
    return BatchProjection(full_s=min(runs), tail_s=tail_s, layers=n, full_passes=1 + formats + len(mlp_fractions) + 1,
                           replayed_blocks=(n - 1) * (n - 2) // 2, measures_widths=bool(mlp_fractions))


ROUND_TRIP_PROBE_WEIGHTS = 1 << 18  # weights of the slice each format's round trip is timed on


@torch.no_grad()
def round_trip_seconds(groups: dict[str, list[Any]], candidates: list[str]) -> float:
    """The seconds :func:`measure_sensitivity` spends rounding weights, a PROJECTION: each candidate
    format's round trip timed on a slice of rows of the largest tensor it fits (about
    ``ROUND_TRIP_PROBE_WEIGHTS`` weights, the faster of two runs: the first warms up), scaled to the
    weights of every group it fits. K-quants' scale searches make this the larger part of the stage
    on a Qwen3-0.6B-sized teacher (benchmarks/RESULTS.md, "Speed of the toolkit", items 10 and 12)."""
    total = 0.0
    for name in dict.fromkeys(candidates):
        fitting = [mods for mods in groups.values() if name in _fitting([name], mods)]
        if not fitting or FORMATS[name].torch_quantize is None:  # fp32 / fp16: a copy, nothing to project
            continue
        w = max((m.weight for mods in fitting for m in mods), key=operator.methodcaller("numel"))
        piece = w.data[: max(1, min(w.shape[0], -(-ROUND_TRIP_PROBE_WEIGHTS // w.shape[1])))]
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            FORMATS[name].torch_round_trip(piece)
            runs.append(time.perf_counter() - t0)
        total += min(runs) / piece.numel() * sum(m.weight.numel() for mods in fitting for m in mods)
    return total


def predict_sensitivity_peak(model: Any, blocks: np.ndarray, keep_teacher_logprobs: bool = False) -> float:
    """The predicted peak resident bytes of :func:`measure_sensitivity`: a batch's forward pass and
    chunked KL, the teacher's stored final hidden states and block outputs, and the largest tensor group's working set
    three times over (its round trips and the quantizer's temporaries; with two copies the default
    run measured 0.92 of the peak on an AVX-512 host and 0.87 on an AVX2 one)."""
    from .chunked_head import chunk_positions
    from .memory import predict_forward_peak

    largest = max(sum(m.weight.numel() for m in mods) for mods in _group_modules(model).values()) * 4
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    stored = blocks.shape[0] * blocks.shape[1] * hidden * 4 * (1 + model.config.num_hidden_layers)  # final hidden + every block's output
    chunk_kl = 6 * chunk_positions(vocab) * vocab * 4
    if keep_teacher_logprobs:
        stored += teacher_logprob_bytes(model, blocks)
    return predict_forward_peak(model.config, 4, blocks.shape[1], logit_copies=0, extra_bytes=3 * largest + stored + chunk_kl)


def sensitivity_layout(model: Any, blocks: np.ndarray, memory_gb: float | None, target_gb: float | None) -> tuple[bool, float]:
    """Whether :func:`measure_sensitivity` keeps the teacher's log-probabilities (when that peak stays
    under the run's soft memory target and its limit), and the predicted peak (a PROJECTION)."""
    from .memory import HEADROOM, memory_limit_bytes

    kept = predict_sensitivity_peak(model, blocks, keep_teacher_logprobs=True)
    allowed = min(HEADROOM * memory_limit_bytes(memory_gb), target_gb * 1e9 if target_gb else float("inf"))
    return (True, kept) if kept <= allowed else (False, predict_sensitivity_peak(model, blocks))


def batches_within(seconds: float, batch_s: float, available: int) -> int:
    """How many calibration batches fit in ``seconds`` (at least 1, at most ``available``), a batch's
    measurements taking ``batch_s`` (a PROJECTION, :func:`project_batch_seconds`; the formats' round
    trips take their own time besides, the same for any number of batches)."""
    return max(1, min(available, int(seconds // batch_s) if batch_s > 0 else available))


def _fitting(candidates: list[str], modules: list[Any]) -> list[str]:
    """The candidate formats every tensor of a group can be stored in (K-quants need rows a multiple of 256)."""
    return [n for n in candidates if all(FORMATS[n].fits(m.weight.shape[1]) for m in modules)]


def measurements(model: Any, candidates: list[str], mlp_fractions: tuple[float, ...] = ()) -> int:
    """How many KL evaluations :func:`measure_sensitivity` makes (for a progress bar)."""
    groups = _group_modules(model).values()
    return sum(len(_fitting(candidates, mods)) for mods in groups) + len(decoder_layers(model)) + len(mlp_fractions)


def predicted_format_kl(sensitivity: Sensitivity, plan: FormatPlan, roles: tuple[str, ...]) -> float:
    """The additive prediction of a format plan's KL (round-to-nearest, nothing trained)."""
    total = sensitivity.formats["embedding"].get(plan.embedding, 0.0) if not FORMATS[plan.embedding].identity else 0.0
    if "head" in sensitivity.formats:
        total += sensitivity.formats["head"].get(plan.head, 0.0)
    for role in roles:
        total += sensitivity.formats[role].get(plan.tensors.get(role, plan.linear), 0.0)
    return total
