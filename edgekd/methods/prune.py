"""Block importance, depth pruning, MLP width pruning, and the student->teacher layer map.

Scores come from a calibration pass over training blocks (never the held-out split):

- Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 - E_t[cos(x_i, x_{i+1})], where x_i is
  block i's input hidden state and x_{i+1} its output. Low BI: the block barely changes the
  residual stream, so removing it costs little.
- Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
  Layers"): d(l, n) = arccos(cos(x_l, x_{l+n})) / pi between the input of block l and the
  output of block l+n-1; to drop n blocks, drop the contiguous window with the smallest d.
  The paper uses the last token; we average over all tokens of the calibration blocks.
- Loss increase: the measured increase of the calibration loss when block i alone is skipped.
  Slow (one pass per block) but exact; the reference the cheap scores are ranked against.

Depth pruning keeps a subset of blocks, renumbers their ``layer_idx`` (so the KV cache works)
and updates the config, leaving a normal Hugging Face model. Width pruning of the MLP keeps
the intermediate channels with the largest mean activation magnitude over the calibration
pass (Minitron, Muralidharan et al. 2024), the same count in every block.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import EdgekdError
from ..families import family_of

METHODS = ("block_influence", "angular", "loss_increase")


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    return family_of(model).decoder_layers(model)


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _batches(blocks: np.ndarray, batch_size: int):
    for b0 in range(0, len(blocks), batch_size):
        yield torch.from_numpy(blocks[b0 : b0 + batch_size].astype(np.int64))


@dataclass
class BlockScores:
    block_influence: list[float]
    angular_distance: list[float]  # n = 1
    # window size n -> angular distance of each window start l (len L - n + 1)
    angular_windows: dict[int, list[float]] = field(default_factory=dict)
    loss_increase: list[float] | None = None
    calibration_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["angular_windows"] = {str(k): v for k, v in self.angular_windows.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockScores:
        d = dict(d)
        d["angular_windows"] = {int(k): v for k, v in d.get("angular_windows", {}).items()}
        return cls(**d)


def predict_scoring_peak(config: Any, block_len: int, batch_size: int = 4) -> float:
    """:func:`score_blocks`'s predicted peak resident bytes: every block boundary's hidden states of a
    batch with their unit-normalised copies (no logits: the head runs on the last position only)."""
    from .memory import predict_forward_peak

    return predict_forward_peak(config, batch_size, block_len, logit_copies=0, hidden_copies=2)


@torch.no_grad()
def score_blocks(
    model: Any, blocks: np.ndarray, batch_size: int = 4, max_window: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> BlockScores:
    """One calibration pass: Block Influence and angular distances for all windows up to ``max_window``."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    max_window = max_window or n_layers // 2
    acts: list[torch.Tensor] = [None] * (n_layers + 1)  # x_0 .. x_L (x_{i+1} = output of block i)
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            acts[i] = _hidden(args[0] if args else kwargs["hidden_states"]).float()

        def post(mod, args, out, i=i):
            acts[i + 1] = _hidden(out).float()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    cos_sums = np.zeros((n_layers, max_window + 1))  # [l, n] sum over tokens of cos(x_l, x_{l+n})
    tokens = 0
    try:
        for ids in _batches(blocks, batch_size):
            # only the block boundaries are read: the head runs on the last position alone (no (batch, T, vocab) logits)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            unit = [torch.nn.functional.normalize(a.reshape(-1, a.shape[-1]), dim=-1) for a in acts]
            acts[:] = [None] * len(acts)  # this batch's states go before the next forward pass makes its own
            for start in range(n_layers):
                for n in range(1, min(max_window, n_layers - start) + 1):
                    cos_sums[start, n] += (unit[start] * unit[start + n]).sum(-1).clamp(-1, 1).sum().item()
            tokens += unit[0].shape[0]
            del unit
            if progress:
                progress(len(ids))
    finally:
        for h in handles:
            h.remove()
    mean_cos = cos_sums / max(tokens, 1)
    bi = [float(1 - mean_cos[i, 1]) for i in range(n_layers)]
    ang = lambda c: float(math.acos(max(-1.0, min(1.0, c))) / math.pi)  # noqa: E731
    windows = {
        n: [ang(mean_cos[start, n]) for start in range(n_layers - n + 1)]
        for n in range(1, max_window + 1)
    }
    return BlockScores(bi, windows[1], windows, None, tokens)


@torch.no_grad()
def calibration_loss(model: Any, blocks: np.ndarray, batch_size: int = 4) -> float:
    total, n = 0.0, 0
    for ids in _batches(blocks, batch_size):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        n += ids[:, 1:].numel()
    return total / n


def skip_block(mod: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    """A forward hook that skips a decoder block: it returns its input (the residual stream passes through)."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x


@torch.no_grad()
def loss_increase_scores(model: Any, blocks: np.ndarray, batch_size: int = 4,
                         progress: Callable[[int], None] | None = None) -> list[float]:
    """Calibration loss with block i skipped, minus the full model's loss, for every i."""
    base = calibration_loss(model, blocks, batch_size)
    out = []
    for layer in decoder_layers(model):
        handle = layer.register_forward_hook(skip_block, with_kwargs=True)
        try:
            out.append(calibration_loss(model, blocks, batch_size) - base)
        finally:
            handle.remove()
        if progress:
            progress(1)
    return out


def select_layers(scores: BlockScores, keep: int, method: str) -> list[int]:
    """Indices of the blocks to keep (sorted), by ``method``."""
    n_layers = len(scores.block_influence)
    if not 1 <= keep <= n_layers:
        raise EdgekdError(f"cannot keep {keep} of {n_layers} layers", fix=f"choose between 1 and {n_layers}")
    drop = n_layers - keep
    if drop == 0:
        return list(range(n_layers))
    if method == "block_influence":
        order = np.argsort(scores.block_influence, kind="stable")
        removed = set(order[:drop].tolist())
    elif method == "loss_increase":
        if scores.loss_increase is None:
            raise ValueError("loss_increase scores were not computed")
        removed = set(np.argsort(scores.loss_increase, kind="stable")[:drop].tolist())
    elif method == "angular":
        window = scores.angular_windows.get(drop)
        if window is None:
            raise EdgekdError(f"angular distance was scored for windows up to {max(scores.angular_windows)} blocks, not {drop}",
                              fix="keep more layers, or use prune.method=block_influence")
        start = int(np.argmin(window))
        removed = set(range(start, start + drop))
    else:
        raise EdgekdError(f"unknown pruning method {method!r}", fix=f"choose from {METHODS}")
    return [i for i in range(n_layers) if i not in removed]


def resolve_keep_layers(keep: int | float | str, n_layers: int) -> int | None:
    """An int is a layer count, a float in (0, 1] a fraction; 'auto' returns None (the planner decides)."""
    if keep == "auto":
        return None
    if isinstance(keep, float) and not (keep > 1 and keep.is_integer()):
        if not 0 < keep <= 1:
            raise EdgekdError(f"keep_layers fraction {keep} must be in (0, 1]", fix="e.g. compression.prune.keep_layers=0.8")
        return max(1, round(keep * n_layers))
    k = int(keep)
    if not 1 <= k <= n_layers:
        raise EdgekdError(f"keep_layers={k} but the teacher has {n_layers} layers", fix=f"choose 1..{n_layers}, a fraction, or auto")
    return k


def prune_depth(model: Any, keep: list[int]) -> Any:
    """Keep only blocks ``keep`` (in order), in place; return the model. The result is a normal HF model."""
    family = family_of(model)
    layers = family.decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        attn = family.attention_module(layer)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by this
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    family.set_decoder_layers(model, kept)
    cfg = model.config
    for name in family.per_layer_config:  # per-block config lists follow their blocks (a saved student rebuilds them)
        if getattr(cfg, name, None):
            setattr(cfg, name, [getattr(cfg, name)[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
    return model


@torch.no_grad()
def mlp_channel_importance(model: Any, blocks: np.ndarray, batch_size: int = 4) -> list[torch.Tensor]:
    """Mean |activation| of each MLP intermediate channel (the input of the MLP's output projection), per block."""
    family = family_of(model)
    layers = family.decoder_layers(model)
    sums = [torch.zeros(family.mlp_in_features(layer)) for layer in layers]
    count = [0]
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, i=i):
            a = args[0].float()
            sums[i] += a.abs().reshape(-1, a.shape[-1]).sum(0)
        handles.append(family.mlp_down(layer).register_forward_pre_hook(pre))
    try:
        for ids in _batches(blocks, batch_size):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # the MLPs' inputs only: no (batch, T, vocab) logits
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


def select_mlp_channels(importance: list[torch.Tensor], keep_fraction: float, multiple: int = 64) -> list[list[int]]:
    """The most important MLP channels of every block, the same count in each.

    The count is rounded to a multiple of ``multiple`` so quantisation blocks of 32 along
    the output projection's input dimension stay whole.
    """
    old = len(importance[0])
    new = max(multiple, int(round(old * keep_fraction / multiple)) * multiple)
    if new >= old:
        return [list(range(old)) for _ in importance]
    return [torch.sort(torch.topk(imp, new).indices).values.tolist() for imp in importance]


def apply_mlp_channels(model: Any, channels: list[list[int]]) -> int:
    """Keep only ``channels[i]`` of block i's MLP, in place; returns the new intermediate size."""
    new = len(channels[0])
    if new == model.config.intermediate_size:
        return new
    family = family_of(model)
    for layer, keep_list in zip(family.decoder_layers(model), channels):
        family.replace_mlp(layer, keep_list, _slice_linear)
    model.config.intermediate_size = new
    return new


def prune_mlp_width(model: Any, importance: list[torch.Tensor], keep_fraction: float, multiple: int = 64) -> int:
    """Width pruning in one call (Minitron): select by importance, then slice, in place."""
    return apply_mlp_channels(model, select_mlp_channels(importance, keep_fraction, multiple))


def _slice_linear(lin: torch.nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> torch.nn.Linear:
    rows = None if rows is None else torch.tensor(rows, dtype=torch.long)
    cols = None if cols is None else torch.tensor(cols, dtype=torch.long)
    w = lin.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    out = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    out.weight.data.copy_(w)
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.data[rows] if rows is not None else lin.bias.data)
    return out


def make_student(teacher: Any, keep: list[int]) -> Any:
    """A depth-pruned copy of the teacher (the teacher is left untouched)."""
    return prune_depth(copy.deepcopy(teacher), keep)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (no ties handling beyond stable ordering)."""
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))


# ---------------------------------------------------------------- the plan


@dataclass
class PrunePlan:
    """Which teacher blocks the student keeps (in order: the student->teacher layer map), which
    MLP channels each keeps (None: all), and why that depth. Saved as ``prune/plan.json``."""

    keep: list[int]
    mlp_channels: list[list[int]] | None = None
    depth_plan: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_map(self) -> list[int]:
        return list(self.keep)

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "layer_map": self.layer_map, "mlp_channels": self.mlp_channels, "depth_plan": self.depth_plan}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        return cls(list(d["keep"]), d.get("mlp_channels"), dict(d.get("depth_plan") or {}))

    def make_student(self, teacher: Any) -> Any:
        """The pruned student (deterministic: the same plan always gives the same weights)."""
        student = make_student(teacher, self.keep)
        if self.mlp_channels:
            apply_mlp_channels(student, self.mlp_channels)
        return student.eval()


def plan_pruning(teacher: Any, keep: list[int], mlp_fraction: float, calibration_blocks: np.ndarray,
                 reason: dict[str, Any]) -> PrunePlan:
    """The prune plan that keeps blocks ``keep`` and, when ``mlp_fraction`` < 1, the MLP channels
    with the largest mean activation over the calibration blocks (Minitron)."""
    mlp_channels = None
    if mlp_fraction < 1.0:
        mlp_channels = select_mlp_channels(mlp_channel_importance(teacher, calibration_blocks), mlp_fraction)
    return PrunePlan(list(keep), mlp_channels, reason)
