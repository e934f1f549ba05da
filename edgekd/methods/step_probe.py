"""How long one training step of a configuration takes here, measured before a time budget fits the steps.

The forward and backward passes of real batches (edgekd.methods.distill.micro_step), with the
step's memory layout and precision, the models' gradient flags as the loop sets them, the
optimizer's update (at a learning rate of 0: the weights do not change) and its share of on-policy
sampling; nothing is trained.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .distill import DistillConfig, cache_kind, micro_step
from .layout import training_layout
from .memory import bf16_gradients_apply, bf16_product_weights
from .mixture import Mixture
from .on_policy import Rollouts
from .optim import Bf16Gradients, clip_grad_norm, make_optimizer
from .step_losses import needed_terms


def probe_step_seconds(student: Any, teacher: Any, train_blocks: np.ndarray, cfg: DistillConfig, layer_map: list[int],
                       logit_cache: Any = None, probes: int = 3, mixture: Mixture | None = None) -> float:
    """Seconds one training step of ``cfg`` takes here: forward and backward passes of real batches
    and the optimizer's update with its gradient clip, as the loop makes them (the first step warms
    up and is not counted), plus a step's share of on-policy sampling (one generation timed after the
    warm-up, divided by the steps it serves). The update runs at a learning rate of 0 and its
    optimizer is dropped after: no weight changes. The student's weights require gradients and the
    teacher's do not, as in the loop: a student copied from a frozen teacher would otherwise be timed
    without its weights' gradients (measured: 44% more steps planned than fitted). When on-policy
    rows join after a share of the steps (``OnPolicy.start``), both kinds of step are probed and
    weighted by their shares of the stage (``Mixture.phases``)."""
    mixture = mixture or Mixture.single(len(train_blocks))
    return sum(share * _probe(student, teacher, train_blocks, cfg, layer_map, logit_cache, probes, kind)
               for share, kind in mixture.phases())


def _probe(student: Any, teacher: Any, train_blocks: np.ndarray, cfg: DistillConfig, layer_map: list[int],
           logit_cache: Any, probes: int, mixture: Mixture) -> float:
    """:func:`probe_step_seconds` for a mixture whose every step draws the same kinds of rows."""
    _, _, want_attn = needed_terms(cfg)
    if want_attn:
        student.set_attn_implementation("eager")
        teacher.set_attn_implementation("eager")
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)  # as the loop sets them (edgekd.methods.distill.distill)
    times, sampling = [], 0.0
    rollouts = Rollouts(mixture, cfg) if mixture.on_policy_share else None
    held = Bf16Gradients(bf16_product_weights(student)) if bf16_gradients_apply(cfg) else None  # the step's own memory
    params = list(student.parameters())
    optimizer = make_optimizer([{"params": params}], 0.0, cfg.weight_decay, cfg.optimizer_state)
    if held is not None and hasattr(optimizer, "held"):
        optimizer.held = held
    try:
        with training_layout(student, teacher, cfg, cached=cache_kind(logit_cache)):
            if hasattr(optimizer, "init_state"):  # moments before the first step's activations, as in the loop
                optimizer.init_state()
            for probe in range(probes):
                # a stage of fewer steps than probes times its own batches again: a teacher cache holds
                # only the blocks the planned steps read (edgekd.stages.distill.cache_rows)
                step, t0, sampled = probe % max(1, cfg.steps), time.perf_counter(), 0.0
                for micro in range(cfg.grad_accum):
                    terms, _ = micro_step(student, teacher, train_blocks, cfg, layer_map, mixture, step, micro, 0, 1,
                                          params[0].device, logit_cache, rollouts=rollouts)
                    sampled += terms.get("sampling_s", 0.0)
                if cfg.max_grad_norm:
                    clip_grad_norm(params, cfg.max_grad_norm, held)
                optimizer.step()  # learning rate 0: the update's time, not its change
                optimizer.zero_grad(set_to_none=True)
                if held is not None:
                    held.clear()
                times.append(time.perf_counter() - t0 - sampled)
            if rollouts is not None:  # one generation, warm, spread over the steps it serves
                start, end = rollouts.generation_of(probes)
                sampling = rollouts.refill(student, train_blocks, probes) / (end - start)
    finally:
        if held is not None:
            held.remove()
        optimizer.state.clear()  # the moments' memory back before training allocates its own
        student.zero_grad(set_to_none=True)
        student.eval()
        if want_attn:
            student.set_attn_implementation("sdpa")
            teacher.set_attn_implementation("sdpa")
    return float(np.median(times[1:] if len(times) > 1 else times)) + sampling
