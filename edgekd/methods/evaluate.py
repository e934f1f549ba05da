"""Held-out evaluation against the teacher, the same for every model kind.

Three numbers over the same held-out blocks (position t predicts token t+1, so a
block of L tokens gives L-1 predictions):

- perplexity: exp(mean negative log-likelihood of the next token);
- KL(teacher || model) per token: sum_v p_t(v) (log p_t(v) - log p_m(v)), averaged over
  positions (the forward KL that logit distillation minimises, Hinton et al. 2015);
- top-1 agreement: the fraction of positions where the model's argmax equals the teacher's.

The core works on numpy logits, so torch models, llama.cpp and onnxruntime all go
through :func:`evaluate`; a model is given as a function from a (B, L) array of token
ids to (B, L, V) logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class HeldoutMetrics:
    perplexity: float
    nll: float
    kl_to_teacher: float | None
    top1_agreement: float | None
    tokens: int
    blocks: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def position_sums(logits: np.ndarray, targets: np.ndarray, teacher_logits: np.ndarray | None) -> dict[str, float]:
    """Sums over positions of NLL, KL(teacher||model) and argmax agreement. Shapes (N, V), (N,), (N, V)."""
    logp = log_softmax(logits)
    out = {"nll": float(-logp[np.arange(len(targets)), targets].astype(np.float64).sum()), "n": len(targets)}
    if teacher_logits is not None:
        logq = log_softmax(teacher_logits)
        q = np.exp(logq)
        out["kl"] = float((q * (logq - logp)).sum(axis=-1, dtype=np.float64).sum())
        out["agree"] = float((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
    return out


def evaluate(
    model_fn: LogitsFn,
    blocks: np.ndarray,
    teacher_fn: LogitsFn | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> HeldoutMetrics:
    """Evaluate ``model_fn`` on ``blocks`` (B, L); with ``teacher_fn``, also KL and top-1 agreement."""
    start = time.perf_counter()
    totals = {"nll": 0.0, "n": 0, "kl": 0.0, "agree": 0.0}
    for b0 in range(0, len(blocks), batch_size):
        batch = np.ascontiguousarray(blocks[b0 : b0 + batch_size])
        logits = np.asarray(model_fn(batch))
        teacher = np.asarray(teacher_fn(batch)) if teacher_fn is not None else None
        for i in range(len(batch)):
            sums = position_sums(
                logits[i, :-1], batch[i, 1:].astype(np.int64), None if teacher is None else teacher[i, :-1]
            )
            for k, v in sums.items():
                totals[k] += v
        del logits, teacher  # before the next batch's forward passes make theirs (else two batches' logits at the peak)
        if progress:
            progress(len(batch))
    n = max(totals["n"], 1)
    nll = totals["nll"] / n
    return HeldoutMetrics(
        perplexity=float(math.exp(min(nll, 700.0))),
        nll=float(nll),
        kl_to_teacher=totals["kl"] / n if teacher_fn is not None else None,
        top1_agreement=totals["agree"] / n if teacher_fn is not None else None,
        tokens=int(totals["n"]),
        blocks=int(len(blocks)),
        seconds=time.perf_counter() - start,
    )


def torch_logits_fn(model: Any) -> LogitsFn:
    """Wrap a transformers causal LM as a LogitsFn (no grad, eval mode, fp32 logits)."""
    import torch

    def fn(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.from_numpy(batch.astype(np.int64)).to(model.device)
            out = model(input_ids=ids, use_cache=False)
            return out.logits.float().cpu().numpy()

    return fn
