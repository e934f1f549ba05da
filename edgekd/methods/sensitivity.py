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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
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

BATCH_BLOCKS = 4  # calibration blocks a measurement's forward pass takes at once
_now = time.perf_counter  # the clock the time share is checked against (a test replaces it)


def batches_of(blocks: np.ndarray) -> int:
    """How many batches :func:`measure_sensitivity` splits ``blocks`` into."""
    return -(-len(blocks) // BATCH_BLOCKS)


@dataclass
class Sensitivity:
    """Measured KL (nats per token, calibration blocks) of each knob alone."""

    tokens: int
    formats: dict[str, dict[str, float]]  # group ("embedding" or a role) -> format -> KL
    blocks: list[float]  # KL with block i skipped
    mlp_width: dict[str, float] = field(default_factory=dict)  # keep fraction (as text) -> KL
    seconds: float = 0.0
    calibration_blocks: int = 0  # the blocks measured on (fewer than given where a time budget's share fitted them)
    batch_seconds: list[float] | None = None  # with a time budget: what each batch's measurements took, measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        known = {f.name for f in fields(cls)}  # a record written by an earlier version may hold other keys
        return cls(**{k: v for k, v in d.items() if k in known})


class _KLMeter:
    """KL(teacher || model) on fixed blocks. The teacher's final hidden states are computed once
    and its logits rebuilt from them a chunk at a time (edgekd.methods.chunked_head): no
    (blocks, T, vocab) log-probabilities are kept (2.5 GB for 16 blocks on Qwen3's vocabulary),
    unless ``keep_teacher_logprobs``: then each chunk's log-probabilities are made once and kept,
    and a measurement runs one head instead of two (the same numbers, bit for bit)."""

    def __init__(self, teacher: Any, blocks: np.ndarray, batch_size: int = BATCH_BLOCKS, keep_teacher_logprobs: bool = False,
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
        """Measure on the first ``batches`` batches only: the teacher's side of each made now, with every
        decoder block's output in the teacher's pass (:meth:`kl`'s ``replay``)."""
        self.batches = self.available[:batches]
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
        return per_token(self.kl_sum(model, range(len(self.batches)), replay), self.tokens)

    @torch.no_grad()
    def kl_sum(self, model: Any, batches: Iterable[int], replay: Callable[[int], Any] | None = None) -> float:
        """KL(teacher || ``model``) summed over the positions of ``batches`` (indices into :attr:`batches`)."""
        head = head_of(model)
        total = 0.0
        for b in batches:
            logp = self.teacher_logp[b] if self.teacher_logp is not None else None
            with replay(b) if replay is not None else contextlib.nullcontext():
                hidden = self._hidden(model, self.batches[b])
            total += chunked_kl_sum(hidden, head, self.teacher_hidden[b].to(model.device), self.teacher_head, teacher_logp=logp)
        return total


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
    ``seconds``: a time budget's share for the measurements. They are then made one batch of ``blocks``
    at a time, and another batch is measured only while the time the last one took still fits in what is
    left of the share (at least one batch). The decision rests on a whole batch of measurements, not on a
    timed pass: one pass, timed at a moment the host was slow, made the default run measure on 4 of its
    8 blocks where 8 fitted (benchmarks/RESULTS.md, "The planner's measurements under a short time
    budget"). The costs are the same, bit for bit, as those measured on every batch at once (each is a
    sum over the batches' positions, added in the same order). A batch's time (``batch_seconds``) holds its
    teacher pass, round trips and measurements; the round trips are made again for each batch, the price of
    deciding on measured time."""
    t0 = _now()
    # under a time budget each batch's teacher pass is made, and timed, with its measurements
    meter = _KLMeter(model, blocks, keep_teacher_logprobs=keep_teacher_logprobs, batches=0 if seconds is not None else None)
    groups = _group_modules(model)
    channels = ([select_mlp_channels(mlp_channel_importance(model, blocks), f) for f in mlp_fractions]
                if mlp_fractions else [])
    if seconds is None:
        sums = _kl_sums(model, meter, groups, candidates, channels, range(len(meter.batches)), progress)
        batch_seconds: list[float] = []
    else:
        sums, batch_seconds = None, []
        while True:
            t1 = _now()
            meter.use(len(meter.batches) + 1)
            part = _kl_sums(model, meter, groups, candidates, channels, [len(meter.batches) - 1], progress)
            sums = part if sums is None else sums.plus(part)
            batch_seconds.append(_now() - t1)
            fits = _now() - t0 + batch_seconds[-1] <= seconds
            if len(meter.batches) == len(meter.available) or not fits:
                break
    n = meter.tokens
    return Sensitivity(n, {g: {name: per_token(kl, n) for name, kl in f.items()} for g, f in sums.formats.items()},
                       [per_token(kl, n) for kl in sums.blocks],
                       {f"{f:g}": per_token(kl, n) for f, kl in zip(mlp_fractions, sums.mlp_width)},
                       _now() - t0, sum(len(ids) for ids in meter.batches), batch_seconds or None)


def per_token(total: float, tokens: int) -> float:
    """A KL sum over positions as nats per token; rounding can leave a tiny negative sum where nothing changed."""
    return max(total / tokens, 0.0)


@dataclass
class _Sums:
    """The KL sums over positions (not yet per token) of every measurement, on some of the batches."""

    formats: dict[str, dict[str, float]]
    blocks: list[float]
    mlp_width: list[float]

    def plus(self, other: _Sums) -> _Sums:
        return _Sums({g: {n: kl + other.formats[g][n] for n, kl in f.items()} for g, f in self.formats.items()},
                     [a + b for a, b in zip(self.blocks, other.blocks)], [a + b for a, b in zip(self.mlp_width, other.mlp_width)])


def _kl_sums(model: Any, meter: _KLMeter, groups: dict[str, list[Any]], candidates: list[str],
             channels: list[list[list[int]]], batches: Iterable[int], progress: Callable[[int], None] | None) -> _Sums:
    """Every measurement on the meter's ``batches``: each tensor group at each format it fits, each block
    skipped, each MLP width (``channels``: the kept channels of every block, one entry per width)."""
    def step() -> None:
        if progress:
            progress(1)

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
            formats[group][name] = 0.0 if unchanged else meter.kl_sum(model, batches)
            step()
        for m, w in zip(modules, originals):
            m.weight.data = w
    skipped = []
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if i == 0:
            handle = layer.register_forward_hook(skip_block, with_kwargs=True)
            try:
                skipped.append(meter.kl_sum(model, batches))
            finally:
                handle.remove()
        else:  # blocks 0 .. i-1 give the teacher's outputs back uncomputed, block i passes block i-1's on
            skipped.append(meter.kl_sum(model, batches, replay=lambda b, i=i: replayed(
                layers[:i + 1], [*meter.block_outputs[b][:i], meter.block_outputs[b][i - 1]])))
        step()
    width = []
    for kept in channels:
        with mlp_width_applied(model, kept):
            width.append(meter.kl_sum(model, batches))
        step()
    return _Sums(formats, skipped, width)


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
