"""Token-level statistics of a model against a reference, as llama.cpp's ``perplexity --kl-divergence`` prints them.

Per predicted position (position t predicts token t+1 of a block):

- KL(reference || model) = sum_v p_r(v) (log p_r(v) - log p_m(v)): its mean (with the standard
  error of the mean), median, percentiles and maximum, so a few positions a quantization breaks
  show up even when the mean is small;
- Δp = p_m(correct) - p_r(correct), the change in the probability of the token the text has: its
  mean and RMS (llama.cpp's "RMS Δp"), in percent;
- same top-1: how often both models rank the same token first (llama.cpp's "Same top p");
- the perplexity of each model on the text, and the mean ln of their ratio.

llama.cpp scores the second half of each context window only (the first half is context); here
every position of a block is scored, as edgekd's held-out evaluation does. Logits come from the
runtime that ships the file (llama.cpp, onnxruntime) or torch, a block at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .evaluate import LogitsFn, log_softmax

PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)


@dataclass
class KlStats:
    tokens: int
    kl_mean: float
    kl_stderr: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    delta_p_mean_pct: float
    delta_p_rms_pct: float
    same_top1: float
    perplexity: float
    reference_perplexity: float
    ln_ppl_ratio: float
    seconds: float
    kl_percentiles: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The statistics in llama.cpp's layout."""
        return [f"Mean    KLD: {self.kl_mean:10.6f} ± {self.kl_stderr:.6f}", f"Maximum KLD: {self.kl_max:10.6f}",
                *[f"{k:>7} KLD: {v:10.6f}" for k, v in self.kl_percentiles.items()],
                f"Mean    Δp: {self.delta_p_mean_pct:8.3f} %", f"RMS     Δp: {self.delta_p_rms_pct:8.3f} %",
                f"Same top p: {100 * self.same_top1:8.3f} %",
                f"PPL: {self.perplexity:.4f} (reference {self.reference_perplexity:.4f}), mean ln(PPL ratio) {self.ln_ppl_ratio:.6f}"]


def position_stats(logits: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position of (N, V) logits against (N, V) reference logits, ``targets`` (N,) the next tokens."""
    logp, logr = log_softmax(logits).astype(np.float64), log_softmax(reference).astype(np.float64)
    r = np.exp(logr)
    rows = np.arange(len(targets))
    return {"kl": (r * (logr - logp)).sum(-1), "dp": np.exp(logp[rows, targets]) - r[rows, targets],
            "same": logits.argmax(-1) == reference.argmax(-1), "nll": -logp[rows, targets], "ref_nll": -logr[rows, targets]}


def compare(model_fn: LogitsFn, reference_fn: LogitsFn, blocks: np.ndarray, progress: Callable[[int], None] | None = None,
            first: int = 0) -> KlStats:
    """The statistics of ``model_fn`` against ``reference_fn`` on ``blocks`` (B, L), one block at a time
    (both logit sets of one block in memory, never the whole text's). ``first``: the first position
    scored in each block (llama.cpp's ``perplexity`` scores from the middle of each window, n_ctx // 2,
    so every scored token has at least half a window of context); default every position."""
    start = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {}
    for b in range(len(blocks)):
        block = np.ascontiguousarray(blocks[b : b + 1])
        got = position_stats(np.asarray(model_fn(block))[0, first:-1], np.asarray(reference_fn(block))[0, first:-1],
                             block[0, first + 1:].astype(np.int64))
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
        if progress:
            progress(1)
    v = {k: np.concatenate(x) for k, x in parts.items()}
    return summarize(v, time.perf_counter() - start)


def summarize(v: dict[str, np.ndarray], seconds: float = 0.0) -> KlStats:
    kl, n = v["kl"], len(v["kl"])
    pct = {("Median" if p == 50.0 else f"{p:g}%"): float(np.percentile(kl, p)) for p in PERCENTILES}
    nll, ref_nll = float(v["nll"].mean()), float(v["ref_nll"].mean())
    return KlStats(
        tokens=n, kl_mean=float(kl.mean()), kl_stderr=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        kl_median=pct["Median"], kl_p90=pct["90%"], kl_p99=pct["99%"], kl_p999=pct["99.9%"], kl_max=float(kl.max()),
        delta_p_mean_pct=100 * float(v["dp"].mean()), delta_p_rms_pct=100 * float(np.sqrt((v["dp"] ** 2).mean())),
        same_top1=float(v["same"].mean()), perplexity=math.exp(min(nll, 700.0)), reference_perplexity=math.exp(min(ref_nll, 700.0)),
        ln_ppl_ratio=nll - ref_nll, seconds=seconds, kl_percentiles=pct)
