"""Which rows make each training batch: blocks of the offline pools, and on-policy rows.

The training blocks are the pools one after another (the corpus, then the teacher's samples);
each batch takes a fixed number of rows from each pool and from the student's own samples, the
batch split by the mixture's shares (largest remainder, the same every step). Each pool is read
in its own seeded permutation per epoch, so a batch is a pure function of (seed, step) and a
resumed run replays the data exactly. A single pool with no on-policy rows reads the blocks in
the order a corpus-only run always has: epoch after epoch of ``permutation(seed, epoch)``.

With ``OnPolicy.start`` the on-policy rows join only after that share of the stage's steps; the
steps before take their whole batch from the offline pools (split by the pools' own shares), and
each pool's stream goes on where those steps left it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OnPolicy:
    """How the student samples its own rows (edgekd.profiles.OnPolicySettings) and the divergence taken on them."""

    prompt_tokens: int = 32
    new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    kl: str = "reverse"
    steps_per_generation: int = 1  # the rows of this many steps are sampled together (edgekd.methods.on_policy.Rollouts)
    # the share of the stage's steps trained on the offline pools alone before on-policy rows join:
    # GKD and MiniLLM start on-policy training from a fine-tuned student, not from a freshly pruned one
    start: float = 0.0

    @classmethod
    def from_settings(cls, s: Any) -> OnPolicy:
        return cls(s.prompt_tokens, s.new_tokens, s.temperature, s.top_p, s.kl, s.steps_per_generation, s.start)


@dataclass(frozen=True)
class Mixture:
    sizes: tuple[int, ...]  # blocks in each offline pool, in the order they are stacked
    weights: tuple[float, ...]  # each pool's share of a batch
    on_policy: float = 0.0  # the share of on-policy rows
    policy: OnPolicy | None = None

    @classmethod
    def single(cls, n_blocks: int) -> Mixture:
        return cls((n_blocks,), (1.0,))

    @property
    def on_policy_share(self) -> float:
        """The on-policy rows' share of a batch (edgekd.methods.distill.DistillConfig.on_policy_share)."""
        return self.on_policy / (sum(self.weights) + self.on_policy)

    def slots(self, batch: int, on_policy: bool = True) -> tuple[list[int], int]:
        """Rows per batch of each pool, and on-policy rows: ``batch`` split by the shares (with
        ``on_policy`` False, as in the steps before the on-policy rows join: the pools' shares alone)."""
        shares = np.asarray([*self.weights, self.on_policy if on_policy else 0.0], dtype=np.float64)
        shares = shares / shares.sum() * batch
        counts = np.floor(shares).astype(int)
        for i in np.argsort(-(shares - counts), kind="stable")[: batch - counts.sum()]:
            counts[i] += 1
        return counts[:-1].tolist(), int(counts[-1])

    @property
    def warm_share(self) -> float:
        """The share of a stage's steps before the on-policy rows join (``OnPolicy.start``; 0 without on-policy rows)."""
        return self.policy.start if self.on_policy and self.policy is not None else 0.0

    def phases(self) -> list[tuple[float, Mixture]]:
        """Each kind of step of a stage with its share of the steps, as a mixture whose every step is of
        that kind: before the join (the same pools and shares, no on-policy rows), then after it."""
        if not self.warm_share:
            return [(1.0, self)]
        return [(self.warm_share, replace(self, on_policy=0.0, policy=None)),
                (1.0 - self.warm_share, replace(self, policy=replace(self.policy, start=0.0)))]

    def on_policy_from(self, steps: int) -> int:
        """The first step with on-policy rows in a stage of ``steps`` steps (``OnPolicy.start`` of them before it)."""
        return int(self.warm_share * steps)

    def on_policy_at(self, step: int, steps: int) -> bool:
        """Whether ``step`` of a stage of ``steps`` steps has on-policy rows."""
        return bool(self.on_policy) and step >= self.on_policy_from(steps)

    def row_tokens(self, batch: int, block_len: int, on_policy: bool = True) -> int:
        """Tokens a batch trains on: its blocks, and its on-policy rows (prompt and sample)."""
        counts, n_on = self.slots(batch, on_policy)
        on_len = min(self.policy.prompt_tokens, block_len - 1) + self.policy.new_tokens if n_on else 0
        return sum(counts) * block_len + n_on * on_len

    def prompt_pool(self) -> int:
        """The pool on-policy prompts come from: the first with a share."""
        return next(i for i, w in enumerate(self.weights) if w > 0) if any(self.weights) else 0

    def indices(self, step: int, micro: int, cfg: Any, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
        """(offline rows, on-policy prompt rows) of (step, micro-batch) on ``rank``: indices into the
        stacked blocks. ``cfg.steps`` places the step where on-policy rows join (:meth:`on_policy_from`)."""
        before, _ = self.slots(cfg.batch_size, on_policy=False)
        after, n_on = self.slots(cfg.batch_size)
        starts = np.cumsum([0, *self.sizes])
        draw = (step * cfg.grad_accum + micro) * world + rank
        joined = self.on_policy_from(cfg.steps) * cfg.grad_accum * world  # draws before the on-policy rows join
        warm, late = min(draw, joined), max(0, draw - joined)  # this draw's predecessors in each phase
        counts, n_on = (after, n_on) if draw >= joined else (before, 0)
        offline = [starts[p] + _stream(cfg.seed, p, self.sizes[p], warm * before[p] + late * after[p], c)
                   for p, c in enumerate(counts) if c]
        pool = self.prompt_pool()
        prompts = starts[pool] + _stream(cfg.seed, len(self.sizes), self.sizes[pool], late * n_on, n_on)
        return (np.concatenate(offline) if offline else np.zeros(0, dtype=np.int64)), prompts


def _stream(seed: int, stream: int, size: int, start: int, n: int) -> np.ndarray:
    """Positions ``start .. start + n`` of stream ``stream``: epoch after epoch of seeded permutations of ``size`` blocks."""
    out = np.empty(n, dtype=np.int64)
    for i, p in enumerate(range(start, start + n)):
        epoch, offset = divmod(p, size)
        out[i] = _permutation(seed, stream, epoch, size)[offset]
    return out


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, stream: int, epoch: int, size: int) -> np.ndarray:
    key = [seed, epoch] if stream == 0 else [seed, 1000 + stream, epoch]  # stream 0: the order of a corpus-only run
    return np.random.default_rng(key).permutation(size)
