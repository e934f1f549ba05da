"""The loss terms of one distillation micro-batch: the teacher's and the student's forward passes
and the weighted sum the loop (edgekd.methods.distill) takes the gradient of.

    L = w_logit * [(1 - a) CE + a T^2 D(teacher || student)]       (Hinton et al. 2015)
      + w_hidden * hidden-state loss over mapped layers             (FitNets, TinyBERT)
      + w_attn * KL between mapped attention distributions          (TinyBERT, MiniLM)

The logit term is taken a chunk of positions at a time (edgekd.methods.chunked_head), so neither
model's (batch, seq, vocab) logits exist; the teacher's targets may come from a cache instead.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..families import family_of
from .chunked_head import chunked_kd_loss, forward_to_hidden, head_of
from .losses import attention_kl, hidden_state_loss
from .precision import forward_precision


def needed_terms(cfg: Any) -> tuple[bool, bool, bool]:
    """Which of (logit, hidden-state, attention) terms the config weighs: the passes must produce them."""
    logits = cfg.w_logit > 0 and cfg.alpha > 0
    return logits, cfg.w_hidden > 0, cfg.w_attention > 0


def reads_teacher_cache(cfg: Any, kind: str) -> bool:
    """Whether a step with ``cfg``'s loss terms takes teacher targets from a cache of ``kind``. A logit
    cache ("sample", "topk") stands in for the teacher's logits. A hidden-state cache ("hidden") holds the
    teacher's final hidden states, which spare the teacher's pass only to a step that needs nothing else
    of it: hidden-state and attention terms run the teacher, and that pass computes those states anyway."""
    logits, hidden, attention = needed_terms(cfg)
    return logits and (kind != "hidden" or not (hidden or attention))


def _hidden_pairs(s_out: Any, t_out: Any, layer_map: list[int], teacher: Any) -> tuple[list, list]:
    """Student block outputs and the outputs of the teacher blocks they map to.

    ``hidden_states[i + 1]`` is block i's output, except the last entry, which transformers
    returns after the final norm; the teacher target of the student's last block is normed
    the same way so the two are comparable.
    """
    s_hs, t_hs = s_out.hidden_states, t_out.hidden_states
    n_student, n_teacher = len(s_hs) - 1, len(t_hs) - 1
    students, targets = [], []
    for i, j in enumerate(layer_map):
        last_student, last_teacher = i == n_student - 1, j == n_teacher - 1
        if last_teacher and not last_student:
            continue  # a non-final student block mapped to the teacher's (normed) last output: skip
        students.append(s_hs[i + 1])
        targets.append(family_of(teacher).final_norm_module(teacher)(t_hs[j + 1]) if last_student and not last_teacher else t_hs[j + 1])
    return students, targets


def distill_step_losses(student: Any, teacher: Any, ids: torch.Tensor, cfg: Any, layer_map: list[int],
                        cached: tuple | None = None) -> dict[str, torch.Tensor]:
    """Loss terms of one micro-batch. ``cached``: the teacher's cached targets for it, (indices,
    log-probs, kind) of a logit cache or (final hidden states, "hidden") of a hidden-state cache."""
    want_logits, want_hidden, want_attn = needed_terms(cfg)
    cached_hidden = cached[0] if cached is not None and cached[-1] == "hidden" else None
    cached_logits = cached if cached is not None and cached_hidden is None else None
    head_logits = want_logits and cached_logits is None  # the teacher's head on its final hidden states
    autocast = functools.partial(forward_precision, cfg.precision, ids.device.type, not cfg.gradient_checkpointing)
    runs = (head_logits and cached_hidden is None) or want_hidden or want_attn
    with torch.no_grad(), autocast():
        t_out, t_hidden = forward_to_hidden(teacher, ids, output_hidden_states=want_hidden, output_attentions=want_attn) \
            if runs else (None, None)
    t_final = cached_hidden if cached_hidden is not None else (t_hidden[:, :-1] if head_logits else None)
    with autocast():
        s_out, s_hidden = forward_to_hidden(student, ids, output_hidden_states=want_hidden, output_attentions=want_attn)
        # the head and the logit losses a chunk of positions at a time: no (batch, seq, vocab) logits
        terms = chunked_kd_loss(s_hidden[:, :-1], head_of(student), ids[:, 1:], cfg.alpha if want_logits else 0.0,
                                cfg.temperature, cfg.kl, teacher_hidden=t_final if head_logits else None,
                                teacher_head=head_of(teacher) if head_logits else None,
                                teacher_cached=cached_logits if want_logits else None)
    total = (cfg.w_logit if cfg.w_logit > 0 else 1.0) * terms["loss"]  # with no logit weight, the loss is CE alone
    out = {"ce": terms["ce"], "kd": terms["kd"]}
    if want_hidden:
        s_h, t_h = _hidden_pairs(s_out, t_out, layer_map, teacher)
        out["hidden"] = hidden_state_loss(s_h, t_h, cfg.hidden_kind)
        total = total + cfg.w_hidden * out["hidden"]
    if want_attn:
        out["attention"] = attention_kl(list(s_out.attentions), [t_out.attentions[j] for j in layer_map])
        total = total + cfg.w_attention * out["attention"]
    out["loss"] = total
    return out
