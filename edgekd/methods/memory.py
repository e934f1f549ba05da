"""Will a distillation step fit in memory? An estimate from the shapes, checked before training starts."""

from __future__ import annotations

from typing import Any

from ..errors import EdgekdError


def estimate_training_memory(teacher: Any, student: Any, batch_size: int, block_len: int, attention_loss: bool, hidden_loss: bool) -> dict[str, float]:
    """Rough peak memory (bytes) of one distillation step in fp32.

    Weights: teacher 4 B/param; student 4 (weights) + 4 (grads) + 8 (AdamW moments).
    Activations kept for backward: about 34 * h bytes per token per layer in 16-bit
    (Korthikanti et al. 2022), doubled for fp32, plus 4 * heads * T bytes per token per layer
    for eager attention probabilities; logits (B, T, V) in fp32 for teacher and student, times
    about 4 for log-softmax, softmax and their gradients.
    """
    sc, tc = student.config, teacher.config
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    tokens = batch_size * block_len
    act_per_layer = tokens * sc.hidden_size * 34 * 2
    if attention_loss:
        act_per_layer += tokens * sc.num_attention_heads * block_len * 4 * 2
    activations = sc.num_hidden_layers * act_per_layer
    teacher_kept = 0
    if hidden_loss:
        teacher_kept += (tc.num_hidden_layers + 1) * tokens * tc.hidden_size * 4
    if attention_loss:
        teacher_kept += tc.num_hidden_layers * tokens * tc.num_attention_heads * block_len * 4
    logits = tokens * sc.vocab_size * 4 * 4 * 2
    est = {
        "teacher_weights": n_teacher * 4, "student_weights_grads_adam": n_student * 16,
        "student_activations": activations, "teacher_targets": teacher_kept, "logits": logits,
    }
    est["total"] = float(sum(est.values()))
    return est


def check_memory(estimate: dict[str, float], available_bytes: float | None = None, headroom: float = 0.85) -> None:
    import psutil

    available = available_bytes if available_bytes is not None else psutil.virtual_memory().available
    if estimate["total"] > headroom * available:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f} GB" for k, v in estimate.items() if k != "total")
        raise EdgekdError(
            f"distillation needs about {estimate['total'] / 1e9:.1f} GB but only {available / 1e9:.1f} GB of memory is available ({parts})",
            fix="lower compression.distill.batch_size (and raise grad_accum to keep the tokens per step), "
            "shorten compression.data.block_len, drop the attention loss (its maps grow with block_len^2), "
            "or cache the teacher's logits (compression.distill.logit_cache)",
        )
