"""Distillation losses, each a pure function of tensors.

Logit losses take student and teacher logits of shape (..., V) and return the mean over
positions. With temperature T both distributions are softened (p = softmax(z / T)) and the
divergence is multiplied by T^2 so its gradients keep their scale as T changes
(Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

- forward KL(p_t || p_s): mean-seeking; the classic KD objective (Hinton et al. 2015).
- reverse KL(p_s || p_t): mode-seeking (MiniLLM, Gu et al. 2023).
- skew KL(p_t || b p_t + (1-b) p_s), b = 0.1: bounded, stable gradients (DistiLLM, Ko et al. 2024).
- generalized JSD_b = b KL(p_t || m) + (1-b) KL(p_s || m), m = b p_t + (1-b) p_s
  (GKD, Agarwal et al. 2024); b = 0.5 is the symmetric Jensen-Shannon divergence.

Hidden-state and attention losses compare mapped layers (student layer i -> the teacher
layer it was copied from): FitNets (Romero et al. 2015), DistilBERT (Sanh et al. 2019),
TinyBERT (Jiao et al. 2020), MiniLM (Wang et al. 2020).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_KINDS = ("forward", "reverse", "skew", "jsd")


def _kl_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities, summed over the last axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(logp: torch.Tensor, logq: torch.Tensor, b: float) -> torch.Tensor:
    """log(b p + (1-b) q), computed stably in log space."""
    return torch.logsumexp(torch.stack([logp + math.log(b), logq + math.log1p(-b)]), dim=0)


def divergence_per_position(logp_s: torch.Tensor, logp_t: torch.Tensor, kind: str, beta: float | None = None) -> torch.Tensor:
    """The divergence ``kind`` between teacher and student log-probabilities, per position (no T^2)."""
    if kind == "forward":
        return _kl_from_logp(logp_t, logp_s)
    if kind == "reverse":
        return _kl_from_logp(logp_s, logp_t)
    if kind == "skew":
        b = 0.1 if beta is None else beta
        return _kl_from_logp(logp_t, _log_mix(logp_t, logp_s, b))
    if kind == "jsd":
        b = 0.5 if beta is None else beta
        logm = _log_mix(logp_t, logp_s, b)
        return b * _kl_from_logp(logp_t, logm) + (1 - b) * _kl_from_logp(logp_s, logm)
    raise ValueError(f"unknown logit loss {kind!r}; choose from {LOGIT_KINDS}")


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * divergence between softened teacher and student distributions, mean over (masked) positions."""
    if kind not in LOGIT_KINDS:
        raise ValueError(f"unknown logit loss {kind!r}; choose from {LOGIT_KINDS}")
    t = float(temperature)
    logp_s = F.log_softmax(student_logits.float() / t, dim=-1)
    logp_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return _masked_mean(divergence_per_position(logp_s, logp_t, kind, beta), mask) * t * t


def cached_kl_per_position(student_logits: torch.Tensor, idx: torch.Tensor, teacher_logp: torch.Tensor, cache_kind: str,
                           temperature: float) -> torch.Tensor:
    """KL(p_t || p_s) per position (no T^2) from a logit cache: ``cache_kind`` "topk" or "sample"
    (:func:`topk_forward_kl`, :func:`sampled_forward_kl`)."""
    logp_s = F.log_softmax(student_logits.float() / float(temperature), dim=-1)
    s_at = logp_s.gather(-1, idx.long())
    t_at = teacher_logp.float()
    if cache_kind == "sample":
        return (t_at - s_at).mean(-1)
    t_rest = torch.log1p(-t_at.exp().sum(-1).clamp(max=1 - 1e-6))
    s_rest = torch.log1p(-s_at.exp().sum(-1).clamp(max=1 - 1e-6))
    return (t_at.exp() * (t_at - s_at)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_topk_idx: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) when only the teacher's top-k log-probs (at temperature T) are cached.

    The teacher's remaining mass is folded into one bucket, as is the student's mass outside
    the teacher's top-k (the DistillKit-style logit cache): KL over k + 1 outcomes.
    """
    t = float(temperature)
    return _masked_mean(cached_kl_per_position(student_logits, teacher_topk_idx, teacher_topk_logp, "topk", t), mask) * t * t


def sampled_forward_kl(
    student_logits: torch.Tensor,
    sample_idx: torch.Tensor,
    teacher_sample_logp: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) estimated from N tokens drawn from the teacher's p_t (at T).

    KL(p_t || p_s) = E_{i ~ p_t}[log p_t(i) - log p_s(i)], so the mean over samples drawn from
    p_t is an unbiased estimate of the KL and of its gradient, with the student's full softmax
    (random-sampling KD: Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs"). Top-k caches are biased: the tail they fold away is what the
    student then fails to match.
    """
    t = float(temperature)
    return _masked_mean(cached_kl_per_position(student_logits, sample_idx, teacher_sample_logp, "sample", t), mask) * t * t


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    kind: str = "forward",
    teacher_cached: tuple[torch.Tensor, torch.Tensor, str] | None = None,
) -> dict[str, torch.Tensor]:
    """L = (1 - alpha) CE(student, labels) + alpha T^2 D(teacher || student)  (Hinton et al. 2015).

    ``labels`` are next-token ids aligned with the logits (position t predicts labels[t]);
    -100 marks positions to ignore. Pass ``teacher_cached`` (indices, log-probs at T, kind) instead of
    full ``teacher_logits`` to use the cache (forward KL only); kind "sample": the indices are
    tokens drawn from the teacher (:func:`sampled_forward_kl`), "topk": its top-k (:func:`topk_forward_kl`).
    The same loss without the (..., V) logits in memory: edgekd.methods.chunked_head.
    """
    mask = labels != -100
    ce = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
    if alpha == 0:
        kd = torch.zeros((), device=ce.device)
    elif teacher_cached is not None:
        if kind != "forward":
            raise ValueError("the logit cache supports forward KL only")
        idx, logp, cache_kind = teacher_cached
        kd = (sampled_forward_kl if cache_kind == "sample" else topk_forward_kl)(student_logits, idx, logp, temperature, mask)
    else:
        kd = logit_divergence(student_logits, teacher_logits, kind, temperature, mask=mask)
    return {"ce": ce, "kd": kd, "loss": (1 - alpha) * ce + alpha * kd}


def hidden_state_loss(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    kind: str = "mse",
    projections: list[torch.nn.Module | None] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layer pairs of a per-token distance between hidden states.

    ``mse``: squared error normalised by the teacher's mean square per token,
    ||h_s - h_t||^2 / ||h_t||^2, so layers with large activations (LLM residual streams grow
    with depth) do not dominate. ``cosine``: 1 - cos(h_s, h_t). When widths differ, a learned
    linear projection maps the student to the teacher's width (FitNets' regressor).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError("need the same, non-zero number of student and teacher hidden states")
    losses = []
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        proj = projections[i] if projections else None
        hs = proj(hs) if proj is not None else hs
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(f"hidden sizes differ ({hs.shape[-1]} vs {ht.shape[-1]}): pass a projection")
        hs, ht = hs.float(), ht.float()
        if kind == "mse":
            per_tok = (hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-6)
        elif kind == "cosine":
            per_tok = 1 - F.cosine_similarity(hs, ht, dim=-1)
        else:
            raise ValueError(f"unknown hidden-state loss {kind!r}; choose mse or cosine")
        losses.append(_masked_mean(per_tok, mask))
    return torch.stack(losses).mean()


def attention_kl(
    student_attn: list[torch.Tensor],
    teacher_attn: list[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layers of KL(A_t || A_s) between attention distributions (TinyBERT/MiniLM).

    Each tensor is (batch, heads, query, key) of attention probabilities (rows sum to 1). The KL
    is summed over keys, averaged over heads and query positions.
    """
    if len(student_attn) != len(teacher_attn) or not student_attn:
        raise ValueError("need the same, non-zero number of student and teacher attention maps")
    from torch.utils.checkpoint import checkpoint

    losses = [checkpoint(_attention_kl_layer, a_s, a_t, mask, use_reentrant=False) if a_s.requires_grad
              else _attention_kl_layer(a_s, a_t, mask) for a_s, a_t in zip(student_attn, teacher_attn)]
    return torch.stack(losses).mean()


def _attention_kl_layer(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One layer's KL, recomputed in backward: its fp32 copies of both maps would otherwise stay
    for backward, four (batch, heads, T, T) tensors per mapped layer."""
    eps = 1e-9
    a_s, a_t = a_s.float(), a_t.float()
    per_row = (a_t * (torch.log(a_t + eps) - torch.log(a_s + eps))).sum(-1)  # (B, H, Q)
    return _masked_mean(per_row.mean(1), mask)  # heads, then query positions


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)
