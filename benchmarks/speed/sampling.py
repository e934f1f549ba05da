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
from dataclasses import replace
from unittest import mock

import numpy as np
import torch
from common import concatenating_kv_cache, default_setup, write_result

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


@torch.no_grad()
def fp32_nll(model, seqs: np.ndarray, prompt_len: int) -> float:
    """The fp32 model's mean NLL of the sampled tokens of ``seqs`` (positions ``prompt_len`` on)."""
    total = 0.0
    for rows in np.array_split(seqs.astype(np.int64), max(1, len(seqs) // 16)):  # 16 rows a pass
        ids = torch.from_numpy(rows)
        logp = torch.log_softmax(model(ids).logits[:, prompt_len - 1:-1].float(), -1)
        total += float(-logp.gather(-1, ids[:, prompt_len:, None]).sum())
    return total / (len(seqs) * (seqs.shape[1] - prompt_len))


def cmd_sampling_precision(args) -> None:
    """The teacher's sampling in fp32, under bf16 autocast, and under autocast with the linear weights
    held in bf16 (edgekd's torch engine with ``precision: bf16``), side by side on the same prompts
    and seeds; and whether the held weights give autocast's logits bit for bit."""
    import functools

    from edgekd.methods.generate import Generation, _engine
    from edgekd.methods.precision import bf16_linear_weights, forward_precision

    s = default_setup(args.teacher, args.blocks)
    spec = s.profile.compression.data.generation
    models = {"default teacher": s.teacher.model}
    if args.qwen3_shape:
        from memory_fit import qwen3_06b_teacher

        models["Qwen3-0.6B shape (random weights)"] = qwen3_06b_teacher()  # speed only: it does not depend on the weights
    autocast = functools.partial(forward_precision, "bf16", "cpu")
    rows = []
    for label, model in models.items():
        vocab = model.config.vocab_size
        prompts = (s.train[: args.rows, : spec.prompt_tokens] % vocab).astype(np.int64)
        with torch.no_grad(), autocast():
            alone = model(torch.from_numpy(prompts[:4])).logits
        with torch.no_grad(), bf16_linear_weights(model), autocast():
            exact = bool(torch.equal(alone, model(torch.from_numpy(prompts[:4])).logits))
        del alone
        base = Generation(1, spec.prompt_tokens, args.new_tokens, spec.temperature, spec.top_p, "torch", args.rows, 0)
        arms = {"fp32": base, "bf16 autocast": None, "bf16, linears held in bf16 (the engine)": replace(base, precision="bf16")}
        # one engine per arm for all rounds, as generate() keeps one for all its shards (the bf16 copies made at the first)
        engines = {name: _engine(settings, model, None) for name, settings in arms.items() if settings is not None}
        times: dict[str, list[float]] = {name: [] for name in arms}
        samples: dict[str, list[np.ndarray]] = {name: [] for name in arms}  # every round's, the same seeds for all arms
        for r in range(args.rounds):
            for name in arms:  # alternating, so a slower stretch of a shared host hits all
                t0 = time.perf_counter()
                if name in engines:
                    samples[name].append(np.asarray(engines[name]([list(p) for p in prompts], np.random.default_rng(r), ())))
                else:  # autocast alone: each weight cast to bf16 at every decode step
                    samples[name].append(sampling.torch_continue(model, prompts, args.new_tokens, np.random.default_rng(r),
                                                                 spec.temperature, spec.top_p, autocast))
                times[name].append(time.perf_counter() - t0)
        del engines
        rates = {name: round(args.rows * args.new_tokens / statistics.median(t), 1) for name, t in times.items()}
        row = {"model": label, "rows": args.rows, "new_tokens": args.new_tokens, "tokens_per_s": rates,
               "speed_up_over_fp32": {n: round(v / rates["fp32"], 2) for n, v in rates.items()}, "held_logits_bit_exact": exact}
        if model is s.teacher.model:  # real weights: is a bf16 sample as likely under the fp32 teacher as an fp32 one?
            got = {n: np.concatenate(x) for n, x in samples.items()}
            row["fp32_teacher_nll_of_samples"] = {n: round(fp32_nll(model, x, prompts.shape[1]), 4) for n, x in got.items()}
            row["tokens_as_fp32_arm"] = {n: round(float((x == got["fp32"]).mean()), 3) for n, x in got.items()}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    write_result("speed_sampling_precision", {"rounds": args.rounds, "rows": rows})
    print("| teacher | rows | new tokens | fp32 (tokens/s) | bf16 autocast | bf16, linears held in bf16 | speed-up over fp32 | logits = autocast's |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = list(r["tokens_per_s"].values())
        print(f"| {r['model']} | {r['rows']} | {r['new_tokens']} | {t[0]:.0f} | {t[1]:.0f} | {t[2]:.0f} | "
              f"{t[2] / t[0]:.2f}x | {'bit for bit' if r['held_logits_bit_exact'] else 'NO'} |")


def cmd_sampling_file_prompts(args) -> None:
    """A prompt file's prompts (different lengths) sampled by the torch engine as one left-padded,
    masked batch, against the batches of equal-length prompts it ran before (near one row a batch
    for a file of questions), side by side on the same prompts and seeds, in the run's precision."""
    from edgekd.methods.generate import Generation, _engine, prompt_source

    s = default_setup(args.teacher, args.blocks)
    spec = s.profile.compression.data.generation
    base = replace(Generation.of_profile(s.profile), tokens=1, new_tokens=args.new_tokens, batch_size=args.rows)
    prompts = prompt_source("file", s.teacher.tokenizer, base, None, args.prompts)(0, args.rows)
    padded = _engine(base, s.teacher.model, None)

    def by_length(batch, rng, stops):  # the engine before: one torch_continue per prompt length
        out = [None] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(len(p), []).append(i)
        for length in sorted(groups):
            done = padded([batch[i] for i in groups[length]], rng, stops)  # equal lengths: no padding
            for i, row in zip(groups[length], done):
                out[i] = row
        return out

    arms = {"one batch per prompt length (before)": by_length, "one padded batch (the engine)": padded}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name, run in arms.items():  # alternating, so a slower stretch of a shared host hits both
            t0 = time.perf_counter()
            run(prompts, np.random.default_rng(r), ())  # no stop tokens: every row samples new_tokens
            times[name].append(time.perf_counter() - t0)
    rates = {name: round(args.rows * args.new_tokens / statistics.median(t), 1) for name, t in times.items()}
    lengths = sorted({len(p) for p in prompts})
    row = {"prompts": args.prompts, "rows": args.rows, "prompt_lengths": len(lengths), "shortest": lengths[0], "longest": lengths[-1],
           "new_tokens": args.new_tokens, "precision": base.precision, "top_p": spec.top_p, "rounds": args.rounds,
           "tokens_per_s": rates, "speed_up": round(rates["one padded batch (the engine)"] / rates["one batch per prompt length (before)"], 2)}
    print(row, file=sys.stderr, flush=True)
    write_result("speed_sampling_file_prompts", row)
    print("| prompts | rows | prompt lengths | new tokens | precision | one batch per length (tokens/s) | one padded batch | speed-up |\n"
          "|---|---|---|---|---|---|---|---|")
    print(f"| {args.prompts} | {args.rows} | {len(lengths)} ({lengths[0]}-{lengths[-1]} tokens) | {args.new_tokens} | {base.precision} | "
          f"{list(rates.values())[0]:.0f} | {list(rates.values())[1]:.0f} | {row['speed_up']:.2f}x |")


def cmd_sampling_kv_cache(args) -> None:
    """The teacher's sampling with edgekd's KV cache (allocated once, written in place) against
    transformers' DynamicCache (grown by concatenation, the whole cache copied at every step), side by
    side on the same prompts and seeds through the engine (the run's precision, the profile's prompt
    length), and whether both draw the same tokens."""
    from unittest import mock

    from edgekd.methods import kv_cache
    from edgekd.methods.generate import Generation, _engine

    s = default_setup(args.teacher, args.blocks)
    spec = s.profile.compression.data.generation
    models = {"default teacher": s.teacher.model}
    if args.qwen3_shape:
        from memory_fit import qwen3_06b_teacher

        models["Qwen3-0.6B shape (random weights)"] = qwen3_06b_teacher()  # speed only: it does not depend on the weights
    arms = {"DynamicCache (concatenation)": concatenating_kv_cache, "edgekd (in place)": kv_cache.decode_cache}
    rows = []
    for label, model in models.items():
        prompts = [list(p) for p in (s.train[: args.rows, : spec.prompt_tokens] % model.config.vocab_size).astype(np.int64)]
        settings = replace(Generation.of_profile(s.profile), tokens=1, new_tokens=args.new_tokens, batch_size=args.rows)
        engine = _engine(settings, model, None)  # one for both arms: the bf16 copies made once
        times: dict[str, list[float]] = {name: [] for name in arms}
        same = []
        for r in range(args.rounds):
            outs = {}
            for name, make in arms.items():  # alternating, so a slower stretch of a shared host hits both
                with mock.patch.object(kv_cache, "decode_cache", make):
                    t0 = time.perf_counter()
                    outs[name] = np.asarray(engine(prompts, np.random.default_rng(r), ()))  # no stops: every row samples new_tokens
                    times[name].append(time.perf_counter() - t0)
            same.append(float((outs["edgekd (in place)"] == outs["DynamicCache (concatenation)"]).mean()))
        rates = {name: round(args.rows * args.new_tokens / statistics.median(t), 1) for name, t in times.items()}
        row = {"model": label, "rows": args.rows, "prompt_tokens": spec.prompt_tokens, "new_tokens": args.new_tokens,
               "precision": settings.precision, "rounds": args.rounds, "tokens_per_s": rates,
               "speed_up": round(rates["edgekd (in place)"] / rates["DynamicCache (concatenation)"], 2), "same_tokens": min(same)}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    write_result("speed_sampling_kv_cache", {"rows": rows})
    print("| teacher | rows | new tokens | precision | DynamicCache (tokens/s) | in place | speed-up | same tokens |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = list(r["tokens_per_s"].values())
        print(f"| {r['model']} | {r['rows']} | {r['new_tokens']} | {r['precision']} | {t[0]:.0f} | {t[1]:.0f} | {r['speed_up']:.2f}x | "
              f"{r['same_tokens']:.1%} |")
