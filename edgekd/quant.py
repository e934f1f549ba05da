"""Quantization-aware training for the profile's weight format, and PTQ baselines.

QAT replaces every weight the exporter will quantize by its round trip through the
reference quantizer of :mod:`edgekd.formats` in the forward pass, with a straight-through
estimator in the backward pass (Bengio et al. 2013): the gradient reaches the fp32 master
weight unchanged. Training then distills from the unquantized teacher (QAD), as in
torchao's QAT recipe, but on the exact grid of the shipped file: GGUF Q4_0's grid
(``d = max / -8``, codes 0..15) differs from torchao's symmetric int4 grid, so torchao's
fake-quantizer would train for a different file.

After training, :func:`materialize` writes the round-tripped weights into the model: the
torch model then *is* the shipped model in fp32 arithmetic, and re-quantizing it on export
reproduces the same codes and scales (the round trip is a fixed point on the grid).
torchao is used only for the torchao int4 PTQ baseline, in :func:`torchao_int4_ptq`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from .formats import EMBEDDING_FORMAT, q4_0_grid, torch_round_trip

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _RoundTripSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: str, clip: torch.Tensor | None) -> torch.Tensor:
        return torch_round_trip(w, fmt, clip)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


CLIP_MIN = 0.5  # learned clip factors stay in [CLIP_MIN, 1]; <= 1 keeps the export exact (formats.torch_round_trip)
LEARNED_CLIP_LR_SCALE = 20.0  # clip factors are ~1 where weights are ~1e-2: a larger Adam step


class _Q4_0LearnedClip(torch.autograd.Function):
    """Q4_0 round trip with a trainable per-block clip factor.

    Forward: exactly :func:`torch_round_trip` (the shipped grid). Backward: straight-through
    for the weight; for the clip factor ``c`` of a block with reference scale ``d0 = max / -8``
    and step ``s = c d0``, the LSQ gradient (Esser et al. 2020, "Learned Step Size
    Quantization"): d out / d s = q - w / s inside the grid and q at a saturated code,
    so d out / d c = d0 (q - w / s) there. Factors outside [CLIP_MIN, 1] get no gradient.
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, clip)
        return torch_round_trip(w, "q4_0", clip.clamp(CLIP_MIN, 1.0))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, clip = ctx.saved_tensors
        rows, cols = w.shape
        b = w.float().reshape(rows, cols // 32, 32)
        d0, _, x, codes = q4_0_grid(b, clip.clamp(CLIP_MIN, 1.0))
        q = codes - 8.0
        inside = (x + 8.5 >= 0) & (x + 8.5 < 16)
        d_out_d_s = torch.where(inside, q - x, q)
        g_clip = (grad.float().reshape(b.shape) * d_out_d_s * d0).sum(-1, keepdim=True)
        g_clip = g_clip * ((clip >= CLIP_MIN) & (clip <= 1.0))
        return grad, g_clip.to(clip.dtype)


class FakeQuant(torch.nn.Module):
    """Parametrization: weight -> its exact round trip through ``fmt`` (STE gradient).

    ``clip``: per-block scale factors for Q4_0 (see :func:`search_clip`), kept as a buffer so
    checkpoints carry them, or as a trainable parameter with ``learn_clip`` (LSQ-style).
    """

    def __init__(self, fmt: str, clip: torch.Tensor | None = None, learn_clip: bool = False):
        super().__init__()
        self.fmt = fmt
        if learn_clip:
            self.clip = torch.nn.Parameter(clip.clone().float())
        else:
            self.register_buffer("clip", clip)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if isinstance(self.clip, torch.nn.Parameter):
            return _Q4_0LearnedClip.apply(w, self.clip)
        return _RoundTripSTE.apply(w, self.fmt, self.clip)


def quantized_modules(model: Any, weight_format: str) -> list[tuple[Any, str]]:
    """(module, format) for every tensor the exporters quantize: the policy of formats.py."""
    out = []
    for layer in model.model.layers:
        for name in LINEAR_NAMES:
            mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name, None)
            if mod is not None:
                out.append((mod, weight_format))
    emb_fmt = EMBEDDING_FORMAT[weight_format]
    out.append((model.model.embed_tokens, emb_fmt))
    out.append((model.lm_head, emb_fmt))  # tied: the same Parameter, quantized the same way
    return out


def prepare_qat(model: Any, weight_format: str, clips: dict[Any, torch.Tensor] | None = None, learn_clip: bool = False) -> Any:
    """Register fake-quant parametrizations in place (with per-block clip factors where given).

    ``learn_clip``: Q4_0 linear layers train their clip factors (starting from ``clips``, or 1.0).
    """
    for mod, fmt in quantized_modules(model, weight_format):
        if fmt in ("f32",):
            continue
        clip = (clips or {}).get(mod)
        learn = learn_clip and fmt == "q4_0" and isinstance(mod, torch.nn.Linear)
        if learn and clip is None:
            rows, cols = mod.weight.shape
            clip = torch.ones(rows, cols // 32, 1, device=mod.weight.device)
        parametrize.register_parametrization(mod, "weight", FakeQuant(fmt, clip, learn), unsafe=True)
    return model


def learned_clip_stats(model: Any) -> dict[str, float]:
    """Mean and range of the trained clip factors (empty when none are trained)."""
    vals = [p.detach().clamp(CLIP_MIN, 1.0).flatten() for n, p in model.named_parameters() if n.endswith(".clip")]
    if not vals:
        return {}
    v = torch.cat(vals)
    return {"learned_clip_mean": float(v.mean()), "learned_clip_min": float(v.min()), "learned_clip_at_1": float((v >= 1.0).float().mean())}


# ---------------------------------------------------------------- scale clipping


CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(21))  # 1.00, 0.98, ..., 0.60


@torch.no_grad()
def input_importance(model: Any, blocks: Any, weight_format: str) -> dict[Any, torch.Tensor]:
    """Mean squared input activation per input channel of every quantized linear layer.

    The output error of a linear layer from a weight error ``e`` is ``sum_j a_j e_j``, whose
    expected square over inputs is about ``sum_j E[a_j^2] e_j^2`` when channels are weakly
    correlated: so ``E[a_j^2]`` weighs the squared weight error of channel j (the importance
    matrix of llama.cpp's imatrix quantization; GPTQ/AWQ use the same second moment).
    """
    targets = {mod for mod, fmt in quantized_modules(model, weight_format) if fmt == "q4_0" and isinstance(mod, torch.nn.Linear)}
    sums: dict[Any, torch.Tensor] = {}
    counts: dict[Any, int] = {}

    def hook(mod: Any, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[mod] = sums.get(mod, 0) + (x * x).sum(dim=0)
        counts[mod] = counts.get(mod, 0) + x.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in targets]
    try:
        for row in blocks:
            model(input_ids=torch.as_tensor(row[None].astype("int64")).to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {m: sums[m] / counts[m] for m in sums}


@torch.no_grad()
def search_clip(w: torch.Tensor, importance: torch.Tensor | None, grid: tuple[float, ...] = CLIP_GRID) -> tuple[torch.Tensor, float]:
    """Per-block clip factor minimising the importance-weighted squared error of Q4_0.

    A Q4_0 file may store any fp16 scale; llama.cpp's reference picks ``max / -8``, which
    spends a whole code level on one outlier. Shrinking the scale trades a larger error on
    the few largest weights for a finer grid on all others (clipping, as in llama.cpp's
    ``make_qx_quants`` search and OmniQuant's learnable weight clipping). Returns the factors,
    shape (rows, cols/32, 1), and the weighted error relative to round-to-nearest (1.0 = none gained).
    """
    rows, cols = w.shape
    b = w.float().reshape(rows, cols // 32, 32)
    imp = torch.ones(cols, device=w.device) if importance is None else importance.float().clamp_min(1e-12)
    imp = imp.reshape(1, cols // 32, 32)
    best_err = best = None
    for c in grid:
        clip = torch.full((rows, cols // 32, 1), c, device=w.device)
        err = (imp * (b - torch_round_trip(w, "q4_0", clip).reshape(b.shape)) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best, rtn_err = err, clip, err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
    return best, float(best_err.sum() / rtn_err.sum().clamp_min(1e-30))


def clip_factors(model: Any, weight_format: str, calibration_blocks: Any) -> tuple[dict[Any, torch.Tensor], dict[str, float]]:
    """Clip factors for every Q4_0 linear layer of ``model``, from a calibration pass."""
    if weight_format != "q4_0":
        return {}, {}
    importance = input_importance(model, calibration_blocks, weight_format)
    clips, ratios = {}, []
    for mod, imp in importance.items():
        clips[mod], ratio = search_clip(mod.weight.detach(), imp)
        ratios.append(ratio)
    mean_clip = float(torch.cat([c.flatten() for c in clips.values()]).mean()) if clips else 1.0
    return clips, {"mean_clip": mean_clip, "weighted_error_vs_round_to_nearest": float(sum(ratios) / max(1, len(ratios)))}


def is_prepared(model: Any) -> bool:
    return parametrize.is_parametrized(model.model.layers[0].self_attn.q_proj)


def materialize(model: Any, weight_format: str, clips: dict[Any, torch.Tensor] | None = None) -> Any:
    """Remove QAT parametrizations, leaving the exactly round-tripped weights (what ships)."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight if not is_prepared(model) else \
        model.lm_head.parametrizations.weight.original is model.model.embed_tokens.parametrizations.weight.original
    for mod, fmt in quantized_modules(model, weight_format):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        else:
            with torch.no_grad():
                mod.weight.data = torch_round_trip(mod.weight.data, fmt, (clips or {}).get(mod))
    if tied:  # removal leaves two tensors; tie them again so the model saves and exports as tied
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def torchao_int4_ptq(model: Any, group_size: int = 32) -> Any:
    """torchao's int4 weight-only PTQ (symmetric, groups of 32) on CPU, as a baseline row.

    Uses ``IntxWeightOnlyConfig`` (its CPU path); ``Int4WeightOnlyConfig`` needs CUDA to convert.
    """
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def is_block_linear(mod: torch.nn.Module, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and ".layers." in fqn

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)), filter_fn=is_block_linear)
    return model
