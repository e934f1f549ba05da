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

Hidden-state and attention targets are not cached: per token they cost 4 * hidden * layers
bytes (hidden) and 4 * heads * seq * layers bytes (attention), hundreds of kB per token for a
135M model; the report states that cost, and those losses run the teacher live.
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

    def bytes_per_million_tokens(self) -> float:
        return 1e6 * self.k * (4 + 4)


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


def load(directory: Path, k: int, temperature: float, blocks: np.ndarray, kind: str = "topk") -> LogitCache | None:
    """The cache in ``directory`` if it matches these settings and blocks, else None."""
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    found = (meta.get("k", meta.get("top_k")), meta["temperature"], meta["blocks"], meta["block_len"], meta.get("kind", "topk"))
    if found != (k, temperature, *blocks.shape, kind):
        return None
    return LogitCache(np.load(directory / "indices.npy", mmap_mode="r"), np.load(directory / "logprobs.npy", mmap_mode="r"),
                      temperature, kind)
