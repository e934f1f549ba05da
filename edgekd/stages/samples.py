"""The stage that writes the teacher's samples: a pool of the training mixture, or with ``--data teacher`` the whole corpus."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from ..pipeline.context import SAMPLES_DIR, RunContext
from ..report import StageRecord

SAMPLING_SHARE = 0.5  # of a time budget's training time, the most the teacher's samples may take


def teacher_samples(ctx: RunContext) -> StageRecord:
    from ..fileio import atomic_write_bytes
    from ..methods import generate as gen
    from ..methods.data import Corpus, _npy_bytes
    from ..methods.memory import refuse_over_limit
    from ..methods.models import check_within_context

    data = ctx.profile.compression.data
    data_free = ctx.inputs.data_free
    settings = gen.Generation.of_profile(ctx.profile)
    kind = gen.resolve_prompt_kind(data.generation.prompts, not data_free, ctx.inputs.prompts)
    tokenizer = ctx.teacher.tokenizer
    prompts = gen.prompt_source(kind, tokenizer, settings, None if data_free else ctx.corpus.train, ctx.inputs.prompts,
                                data.generation.chat_template_args)
    source = ctx.teacher.source
    gguf = source.path if source.kind in ("gguf", "default") else None  # the llama.cpp engine's file
    file_longest = getattr(prompts, "longest", None)  # a prompt file's longest prompt (the batch is padded to it)
    # the longest prompt, and a query's reply opening fed after the user's message (edgekd.methods.sampling.Turns)
    longest = (file_longest or max(len(p) for p in prompts(0, settings.batch_size))) + len(getattr(prompts, "reply", ()))
    check_within_context(ctx.teacher.model.config, longest + settings.new_tokens,
                         f"a teacher sample (the longest prompt, {longest} tokens, + generation.new_tokens {settings.new_tokens})",
                         "shorten the prompts (--prompts) or lower compression.data.generation.new_tokens")
    predicted = gen.predict_sampling_peak(ctx.teacher.model, settings, file_longest)  # before the heap grows
    refuse_over_limit(predicted, ctx.profile.compression.memory_gb, "sampling the teacher (the prompts' forward pass, the KV cache "
                      "of a batch, the sampler)", "lower compression.data.generation.batch_size or new_tokens")
    seconds_left = fill_s = None
    if ctx.time_budget is not None:  # sampling may take half the training time the budget leaves
        seconds_left = lambda: SAMPLING_SHARE * ctx.time_budget.training_left_s()  # noqa: E731
        if data_free and data.generation.time_share > 0:  # the samples are the whole training set: more of them
            fill_s = data.generation.time_share * max(0.0, ctx.time_budget.training_left_s())
    splits = {"train": settings}
    if data_free:  # a held-out split of its own, sampled with another seed
        frac = ctx.profile.compression.evaluation.heldout_fraction
        splits["heldout"] = replace(settings, tokens=max(2 * data.block_len, round(settings.tokens * frac / (1 - frac))),
                                    seed=settings.seed + 1)
    made: dict[str, Any] = {}
    for split, s in splits.items():
        with ctx.reporter.task(f"sampling the teacher ({split}, {s.engine}, prompts: {kind})", total=gen.shard_count(s),
                               unit="shards") as advance:
            made[split] = gen.generate(ctx.teacher.model, tokenizer, prompts, s, ctx.run.path(SAMPLES_DIR, split), gguf, advance,
                                       seconds_left, fill_s if split == "train" else None)
    blocks = {split: samples.blocks(data.block_len) for split, samples in made.items()}
    if any(len(b) == 0 for b in blocks.values()):
        from ..errors import EdgekdError

        raise EdgekdError(f"the teacher's samples fill no {data.block_len}-token block",
                          fix="raise compression.data.generation.tokens or lower compression.data.block_len")
    artifacts = {"teacher samples (token shards)": SAMPLES_DIR}
    if data_free:
        stats = {"source": "teacher samples", "prompts": kind, "train_blocks": len(blocks["train"]),
                 "heldout_blocks": len(blocks["heldout"]), "train_tokens": int(blocks["train"].size),
                 "heldout_tokens": int(blocks["heldout"].size), "split": "separately sampled (seed + 1)"}
        ctx.corpus = Corpus(f"teacher samples ({ctx.report.teacher.get('name', 'teacher')})", data.block_len,
                            blocks["train"], blocks["heldout"], stats)
        ctx.corpus.save(ctx.run.path("corpus"))
        ctx.report.corpus = ctx.corpus.describe()
        artifacts.update({"train blocks": "corpus/train.npy", "held-out blocks": "corpus/heldout.npy"})
    else:
        atomic_write_bytes(ctx.run.path(SAMPLES_DIR, "blocks.npy"), _npy_bytes(blocks["train"]))
        ctx.sample_blocks = blocks["train"]
        artifacts["teacher sample blocks"] = f"{SAMPLES_DIR}/blocks.npy"
    metrics = {f"{split}_{k}": v for split, samples in made.items() for k, v in
               {"tokens": int(samples.stream.size), "blocks": len(blocks[split]), "shards": samples.shards,
                "shards_reused": samples.shards - samples.generated_now,
                "tokens_per_s": round(samples.tokens_per_s, 1) if samples.tokens_per_s else None}.items()}
    metrics["engine"] = settings.engine
    if fill_s is not None:
        metrics["fill_s"] = round(fill_s, 1)  # the time budget's share the train split could fill past generation.tokens
    metrics["predicted_peak_rss_mb"] = round(predicted / 2**20, 1)
    return StageRecord("teacher_samples", settings={**asdict(settings), "prompts": kind, "data_free": data_free},
                       metrics=metrics, artifacts=artifacts)


def sampling_notes(stages: list) -> list[str]:
    """Report notes on what the student's own samples cost a training stage: sampling against training speed."""
    out = []
    for record in stages:
        rate = record.metrics.get("sampling_tokens_per_s")
        if rate:
            share = record.metrics.get("sampling_share") or 0.0
            joined = record.settings.get("on_policy_from_step")
            when = f" (from step {joined + 1} of {record.settings.get('steps')})" if joined else ""
            out.append(f"{record.name}: the student sampled its on-policy rows at {rate:.0f} tokens/s{when}, {share:.0%} of the "
                       f"steps' wall time; training ran at {record.metrics.get('training_tokens_per_s_without_sampling') or 0:.0f} "
                       "tokens/s besides (measured)")
    return out


def data_free_notes(stages: list) -> list[str]:
    """Report notes for a data-free run: what its held-out KL measures, and how a user steers the samples to a domain
    (the held-out gap measured in benchmarks/RESULTS.md: "Data-free QAT from a prompt file")."""
    record = next((r for r in stages if r.name == "teacher_samples" and r.settings.get("data_free")), None)
    if record is None:
        return []
    kind = record.settings.get("prompts")
    note = ("data-free run: the held-out split is the teacher's own samples (another seed), so the evaluation's KL "
            "measures fidelity to what the teacher writes, not to the text of a deployment domain")
    if kind != "file":
        note += (f"; samples from prompts: {kind} seldom reach a specific domain: a JSONL file of a few dozen prompts "
                 "of yours (--prompts) steers them there")
    return [note]
