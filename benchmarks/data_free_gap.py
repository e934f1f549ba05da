"""Where data-free QAT loses to corpus QAT on the held-out text: which weights, which positions.

Trains the full-depth Q4_0 QAT-KD (the profile's recipe, as ``data_sources.py``'s QAT rows) once on
the corpus and once per teacher-sample setting on the teacher's samples alone (``prompts: none``),
each for the same wall time of training (the sampling is not counted), then measures on the held-out split:

- the KL at positions whose input token never occurs in the samples (embedding rows the data-free
  run never trains as inputs) against the rest;
- transplants: the data-free model with one group of weights (token table, attention, MLP,
  norms, a third of the blocks) taken from the corpus-trained model. The share of the gap a group
  recovers is where the corpus run's domain gain sits.

    .venv/bin/python benchmarks/data_free_gap.py --budget-min 8 --samples 1.0/0.95,0.7/0.95,1.3/1.0

``--hidden 0,1`` trains each data-free row once per hidden-state loss weight (0: the profile's
logit-only recipe) on the same samples, and ``--corpus-hidden 0,1`` the corpus rows likewise;
``--no-transplants`` leaves the transplants out; ``--cache`` gives the logit-only rows the teacher's
final hidden states from a cache, as the pipeline's QAT stage has them (its build not timed in the row),
so they run no teacher pass; ``--samples ""``: corpus rows only; ``--precision fp32``: the forward passes
in fp32, as ``precision: auto`` runs them on a CPU without native bf16.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import default_setup, license_blocks, write_result
from data_sources import qat_row

from edgekd.methods import generate as gen
from edgekd.methods.evaluate import evaluate, torch_logits_fn
from edgekd.methods.logit_cache import build_hidden
from edgekd.methods.mixture import Mixture
from edgekd.methods.precision import resolve_precision


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=8.0, help="wall-clock minutes of QAT-KD per row")
    ap.add_argument("--tokens", type=int, default=65536, help="teacher samples per data-free row")
    ap.add_argument("--samples", default="1.0/0.95",
                    help="comma-separated TEMPERATURE/TOP_P, one data-free row each (the profile's: 1.0/0.95)")
    ap.add_argument("--hidden", default="0", help="comma-separated hidden-state loss weights, one data-free row each per sample setting")
    ap.add_argument("--corpus-hidden", default="0", help="comma-separated hidden-state loss weights, one corpus row each (the first: the reference)")
    ap.add_argument("--no-transplants", action="store_true", help="skip the transplants (a row's KLs only)")
    ap.add_argument("--cache", action="store_true", help="logit-only rows read the teacher's final hidden states from a cache")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="the forward passes' arithmetic (fp32: as on a CPU without native bf16)")
    ap.add_argument("--out", default="data_free_gap")
    args = ap.parse_args()
    torch.manual_seed(0)
    setup = default_setup()
    setup.profile.compression.distill.precision = args.precision
    teacher, tok = setup.teacher.model, setup.teacher.tokenizer
    block_len = setup.profile.compression.data.block_len
    ood = license_blocks(tok, block_len)
    result: dict = {"budget_min": args.budget_min, "tokens": args.tokens, "precision": resolve_precision(args.precision),
                    "rows": [], "corpus_rows": []}
    corpus = None
    for weight in (float(w) for w in args.corpus_hidden.split(",")):
        cache, cache_s = teacher_cache(setup, setup.train) if args.cache and weight == 0 else (None, None)
        model, steps = train_row(setup, setup.train, args.budget_min, weight, cache)
        row = {"hidden_weight": weight, "cached_teacher": cache is not None, "cache_s": cache_s, "steps": steps,
               **kl_pair(model, teacher, setup.heldout, ood)}
        result["corpus_rows"].append(row)
        if corpus is None:  # the reference the data-free rows' gaps and transplants are taken against
            corpus, result["corpus"] = model, row
        print(f"corpus, hidden weight {weight}: {row}", flush=True)
        write_result(args.out, result)
    specs = [spec for spec in args.samples.split(",") if spec]
    corpus_kls = position_kls(corpus, teacher, setup.heldout) if specs else None  # once: every row's positions and transplants use it
    for spec in specs:
        temperature, top_p = (float(x) for x in spec.split("/"))
        s = replace(gen.Generation.of_profile(setup.profile), tokens=args.tokens, seed=11, temperature=temperature, top_p=top_p)
        t0 = time.perf_counter()
        src = gen.prompt_source("none", tok, s, setup.train)
        samples = gen.generate(teacher, tok, src, s, Path("export/data-free-gap") / f"{spec.replace('/', '-')}-{time.time_ns()}").blocks(block_len)
        sample_s = time.perf_counter() - t0
        for weight in (float(w) for w in args.hidden.split(",")):
            cache, cache_s = teacher_cache(setup, samples) if args.cache and weight == 0 else (None, None)
            free, steps = train_row(setup, samples, args.budget_min, weight, cache)
            free_kls = position_kls(free, teacher, setup.heldout)
            row = {"temperature": temperature, "top_p": top_p, "hidden_weight": weight, "cached_teacher": cache is not None,
                   "cache_s": cache_s, "sample_s": round(sample_s, 1),
                   "steps": steps, "distinct_tokens": int(len(np.unique(samples))),
                   **kl_pair(free, teacher, setup.heldout, ood), **positions(free_kls, corpus_kls, setup.heldout, samples)}
            if not args.no_transplants:
                row["corpus_group_into_free"] = transplants(free, corpus, teacher, setup.heldout, free_kls, corpus_kls)
            result["rows"].append(row)
            print(f"data-free {spec}, hidden weight {weight}: {row}", flush=True)
            write_result(args.out, result)
    print_table(result)
    return 0


def teacher_cache(setup, pool: np.ndarray):
    """The teacher's final hidden states of every block of ``pool`` (a hidden-state cache, the training
    precision), and the seconds its build took."""
    precision = resolve_precision(setup.profile.compression.distill.precision)
    t0 = time.perf_counter()
    cache = build_hidden(setup.teacher.model, pool, Path("export/data-free-gap") / f"cache-{time.time_ns()}", precision)
    return cache, round(time.perf_counter() - t0, 1)


def train_row(setup, pool: np.ndarray, minutes: float, hidden_weight: float = 0.0, cache=None):
    """Full-depth Q4_0 QAT-KD on ``pool`` alone for ``minutes``: (model on the grid, steps)."""
    mixture = Mixture((len(pool),), (1.0,), 0.0, None)
    calib = pool[np.linspace(0, len(pool) - 1, 16).astype(int)]
    model, outcome, _, _ = qat_row(setup, pool, calib, mixture, time.perf_counter() + minutes * 60, hidden_weight, cache)
    model.eval()
    return model, outcome.steps


@torch.no_grad()
def kl_pair(model, teacher, heldout, ood) -> dict:
    held = evaluate(torch_logits_fn(model), heldout, torch_logits_fn(teacher))
    off = evaluate(torch_logits_fn(model), ood, torch_logits_fn(teacher))
    return {"heldout_kl": held.kl_to_teacher, "ood_kl": off.kl_to_teacher}


@torch.no_grad()
def position_kls(model, teacher, blocks: np.ndarray) -> np.ndarray:
    """KL(teacher || model) at every position of ``blocks`` (blocks, block_len)."""
    out = []
    for block in blocks:
        ids = torch.from_numpy(block[None].astype(np.int64))
        lt = torch.log_softmax(teacher(ids).logits[0].float(), -1)
        ls = torch.log_softmax(model(ids).logits[0].float(), -1)
        out.append((lt.exp() * (lt - ls)).sum(-1).numpy())
    return np.stack(out)


def positions(free_kls: np.ndarray, corpus_kls: np.ndarray, heldout: np.ndarray, samples: np.ndarray) -> dict:
    """Held-out KL of both models (their :func:`position_kls`) at positions whose input token the samples
    never contain, and the rest."""
    unseen = ~np.isin(heldout, np.unique(samples))
    out = {"unseen_input_share": float(unseen.mean())}
    for name, kls in (("free", free_kls), ("corpus", corpus_kls)):
        out[f"{name}_kl_unseen_input"], out[f"{name}_kl_seen_input"] = float(kls[unseen].mean()), float(kls[~unseen].mean())
    return out


def transplants(free, corpus, teacher, heldout: np.ndarray, free_kls: np.ndarray, corpus_kls: np.ndarray) -> dict:
    """Held-out KL of ``free`` with one group of weights taken from ``corpus`` (a tied head goes with its
    table); ``none`` and ``everything``: the two models themselves (their :func:`position_kls`), the same mean over positions."""
    layers = teacher.config.num_hidden_layers
    in_blocks = lambda lo, hi: lambda k: k.startswith("model.layers.") and lo <= int(k.split(".")[2]) < hi  # noqa: E731
    groups = {"token table": lambda k: "embed_tokens" in k or k.startswith("lm_head"),
              "attention": lambda k: ".self_attn." in k, "MLP": lambda k: ".mlp." in k,
              "norms": lambda k: "norm" in k}
    for third in range(3):
        lo, hi = third * layers // 3, (third + 1) * layers // 3
        groups[f"blocks {lo}-{hi - 1}"] = in_blocks(lo, hi)
    free_sd, corpus_sd = free.state_dict(), corpus.state_dict()
    model = copy.deepcopy(free)
    out = {"none": float(free_kls.mean()), "everything": float(corpus_kls.mean())}
    for name, member in groups.items():
        model.load_state_dict({k: corpus_sd[k] if member(k) else v for k, v in free_sd.items()})
        out[name] = float(position_kls(model, teacher, heldout).mean())
    return out


def print_table(result: dict) -> None:
    c = result["corpus"]
    print()
    for r in result["corpus_rows"]:
        cached = ", teacher from the cache" if r.get("cached_teacher") else ""
        print(f"corpus QAT, hidden weight {r['hidden_weight']}{cached}: {r['steps']} steps, held-out KL {r['heldout_kl']:.4f} "
              f"({r['heldout_kl'] / c['heldout_kl'] - 1:+.1%}), OOD KL {r['ood_kl']:.4f} ({r['ood_kl'] / c['ood_kl'] - 1:+.1%})")
    for r in result["rows"]:
        print(f"data-free T={r['temperature']} top-p={r['top_p']} hidden weight {r['hidden_weight']}: {r['steps']} steps, "
              f"{r['distinct_tokens']} distinct tokens, held-out KL {r['heldout_kl']:.4f} ({r['heldout_kl'] / c['heldout_kl'] - 1:+.1%}), "
              f"OOD KL {r['ood_kl']:.4f} ({r['ood_kl'] / c['ood_kl'] - 1:+.1%})")
        if "corpus_group_into_free" not in r:
            continue
        t = r["corpus_group_into_free"]
        gap = t["none"] - t["everything"]
        print("| corpus group into the data-free model | held-out KL | share of the gap recovered |")
        print("|---|---|---|")
        for g, kl in r["corpus_group_into_free"].items():
            print(f"| {g} | {kl:.4f} | {(t['none'] - kl) / gap:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
