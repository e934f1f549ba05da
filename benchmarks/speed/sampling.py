"""The teacher's sampling speed: edgekd's sampler (every row's nucleus at once, in torch) against
the row-by-row nucleus draw it replaced, side by side in one run on the same prompts and seeds.

Both draw the same tokens (the share alike is measured on every round, and where a sequence
parts, the logit gap of the two tokens drawn there); the figure is tokens/s of
``torch_continue`` with the teacher at the profile's top-p, so the forward passes are in both.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from unittest import mock

import numpy as np
import torch
from common import default_setup, write_result

from edgekd.methods import sampling


def row_by_row_next_tokens(logits, rng, temperature=1.0, top_p=1.0, candidates=256):
    """The nucleus draw one row at a time (numpy): the same definition, the reference for speed."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return z.argmax(-1)
    z = z / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random(len(p))
    if top_p >= 1.0:
        return np.minimum((np.cumsum(p, -1) < u[:, None]).sum(-1), p.shape[-1] - 1)
    out = np.empty(len(p), dtype=np.int64)
    for r, row in enumerate(p):
        order = np.argpartition(-row, candidates)[:candidates]
        if row[order].sum() < top_p:
            order = np.arange(len(row))
        order = order[np.argsort(-row[order], kind="stable")]
        mass = row[order] * (np.cumsum(row[order]) - row[order] < top_p)
        cdf = np.cumsum(mass)
        out[r] = order[min(int((cdf < u[r] * cdf[-1]).sum()), len(order) - 1)]
    return out


@torch.no_grad()
def parting_logit_gaps(model, a: np.ndarray, b: np.ndarray) -> list[float]:
    """Where two samplings of the same prompts part, the gap between the logits of the two tokens
    drawn there (the row's prefix recomputed alone): a near-tie when the samplers agree otherwise."""
    gaps = []
    for row in np.flatnonzero((a != b).any(1)):
        j = int(np.argmax(a[row] != b[row]))
        logits = model(torch.from_numpy(a[row:row + 1, :j])).logits[0, -1]
        gaps.append(abs(float(logits[a[row, j]] - logits[b[row, j]])))
    return gaps


def cmd_sampling(args) -> None:
    s = default_setup(args.teacher, args.blocks)
    spec = s.profile.compression.data.generation
    rows = []
    for batch in args.batches:
        prompts = s.train[:batch, : spec.prompt_tokens].astype(np.int64)
        times: dict[str, list[float]] = {"edgekd": [], "row_by_row": []}
        same: list[float] = []
        gaps: list[float] = []
        for r in range(args.rounds):
            outs = {}
            for name in times:  # alternating, so a slower stretch of a shared host hits both
                patch = (mock.patch.object(sampling, "next_tokens", row_by_row_next_tokens) if name == "row_by_row"
                         else contextlib.nullcontext())
                with patch:
                    t0 = time.perf_counter()
                    outs[name] = sampling.torch_continue(s.teacher.model, prompts, args.new_tokens, np.random.default_rng(r),
                                                         spec.temperature, spec.top_p)
                    times[name].append(time.perf_counter() - t0)
            same.append(float((outs["edgekd"] == outs["row_by_row"]).mean()))
            gaps += parting_logit_gaps(s.teacher.model, outs["edgekd"], outs["row_by_row"])
        row = {"rows": batch, "new_tokens": args.new_tokens, "top_p": spec.top_p,
               **{f"{n}_tokens_per_s": round(batch * args.new_tokens / statistics.median(t), 1) for n, t in times.items()}}
        row["speed_up"] = round(row["edgekd_tokens_per_s"] / row["row_by_row_tokens_per_s"], 2)
        row["same_tokens"] = min(same)  # share of the sequences' tokens the two drew alike (worst round)
        row["parting_logit_gaps"] = gaps
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    write_result("speed_sampling", {"rounds": args.rounds, "rows": rows})
    print("| rows | new tokens | top-p | edgekd (tokens/s) | row by row (tokens/s) | speed-up | same tokens | largest parting logit gap |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = f"{max(r['parting_logit_gaps']):.1e}" if r["parting_logit_gaps"] else "none parted"
        print(f"| {r['rows']} | {r['new_tokens']} | {r['top_p']} | {r['edgekd_tokens_per_s']:.0f} | "
              f"{r['row_by_row_tokens_per_s']:.0f} | {r['speed_up']:.2f}x | {r['same_tokens']:.1%} | {gap} |")
