"""Per-block scale clipping before QAT: a finer grid for most weights at the cost of a few outliers.

A Q4_0 file may store any fp16 scale; llama.cpp's reference picks ``max / -8``, which spends a
whole code level on one outlier. Shrinking the scale trades a larger error on the few largest
weights for a finer grid on all others (clipping, as in llama.cpp's ``make_qx_quants`` search
and OmniQuant's learnable weight clipping). The error is weighted by each input channel's mean
squared activation (llama.cpp's imatrix; GPTQ/AWQ use the same second moment). Applies to the
formats whose ``clip_search`` flag says a clipped block still exports exactly (edgekd.formats).
"""

from __future__ import annotations

from typing import Any

import torch

from ..families import family_of
from ..formats import FormatPlan, WeightFormat
from .qat import quantized_tensors

CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(21))  # 1.00, 0.98, ..., 0.60


def clippable(model: Any, plan: FormatPlan) -> dict[Any, WeightFormat]:
    """Linear layers (the output head included) whose planned format supports clip search."""
    return {mod: fmt for mod, fmt in quantized_tensors(model, plan) if fmt.clip_search and isinstance(mod, torch.nn.Linear)}


@torch.no_grad()
def input_importance(model: Any, blocks: Any, targets: Any) -> dict[Any, torch.Tensor]:
    """Mean squared input activation per input channel of each linear layer in ``targets``.

    The output error of a linear layer from a weight error ``e`` is ``sum_j a_j e_j``, whose
    expected square over inputs is about ``sum_j E[a_j^2] e_j^2`` when channels are weakly
    correlated: so ``E[a_j^2]`` weighs the squared weight error of channel j (the importance
    matrix of llama.cpp's imatrix quantization; GPTQ/AWQ use the same second moment).
    """
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
def search_clip(w: torch.Tensor, importance: torch.Tensor | None, fmt: WeightFormat,
                grid: tuple[float, ...] = CLIP_GRID) -> tuple[torch.Tensor, float]:
    """Per-block clip factor minimising the importance-weighted squared error of ``fmt``.

    Returns the factors, shape (rows, cols/block, 1), and the weighted error relative to
    round-to-nearest (1.0 = none gained).
    """
    rows, cols = w.shape
    n = fmt.block
    b = w.float().reshape(rows, cols // n, n)
    imp = torch.ones(cols, device=w.device) if importance is None else importance.float().clamp_min(1e-12)
    imp = imp.reshape(1, cols // n, n)
    best_err = best = None
    for c in grid:
        clip = torch.full((rows, cols // n, 1), c, device=w.device)
        err = (imp * (b - fmt.torch_round_trip(w, clip).reshape(b.shape)) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best, rtn_err = err, clip, err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
    return best, float(best_err.sum() / rtn_err.sum().clamp_min(1e-30))


def clip_factors(model: Any, plan: FormatPlan, calibration_blocks: Any) -> tuple[dict[Any, torch.Tensor], dict[str, float]]:
    """Clip factors for every clippable linear layer of ``model``, from a calibration pass."""
    targets = clippable(model, plan)
    if not targets:
        return {}, {}
    importance = input_importance(model, calibration_blocks, targets)
    clips, ratios = {}, []
    for mod, imp in importance.items():
        clips[mod], ratio = search_clip(mod.weight.detach(), imp, targets[mod])
        ratios.append(ratio)
    mean_clip = float(torch.cat([c.flatten() for c in clips.values()]).mean()) if clips else 1.0
    family = family_of(model)
    head = family.head_module(model)
    if family.tied(model) and head in clips:  # one tensor: the token lookup uses the head's clipped grid
        clips[family.embedding_module(model)] = clips[head]
    return clips, {"mean_clip": mean_clip, "weighted_error_vs_round_to_nearest": float(sum(ratios) / max(1, len(ratios)))}
