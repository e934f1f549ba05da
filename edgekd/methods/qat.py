"""Quantization-aware training on the exact grid of the shipped format: prepare -> train -> convert.

:func:`prepare` replaces every weight the exporters will quantize by its round trip through the
format's reference quantizer (edgekd.formats) in the forward pass, with a straight-through
estimator in the backward pass (Bengio et al. 2013): the gradient reaches the fp32 master
weight unchanged. Training is the ordinary distillation loop (edgekd.methods.distill), which
knows nothing of quantization: :func:`prepare` hands it the extra parameter groups and the
after-step hook that learned clip factors need. Distilling from the unquantized teacher (QAD)
follows torchao's QAT recipe, but on the exact grid of the shipped file: GGUF Q4_0's grid
(``d = max / -8``, codes 0..15) differs from torchao's symmetric int4 grid, so torchao's
fake-quantizer would train for a different file.

:func:`convert` writes the round-tripped weights into the model: the torch model then *is* the
shipped model in fp32 arithmetic, and re-quantizing it on export reproduces the same codes and
scales (the round trip is a fixed point on the grid). :func:`qat_kd` is the whole recipe, the
one the pipeline's ``qat`` stage and the benchmarks run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils import parametrize

from .. import kquants as kq
from ..errors import EdgekdError
from ..families import family_of
from ..formats import FORMATS, FormatPlan, WeightFormat

CLIP_MIN = 0.5  # learned clip factors stay in [CLIP_MIN, 1]; <= 1 keeps the export exact (formats.torch_round_trip_q4_0)
LEARNED_CLIP_LR_SCALE = 20.0  # clip factors are ~1 where weights are ~1e-2: a larger Adam step


class _RoundTripSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: str, clip: torch.Tensor | None) -> torch.Tensor:
        return FORMATS[fmt].torch_round_trip(w, clip)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _LearnedClip(torch.autograd.Function):
    """Round trip with a trainable per-block clip factor (formats with a ``grid``: Q4_0).

    Forward: exactly the format's round trip (the shipped grid). Backward: straight-through
    for the weight; for the clip factor ``c`` of a block with reference scale ``d0`` and step
    ``s = c d0``, the LSQ gradient (Esser et al. 2020, "Learned Step Size Quantization"):
    d out / d s = q - w / s inside the grid and q at a saturated code, so
    d out / d c = d0 (q - w / s) there. Factors outside [CLIP_MIN, 1] get no gradient.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, clip: torch.Tensor, fmt: str) -> torch.Tensor:
        ctx.save_for_backward(w, clip)
        ctx.fmt = fmt
        return FORMATS[fmt].torch_round_trip(w, clip.clamp(CLIP_MIN, 1.0))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        w, clip = ctx.saved_tensors
        fmt = FORMATS[ctx.fmt]
        rows, cols = w.shape
        b = w.float().reshape(rows, cols // fmt.block, fmt.block)
        d0, _, x, codes = fmt.grid(b, clip.clamp(CLIP_MIN, 1.0))
        q = codes - float(fmt.code_offset)
        rounded = x + fmt.code_offset + 0.5
        inside = (rounded >= 0) & (rounded < fmt.levels)
        d_out_d_s = torch.where(inside, q - x, q)
        g_clip = (grad.float().reshape(b.shape) * d_out_d_s * d0).sum(-1, keepdim=True)
        g_clip = g_clip * ((clip >= CLIP_MIN) & (clip <= 1.0))
        return grad, g_clip.to(clip.dtype), None


class _GridSTE(torch.autograd.Function):
    """Round trip onto a fixed grid (K-quants, edgekd.kquants), straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, step: torch.Tensor, mn: torch.Tensor | None, bits: int) -> torch.Tensor:
        return kq.torch_grid_round_trip(w, step, mn, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad, None, None, None


class FakeQuant(torch.nn.Module):
    """Parametrization: weight -> its exact round trip through ``fmt`` (STE gradient).

    ``clip``: per-block scale factors (see edgekd.methods.clip_search), kept as a buffer so
    checkpoints carry them, or as a trainable parameter with ``learn_clip`` (LSQ-style).
    ``grid``: for fixed-grid formats (K-quants), the reference quantizer's blocks of the weight
    at QAT's start; training rounds onto their scales and minimums, and the exporters write the
    codes on the same grid (:func:`grids`).
    """

    def __init__(self, fmt: WeightFormat, clip: torch.Tensor | None = None, learn_clip: bool = False,
                 grid: kq.KBlocks | None = None):
        super().__init__()
        self.fmt = fmt.name
        if learn_clip:
            self.clip = torch.nn.Parameter(clip.clone().float())
        else:
            self.register_buffer("clip", clip)
        self.grid = grid
        if grid is not None:
            step, mn = kq.torch_grids(grid)
            self.register_buffer("grid_step", step)
            self.register_buffer("grid_min", mn)
            self.bits = kq.SPEC[grid.kind][0]

    product_weight = False  # set by prepare() on block linears: the round trip comes in autocast's dtype

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # not a learned clip's round trip: it saves tensors for backward, and a block's recomputation
        # under checkpointing must save what its forward pass saved
        if self.product_weight and _PRODUCT_CACHE is not None and not isinstance(self.clip, torch.nn.Parameter):
            cached = _PRODUCT_CACHE.get(id(self))
            if cached is None:
                cached = _PRODUCT_CACHE[id(self)] = self._round_trip(w)
            return cached
        return self._round_trip(w)

    def _round_trip(self, w: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            out = _GridSTE.apply(w, self.grid_step, self.grid_min, self.bits)
        elif isinstance(self.clip, torch.nn.Parameter):
            out = _LearnedClip.apply(w, self.clip, self.fmt)
        else:
            out = _RoundTripSTE.apply(w, self.fmt, self.clip)
        if self.product_weight and torch.is_autocast_enabled(w.device.type):
            # the cast autocast makes for the product anyway, made here once: cached with the round trip
            # (round_trips_cached) a block's recomputation under checkpointing reuses both
            out = out.to(torch.get_autocast_dtype(w.device.type))
        return out


def quantized_tensors(model: Any, plan: FormatPlan) -> list[tuple[Any, WeightFormat]]:
    """(module, format) of every tensor the exporters quantize, as the plan assigns them.

    A tied output head shares its Parameter with the token embedding and gets its format.
    A format the tensor's rows cannot hold (a K-quant on rows not a multiple of 256) is refused here."""
    family = family_of(model)
    out = [(mod, plan.format_of(role, layer), f"blk.{layer}.{role}") for layer, role, mod in family.linear_modules(model)]
    embedding = plan.format_of("embedding")
    out.append((family.embedding_module(model), embedding, "embedding"))
    out.append((family.head_module(model), embedding if family.tied(model) else plan.format_of("head"), "head"))
    for mod, fmt, name in out:
        cols = mod.weight.shape[1]
        if not fmt.fits(cols):
            fits = [n for n, f in FORMATS.items() if f.linear and f.quantized and f.fits(cols)]
            raise EdgekdError(f"{name} cannot be stored as {fmt.name}: its rows are {cols} weights long, {fmt.name} needs a multiple of {fmt.block}",
                              fix=f"give it one of {', '.join(fits)} in deployment.tensor_formats, or set tensor_formats: auto")
    return [(mod, fmt) for mod, fmt, _ in out]


def fake_quantized_params(model: Any, plan: FormatPlan) -> int:
    """Weights :func:`prepare` fake-quantizes under ``plan`` (a tied table once)."""
    seen = {id(mod.weight): mod.weight.numel() for mod, fmt in quantized_tensors(model, plan) if not fmt.identity}
    return sum(seen.values())


def weight_names(model: Any) -> dict[int, str]:
    """``id(module)`` -> the state-dict name of its weight (the key grids are saved under)."""
    return {id(mod): f"{name}.weight" for name, mod in model.named_modules(remove_duplicate=False)}


def grids(model: Any) -> dict[str, kq.KBlocks]:
    """The fixed grids of a converted model's K-quant tensors, by weight name (empty when it has none)."""
    return dict(getattr(model, GRIDS_ATTRIBUTE, None) or {})


GRIDS_ATTRIBUTE = "edgekd_grids"  # set on the model by convert(); saved next to it as GRIDS_FILE
GRIDS_FILE = "kquant-grids.npz"


@dataclass
class Prepared:
    """What the training loop needs beyond the model: learned clip factors train with their own
    step size and no weight decay, and are kept in [CLIP_MIN, 1] after every step."""

    param_groups: list[dict[str, Any]] = field(default_factory=list)
    after_step: Callable[[], None] | None = None


def prepare(model: Any, plan: FormatPlan, clips: dict[Any, torch.Tensor] | None = None, learn_clip: bool = False,
            clip_lr_scale: float = LEARNED_CLIP_LR_SCALE) -> Prepared:
    """Register fake-quant parametrizations in place (with per-block clip factors where given).

    ``learn_clip``: linear layers whose format supports clipping train their clip factors
    (starting from ``clips``, or 1.0).
    """
    learned = []
    products = {id(mod) for _, _, mod in family_of(model).linear_modules(model)}  # not the table: its lookup stays fp32
    for mod, fmt in quantized_tensors(model, plan):
        if fmt.identity:
            continue
        if fmt.fixed_grid:
            grid = fmt.quantize(mod.weight.detach().float().cpu().numpy())
            fake = FakeQuant(fmt, grid=grid)
            fake.product_weight = id(mod) in products
            parametrize.register_parametrization(mod, "weight", fake, unsafe=True)
            continue
        clip = (clips or {}).get(mod)
        learn = learn_clip and fmt.grid is not None and isinstance(mod, torch.nn.Linear)
        if learn and clip is None:
            rows, cols = mod.weight.shape
            clip = torch.ones(rows, cols // fmt.block, 1, device=mod.weight.device)
        fake = FakeQuant(fmt, clip, learn)
        fake.product_weight = id(mod) in products
        parametrize.register_parametrization(mod, "weight", fake, unsafe=True)
        if learn:
            learned.append(fake.clip)
    if not learned:
        return Prepared()

    def keep_in_range() -> None:
        with torch.no_grad():
            for p in learned:
                p.clamp_(CLIP_MIN, 1.0)

    return Prepared([{"params": learned, "lr_scale": clip_lr_scale, "weight_decay": 0.0}], keep_in_range)


_PRODUCT_CACHE: dict[int, torch.Tensor] | None = None  # set inside round_trips_cached()


@contextlib.contextmanager
def round_trips_cached(on: bool = True) -> Iterator[None]:
    """Inside, each block linear's fake-quantized weight is computed once: its round trip (and,
    under autocast, its cast) serves the forward pass and, under activation checkpointing, its
    block's recomputation in backward, instead of being made again there. The cost: every block's
    product weights are alive from the forward pass to the end of backward (edgekd.methods.memory
    counts them; ``DistillConfig.recompute_round_trips`` turns this off when memory is short). The
    token table is not held (``parametrize.cached`` would keep its lookup's round trip beside the head's)."""
    global _PRODUCT_CACHE
    if not on or _PRODUCT_CACHE is not None:
        yield
        return
    _PRODUCT_CACHE = {}
    try:
        yield
    finally:
        _PRODUCT_CACHE = None


def learned_clip_stats(model: Any) -> dict[str, float]:
    """Mean and range of the trained clip factors (empty when none are trained)."""
    vals = [p.detach().clamp(CLIP_MIN, 1.0).flatten() for m in model.modules() if isinstance(m, FakeQuant)
            for p in [m.clip] if isinstance(p, torch.nn.Parameter)]
    if not vals:
        return {}
    v = torch.cat(vals)
    return {"learned_clip_mean": float(v.mean()), "learned_clip_min": float(v.min()), "learned_clip_at_1": float((v >= 1.0).float().mean())}


def is_prepared(model: Any) -> bool:
    return any(isinstance(m, FakeQuant) for m in model.modules())


def convert(model: Any, plan: FormatPlan, clips: dict[Any, torch.Tensor] | None = None) -> Any:
    """Remove QAT parametrizations, leaving the exactly round-tripped weights (what ships).

    An unprepared model is round-tripped directly (post-training quantization, with ``clips``).
    The grids of K-quant tensors are left on the model (:func:`grids`) for the exporters."""
    family = family_of(model)
    embedding, head = family.embedding_module(model), family.head_module(model)
    if is_prepared(model):
        tied = head.parametrizations.weight.original is embedding.parametrizations.weight.original
    else:
        tied = head.weight is embedding.weight
    fixed: dict[str, kq.KBlocks] = {}
    names = weight_names(model)
    grid_of: dict[int, kq.KBlocks] = {}  # by weight tensor: a tied head is its embedding, quantized once
    for mod, fmt in quantized_tensors(model, plan):
        name = names[id(mod)]
        if parametrize.is_parametrized(mod, "weight"):
            fake = mod.parametrizations.weight[0]
            if fake.grid is not None:
                fixed[name] = fake.grid
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        elif fmt.fixed_grid:
            key = id(mod.weight)
            if key not in grid_of:  # re-quantizing a K-quant's output need not reproduce it: never twice
                grid_of[key] = fmt.quantize(mod.weight.detach().float().cpu().numpy())
                with torch.no_grad():
                    mod.weight.data = torch.from_numpy(kq.dequantize(grid_of[key])).to(mod.weight.device)
            fixed[name] = grid_of[key]
        else:
            with torch.no_grad():
                mod.weight.data = fmt.torch_round_trip(mod.weight.data, (clips or {}).get(mod))
    setattr(model, GRIDS_ATTRIBUTE, fixed)
    if tied:  # removal leaves two tensors; tie them again so the model saves and exports as tied
        head.weight = family.embedding_module(model).weight
    return model
