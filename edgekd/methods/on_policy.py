"""On-policy distillation: the student continues prompts with its current weights, the teacher scores every sampled position.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models") and MiniLLM (Gu et al.
2024) take the divergence on the student's own samples, removing the mismatch between the text
a student trains on and the text it generates. During QAT the student samples with its
fake-quantized weights, i.e. the model that ships. The loss is the divergence alone (no
cross-entropy: the targets are the student's own tokens), at temperature 1, on the sampled
positions only; the prompt positions carry no loss.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch

from .chunked_head import chunked_kd_loss, forward_to_hidden, head_of, unwrapped
from .mixture import OnPolicy
from .precision import forward_precision
from .sampling import torch_continue


def student_samples(student: Any, prompts: np.ndarray, policy: OnPolicy, rng: np.random.Generator) -> np.ndarray:
    """``prompts`` (rows, P) continued by the student: (rows, P + new_tokens), fixed length (a row
    that ends its text goes on into a new one, as a packed block does). fp32 decoding: measured
    faster than bf16 autocast at these batch sizes; under QAT each fake-quantized weight is
    computed once for the whole sample (``parametrize.cached``), not once per token."""
    from torch.nn.utils import parametrize

    model = unwrapped(student)
    was_training = model.training
    model.eval()  # the KV cache (off in training mode under gradient checkpointing)
    try:
        with parametrize.cached():
            return torch_continue(model, prompts, policy.new_tokens, rng, policy.temperature, policy.top_p)
    finally:
        model.train(was_training)


def on_policy_losses(student: Any, teacher: Any, seq: torch.Tensor, prompt_len: int, policy: OnPolicy, cfg: Any) -> dict[str, torch.Tensor]:
    """The divergence ``policy.kl`` between teacher and student on positions ``prompt_len ..`` of ``seq`` (rows, P + L)."""
    autocast = functools.partial(forward_precision, cfg.precision, seq.device.type, not cfg.gradient_checkpointing)
    with torch.no_grad(), autocast():
        _, t_hidden = forward_to_hidden(teacher, seq)
    with autocast():
        _, s_hidden = forward_to_hidden(student, seq)
        # the hidden state at position i predicts token i + 1: positions P-1 .. end-1 predict the sampled tokens
        terms = chunked_kd_loss(s_hidden[:, prompt_len - 1:-1], head_of(student), seq[:, prompt_len:], 1.0, 1.0, policy.kl,
                                teacher_hidden=t_hidden[:, prompt_len - 1:-1], teacher_head=head_of(teacher))
    return {"loss": terms["loss"], "on_policy_kd": terms["kd"]}


def on_policy_rows(student: Any, teacher: Any, blocks: np.ndarray, rows: np.ndarray, policy: OnPolicy, cfg: Any,
                   rng: np.random.Generator, device: Any) -> tuple[dict[str, torch.Tensor], float]:
    """Sample on the prompts of ``blocks[rows]`` and take the loss: (terms, sampling seconds)."""
    prompt_len = min(policy.prompt_tokens, blocks.shape[1] - 1)
    t0 = time.perf_counter()
    seq = student_samples(student, blocks[rows, :prompt_len].astype(np.int64), policy, rng)
    sampled = time.perf_counter() - t0
    return on_policy_losses(student, teacher, torch.from_numpy(seq).to(device), prompt_len, policy, cfg), sampled


def step_rng(seed: int, step: int, micro: int, rank: int) -> np.random.Generator:
    """The sampling generator of one (step, micro-batch, rank): a resumed run samples the same rows."""
    return np.random.default_rng([seed, 2, step, micro, rank])
