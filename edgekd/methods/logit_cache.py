"""Teacher-logit cache: per training position, k teacher tokens and their log-probabilities, computed once.

Two kinds. ``sample`` (recommended): k tokens drawn with replacement from the teacher's
distribution at T, with their log-probabilities; the loss is then an unbiased estimate of the
forward KL (random-sampling KD, Anshumann et al. 2025; :func:`edgekd.methods.losses.sampled_forward_kl`).
``topk``:

As in DistillKit: for every position of every training block, keep the k largest teacher
log-probabilities at the distillation temperature T (fp32: fp16 shifts a small KL by ~1e-3) and their token ids (int32); the
remaining probability mass is folded into one bucket by the loss (see
:func:`edgekd.methods.losses.topk_forward_kl`). With the cache, a distillation or QAT step that uses
only logit losses needs no teacher forward pass. Size on disk: 8 * k bytes per token.

``hidden``: the teacher's final hidden states (after its final norm), in the dtype its head product
reads them in (bf16 under bf16 autocast, else fp32): the step computes the teacher's logits from
them with the teacher's own head, so the targets are exactly the live teacher's, not an estimate,
and no teacher block runs or stays in memory while the student trains (only its head; the teacher
waits on disk, edgekd.methods.layout). Size: 2 * hidden bytes per token under bf16 (1.2 kB for a
576-wide model, 118 MB for the default corpus). It saves what the live teacher costs a step, its
forward pass, when the steps read each block more than once (QAT-KD's epochs over the corpus).

The teacher's intermediate hidden states and attention maps are not cached: per token they cost
4 * hidden * layers bytes (hidden) and 4 * heads * seq * layers bytes (attention), hundreds of kB per
token for a 135M model; the report states that cost, and those losses run the teacher live.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_path, atomic_write_json


@dataclass
class LogitCache:
    indices: np.ndarray  # (n_blocks, block_len - 1, k) int32
    logprobs: np.ndarray  # (n_blocks, block_len - 1, k) float32, log-softmax(z / T)
    temperature: float
    kind: str = "topk"  # "topk" or "sample"

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    def batch(self, block_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = (torch.from_numpy(np.asarray(self.indices[block_ids], dtype=np.int64)),
               torch.from_numpy(np.asarray(self.logprobs[block_ids], dtype=np.float32)))
        for array in (self.indices, self.logprobs):
            _unmap_pages(array)
        return out

    def first(self, k: int) -> LogitCache:
        """The cache with k entries per position: the top-k of a sorted top-K, or the first k of K draws."""
        return LogitCache(np.ascontiguousarray(self.indices[..., :k]), np.ascontiguousarray(self.logprobs[..., :k]),
                          self.temperature, self.kind)


@dataclass
class HiddenCache:
    """The teacher's final hidden states per training position (kind ``hidden``): exact targets, of
    the blocks the training steps will read (``rows``; a corpus larger than the steps read is not
    run through the teacher beyond them)."""

    hidden: np.ndarray  # (len(rows), block_len - 1, hidden): bf16 bit patterns (uint16) or float32
    rows: np.ndarray  # the training blocks cached, in the order of ``hidden``
    precision: str  # "bf16" or "fp32": the training precision it was built for
    kind: str = "hidden"
    temperature: float | None = None  # the teacher's logits are made in the step, at any temperature

    def __post_init__(self) -> None:
        self.where = np.full(int(self.rows.max()) + 1 if len(self.rows) else 0, -1, dtype=np.int64)
        self.where[self.rows] = np.arange(len(self.rows))

    def holds(self, block_ids: np.ndarray) -> bool:
        ids = np.asarray(block_ids)
        return bool(np.all(ids < len(self.where)) and np.all(self.where[ids] >= 0)) if len(ids) else True

    def batch(self, block_ids: np.ndarray) -> tuple[torch.Tensor]:
        if not self.holds(block_ids):
            raise ValueError("a batch reads blocks the hidden-state cache was not built for")
        rows = torch.from_numpy(np.asarray(self.hidden[self.where[np.asarray(block_ids)]]))
        _unmap_pages(self.hidden)
        return (rows.view(torch.bfloat16) if self.precision == "bf16" else rows,)

    @property
    def bytes_per_token(self) -> int:
        return int(self.hidden.shape[-1] * self.hidden.dtype.itemsize)


def hidden_cache_bytes(n_tokens: int, hidden_size: int, precision: str) -> int:
    return n_tokens * hidden_size * (2 if precision == "bf16" else 4)


@torch.no_grad()
def build_hidden(teacher: Any, blocks: np.ndarray, directory: Path, precision: str, batch_size: int = 4,
                 progress: Callable[[int], None] | None = None, rows: np.ndarray | None = None) -> HiddenCache:
    """The teacher's final hidden states of every position but each block's last (it predicts
    nothing) of ``blocks[rows]`` (default: every block), computed as a training step computes them
    (the same autocast), written a batch at a time into a file mapping so the cache is never all in memory."""
    from .chunked_head import forward_to_hidden
    from .precision import forward_precision

    rows = np.arange(len(blocks)) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    n, length = len(rows), blocks.shape[1]
    width = teacher.config.hidden_size
    teacher.eval()
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "rows.npy", rows)
        out = np.lib.format.open_memmap(tmp / "hidden.npy", mode="w+", dtype=np.uint16 if precision == "bf16" else np.float32,
                                        shape=(n, length - 1, width))
        for b0 in range(0, n, batch_size):
            ids = torch.from_numpy(blocks[rows[b0 : b0 + batch_size]].astype(np.int64)).to(teacher.device)
            # no cached casts: each weight is read once a batch, and the cache would hold a bf16 copy of them all
            with forward_precision(precision, ids.device.type, cache_casts=False):
                _, hidden = forward_to_hidden(teacher, ids)
            hidden = hidden[:, :-1]
            bits = hidden.to(torch.bfloat16).view(torch.int16) if precision == "bf16" else hidden.float()
            out[b0 : b0 + len(ids)] = bits.cpu().numpy().view(out.dtype)
            _unmap_pages(out)
            if progress:
                progress(len(ids))
        out.flush()
        del out
        atomic_write_json(tmp / "meta.json", {"kind": "hidden", "precision": precision, "blocks": len(blocks),
                                              "block_len": length, "hidden_size": width, "cached_blocks": n})
    return HiddenCache(np.load(directory / "hidden.npy", mmap_mode="r"), rows, precision)


def _unmap_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped cache's pages from this process (the page cache keeps them): read a
    batch at a time, a mapping would otherwise stay resident, the whole cache by the end of an epoch."""
    mapping = getattr(array, "_mmap", None)  # numpy.memmap's mapping
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def cache_size_bytes(n_tokens: int, k: int) -> int:
    return n_tokens * k * 8


def live_target_bytes_per_token(config: Any, block_len: int) -> dict[str, float]:
    """What caching hidden-state or attention targets would cost per token (they are computed live)."""
    return {"hidden_states": 4.0 * config.hidden_size * (config.num_hidden_layers + 1),
            "attention_maps": 4.0 * config.num_attention_heads * block_len * config.num_hidden_layers}


@torch.no_grad()
def build(teacher: Any, blocks: np.ndarray, k: int, temperature: float, directory: Path,
          batch_size: int = 4, progress: Callable[[int], None] | None = None, kind: str = "topk", seed: int = 0) -> LogitCache:
    """``kind`` "topk": the k most likely tokens; "sample": k draws from the teacher (seeded)."""
    if kind not in ("topk", "sample"):
        raise ValueError(f"unknown logit cache kind {kind!r}")
    generator = torch.Generator(device=teacher.device).manual_seed(seed)
    n, length = blocks.shape
    idx = np.empty((n, length - 1, k), dtype=np.int32)
    lp = np.empty((n, length - 1, k), dtype=np.float32)
    for b0 in range(0, n, batch_size):
        ids = torch.from_numpy(blocks[b0 : b0 + batch_size].astype(np.int64)).to(teacher.device)
        logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        if kind == "topk":
            values, chosen = logp.topk(k, dim=-1)
        else:
            flat = logp.reshape(-1, logp.shape[-1])
            chosen = torch.multinomial(flat.exp(), k, replacement=True, generator=generator).reshape(*logp.shape[:-1], k)
            values = logp.gather(-1, chosen)
        idx[b0 : b0 + len(ids)] = chosen.cpu().numpy()
        lp[b0 : b0 + len(ids)] = values.cpu().numpy()
        if progress:
            progress(len(ids))
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "indices.npy", idx)
        np.save(tmp / "logprobs.npy", lp)
        atomic_write_json(tmp / "meta.json", {"k": k, "temperature": temperature, "blocks": n, "block_len": length,
                                              "kind": kind, "seed": seed})
    return LogitCache(idx, lp, temperature, kind)


def load(directory: Path, k: int | None, temperature: float, blocks: np.ndarray, kind: str = "topk",
         precision: str = "fp32", rows: np.ndarray | None = None) -> LogitCache | HiddenCache | None:
    """The cache in ``directory`` if it matches these settings and blocks (a hidden-state cache: and
    holds ``rows``, the blocks the steps will read), else None."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if kind == "hidden" or meta.get("kind") == "hidden":
        found = (meta.get("kind"), meta.get("precision"), meta["blocks"], meta["block_len"])
        if found != (kind, precision, *blocks.shape):
            return None
        cache = HiddenCache(np.load(directory / "hidden.npy", mmap_mode="r"), np.load(directory / "rows.npy"), precision)
        return cache if rows is None or cache.holds(rows) else None
    found = (meta.get("k", meta.get("top_k")), meta["temperature"], meta["blocks"], meta["block_len"], meta.get("kind", "topk"))
    if found != (k, temperature, *blocks.shape, kind):
        return None
    return LogitCache(np.load(directory / "indices.npy", mmap_mode="r"), np.load(directory / "logprobs.npy", mmap_mode="r"),
                      temperature, kind)


def build_cache(spec: Any, teacher: Any, blocks: np.ndarray, directory: Path, *, temperature: float, precision: str,
                batch_size: int = 4, seed: int = 0, progress: Callable[[int], None] | None = None,
                rows: np.ndarray | None = None) -> LogitCache | HiddenCache:
    """The cache ``spec`` (edgekd.profiles.LogitCacheSettings) describes, over ``blocks`` (a
    hidden-state cache: over ``blocks[rows]``, the blocks the steps will read)."""
    if spec.kind == "hidden":
        return build_hidden(teacher, blocks, directory, precision, batch_size=batch_size, progress=progress, rows=rows)
    return build(teacher, blocks, spec.k, temperature, directory, batch_size=batch_size, progress=progress, kind=spec.kind, seed=seed)


def blocks_read(mixture: Any, cfg: Any, steps: int) -> np.ndarray:
    """The offline training blocks that ``steps`` steps of ``cfg`` read under ``mixture``
    (edgekd.methods.mixture.Mixture) on one process, with the whole batch or split into the
    micro-batches the memory check may choose (edgekd.methods.memory: halved, accumulated): a
    batch is a pure function of (seed, step), so these are known before training. A stage that
    trains fewer steps (fitted to a time budget) reads a subset: each pool is read as a prefix of
    its stream, and the prefix grows with the steps (also where on-policy rows join after a share of them)."""
    from dataclasses import replace

    reads, batch, accum = [], cfg.batch_size, cfg.grad_accum
    while batch >= 1:
        split = replace(cfg, batch_size=batch, grad_accum=accum, steps=steps)
        reads += [mixture.indices(step, micro, split, 0, 1)[0] for step in range(steps) for micro in range(accum)]
        if batch % 2:
            break
        batch, accum = batch // 2, accum * 2
    return np.unique(np.concatenate(reads)).astype(np.int64) if reads else np.zeros(0, dtype=np.int64)


def predict_build_peak(spec: Any, config: Any, batch_size: int, blocks: np.ndarray) -> float:
    """The predicted peak resident bytes of :func:`build_cache` (a PROJECTION): a batch's forward pass,
    and for a logit cache its logits, their log-softmax and the whole cache, held until written (a
    hidden-state cache goes to its file a batch at a time, and the head is not run)."""
    from .memory import predict_forward_peak

    if spec.kind == "hidden":
        return predict_forward_peak(config, batch_size, blocks.shape[1], logit_copies=0)
    return predict_forward_peak(config, batch_size, blocks.shape[1], logit_copies=3,
                                extra_bytes=cache_size_bytes(int(blocks.size), spec.k))

