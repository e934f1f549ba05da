"""QAT-KD, the whole recipe: clip search, prepare, distill from the unquantized teacher, convert.

One function, :func:`qat_kd`, run by the pipeline's ``qat`` stage and by the benchmarks alike.
With no training steps it is post-training quantization on the same grid: searched clip
factors where the format allows them, else round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import FormatPlan
from .clip_search import clip_factors, clippable
from .distill import (
    DistillConfig,
    DistillOutcome,
    apply_memory_settings,
    loss_weights,
    plan_memory,
    run_distillation,
)
from .qat import LEARNED_CLIP_LR_SCALE, convert, fake_quantized_params, learned_clip_stats, prepare
from .step_probe import probe_step_seconds


def qat_config(distill_settings: Any, qat_settings: Any) -> DistillConfig:
    """QAT-KD from the profile's distillation settings with QAT's own steps, learning rate, KD weight
    (``qat.alpha``: 1.0 is pure KD) and loss terms (``qat.losses``: logit KD and every block's hidden-state
    target by default; what each measured is by that setting, edgekd.profiles.QatSettings). No attention term:
    it needs the teacher's eager attention besides."""
    cfg = DistillConfig.from_settings(distill_settings, steps=qat_settings.steps, learning_rate=qat_settings.learning_rate)
    return replace(cfg, **loss_weights(qat_settings.losses), alpha=qat_settings.alpha)


@dataclass
class QatResult:
    model: Any  # weights on the shipped grid (converted)
    plan: FormatPlan
    method: str  # "QAT-KD", "clipped scales", "round-to-nearest" or "no quantization"
    clip_stats: dict[str, float] = field(default_factory=dict)
    outcome: DistillOutcome | None = None
    memory: Any = None  # edgekd.methods.memory.MemoryPlan of the training step
    learned_clip: dict[str, float] = field(default_factory=dict)


def qat_kd(student: Any, teacher: Any, train_blocks: np.ndarray, calibration_blocks: np.ndarray, plan: FormatPlan,
           cfg: DistillConfig | None, *, clip_search: bool = True, learn_clip: bool = False,
           clip_lr_scale: float = LEARNED_CLIP_LR_SCALE, layer_map: list[int] | None = None,
           run_dir: Path | None = None, reporter: Any = None, logit_cache: Any = None,
           fit_steps: Callable[[Callable[[], float]], int] | None = None, deadline: float | None = None,
           memory_gb: float | None = None, memory_target_gb: float | None = None, mixture: Any = None) -> QatResult:
    """Quantize ``student`` (in place) onto ``plan``'s exact grids, training it with ``cfg``
    (None or 0 steps: no training) from the unquantized ``teacher``; checkpoints under ``run_dir``.
    ``fit_steps(probe)``: the number of steps to train, given ``probe()``, the measured seconds
    of one step of the prepared model (a time budget); ``deadline``: training stops early there
    (edgekd.methods.distill.distill); ``memory_gb``: the memory limit training must fit
    (edgekd.methods.memory.fit_memory; None: the machine's), ``memory_target_gb`` the soft target;
    ``mixture``: how batches are drawn (edgekd.methods.mixture; on-policy rows sample with the
    fake-quantized weights)."""
    from ..progress import Reporter

    reporter = reporter or Reporter(quiet=True)
    linear = plan.format_of("linear")
    clips: dict[Any, Any] = {}
    stats: dict[str, float] = {}
    train = cfg is not None and cfg.steps > 0 and linear.quantized
    memory = None
    if train:  # before the clip search's calibration pass grows the heap
        _, memory = plan_memory(student, teacher, cfg, train_blocks.shape[1], logit_cache, memory_gb, stage="QAT-KD",
                                quantized_params=fake_quantized_params(student, plan), target_gb=memory_target_gb)
        apply_memory_settings(cfg, memory)
    if clip_search and clippable(student, plan):
        with reporter.task("searching scale clip factors (calibration pass)"):
            clips, stats = clip_factors(student, plan, calibration_blocks)
    result = QatResult(student, plan, "clipped scales" if clips else "round-to-nearest", stats)
    if not linear.quantized:
        result.method = "no quantization"
    elif train:
        prepared = prepare(student, plan, clips, learn_clip=learn_clip and linear.grid is not None, clip_lr_scale=clip_lr_scale)
        layer_map = layer_map or list(range(student.config.num_hidden_layers))
        if fit_steps is not None:
            cfg.steps = fit_steps(lambda: probe_step_seconds(student, teacher, train_blocks, cfg, layer_map, logit_cache,
                                                             mixture=mixture))
        result.outcome, result.memory = run_distillation(
            student, teacher, train_blocks, cfg, layer_map,
            f"QAT-KD to {linear.name}", reporter, run_dir, logit_cache, prepared.param_groups, prepared.after_step, deadline,
            memory=memory, mixture=mixture)
        result.learned_clip = learned_clip_stats(student)
        result.method = "QAT-KD"
    convert(student, plan, clips)
    return result
