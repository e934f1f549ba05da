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
from .mixture import Mixture, OnPolicy
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


class Rollouts:
    """The student's on-policy rows, sampled a generation at a time.

    A generation is the rows of ``policy.steps_per_generation`` consecutive steps (every
    micro-batch of this rank), sampled in one batch with the weights of its first step, as TRL's
    ``steps_per_generation`` does: on a CPU a decode step of a small model costs about as much for
    one row as for a dozen, so sampling each step's row alone made on-policy rows the dearest part
    of a step. The later steps' rows come from weights a few updates old. Generations start at
    multiples of ``steps_per_generation`` after the step the rows join; the current one goes into every checkpoint
    (:meth:`state`), so a resumed run trains on the very rows an uninterrupted one would have.
    """

    def __init__(self, mixture: Mixture, cfg: Any, rank: int = 0, world: int = 1):
        self.mixture, self.cfg, self.rank, self.world = mixture, cfg, rank, world
        self.policy = mixture.policy
        self.start = self.end = -1  # the steps [start, end) the current generation covers
        self.seqs = np.zeros((0, 0), dtype=np.int64)
        self.offsets: dict[tuple[int, int], tuple[int, int]] = {}  # (step, micro) -> its rows of seqs
        self.seconds = 0.0  # sampling time of the current generation (0 when restored from a checkpoint)
        self.sampled_seconds = 0.0  # all sampling done by this object
        self.sampled_rows = 0

    def _layout(self, start: int, end: int) -> tuple[list[np.ndarray], dict[tuple[int, int], tuple[int, int]]]:
        prompts, offsets, at = [], {}, 0
        for step in range(start, end):
            for micro in range(self.cfg.grad_accum):
                rows = self.mixture.indices(step, micro, self.cfg, self.rank, self.world)[1]
                offsets[(step, micro)] = (at, at + len(rows))
                prompts.append(rows)
                at += len(rows)
        return prompts, offsets

    def generation_of(self, step: int) -> tuple[int, int]:
        """The steps [start, end) of the generation holding ``step``: generations are counted from the step the on-policy rows join."""
        n, first = self.policy.steps_per_generation, self.mixture.on_policy_from(self.cfg.steps)
        start = first + (step - first) // n * n
        return start, max(step + 1, min(start + n, self.cfg.steps))

    def refill(self, student: Any, blocks: np.ndarray, step: int) -> float:
        """Sample the generation holding ``step`` with ``student`` as it is now; returns the seconds it took."""
        start, end = self.generation_of(step)
        rows, offsets = self._layout(start, end)
        rows = np.concatenate(rows)
        prompt_len = min(self.policy.prompt_tokens, blocks.shape[1] - 1)
        t0 = time.perf_counter()
        seqs = student_samples(student, blocks[rows, :prompt_len].astype(np.int64), self.policy,
                               generation_rng(self.cfg.seed, start, self.rank))
        self.seconds = time.perf_counter() - t0
        self.start, self.end, self.seqs, self.offsets = start, end, seqs, offsets
        self.sampled_seconds += self.seconds
        self.sampled_rows += len(seqs)
        return self.seconds

    def rows(self, student: Any, blocks: np.ndarray, step: int, micro: int) -> tuple[np.ndarray, int, float]:
        """The sampled rows of (``step``, ``micro``): (rows, prompt length, seconds sampled for them now)."""
        sampled = self.refill(student, blocks, step) if not self.start <= step < self.end else 0.0
        a, b = self.offsets[(step, micro)]
        return self.seqs[a:b], min(self.policy.prompt_tokens, blocks.shape[1] - 1), sampled

    @property
    def tokens_per_s(self) -> float | None:
        """Sampled tokens per second over every generation this object sampled."""
        return self.sampled_rows * self.policy.new_tokens / self.sampled_seconds if self.sampled_seconds > 0 else None

    def state(self) -> dict[str, Any] | None:
        """The current generation, for a checkpoint (None before the first)."""
        if self.start < 0:
            return None
        return {"start": self.start, "end": self.end, "rows": self.seqs.tolist()}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        start, end = int(state["start"]), int(state["end"])
        _, self.offsets = self._layout(start, end)
        self.start, self.end, self.seconds = start, end, 0.0
        self.seqs = np.asarray(state["rows"], dtype=np.int64)


def generation_rng(seed: int, start: int, rank: int) -> np.random.Generator:
    """The sampling generator of the generation starting at step ``start`` on ``rank``: a resumed run samples the same rows."""
    return np.random.default_rng([seed, 2, start, rank])
