"""Stages that load the run's inputs, and the teacher's reference evaluation."""

from __future__ import annotations

from typing import Any

from ..families import family_of
from ..report import StageRecord


def load_teacher(ctx: Any) -> StageRecord:
    from ..methods.models import (
        check_chat_template,
        check_within_context,
        load_causal_lm,
        resolve_model_source,
    )

    source = resolve_model_source(ctx.inputs.teacher)
    with ctx.reporter.task(f"loading teacher {source.name}"):
        ctx.teacher = load_causal_lm(source, trust_remote_code=ctx.inputs.trust_remote_code)
    check_chat_template(getattr(ctx.teacher.tokenizer, "chat_template", None), source.path)
    block_len = ctx.profile.compression.data.block_len
    check_within_context(ctx.teacher.model.config, block_len, f"a training block (compression.data.block_len={block_len})",
                         "lower compression.data.block_len to the teacher's context or below")
    ctx.report.teacher = {**source.describe(), **ctx.teacher.info}
    if ctx.profile.deployment.tensor_formats != "auto":
        from ..methods.qat import quantized_tensors
        from ..pipeline.plan import format_plan

        family_of(ctx.teacher.model).check_tensor_keys(ctx.profile.deployment.tensor_formats, ctx.teacher.info["layers"])
        quantized_tensors(ctx.teacher.model, format_plan(ctx.profile))  # refuses a format a tensor's rows cannot hold, now
    return StageRecord("load_teacher", settings=source.describe(), metrics=dict(ctx.teacher.info))


def load_corpus(ctx: Any) -> StageRecord:
    from ..methods.data import Corpus, load_corpus

    corpus_dir = ctx.run.path("corpus")
    settings = {
        "source": str(ctx.inputs.data or "default"),
        "block_len": ctx.profile.compression.data.block_len,
        "heldout_fraction": ctx.profile.compression.evaluation.heldout_fraction,
    }
    if (corpus_dir / "corpus.json").exists():
        ctx.corpus = Corpus.load(corpus_dir)  # resume: the exact same blocks
    elif ctx.inputs.data_free:  # the teacher_samples stage makes the corpus
        return StageRecord("load_corpus", settings={**settings, "source": "teacher"},
                           metrics={"note": "no corpus: the teacher's samples are the training data (teacher_samples stage)"})
    else:
        with ctx.reporter.task("tokenising corpus"):
            ctx.corpus = load_corpus(ctx.inputs.data, ctx.teacher.tokenizer, settings["block_len"],
                                     settings["heldout_fraction"], ctx.inputs.text_field)
        ctx.corpus.save(corpus_dir)
    ctx.report.corpus = ctx.corpus.describe()
    return StageRecord("load_corpus", settings=settings, metrics=dict(ctx.corpus.stats),
                       artifacts={"train blocks": "corpus/train.npy", "held-out blocks": "corpus/heldout.npy"})


def evaluate_teacher(ctx: Any) -> StageRecord:
    from ..methods.evaluate import evaluate, torch_logits_fn
    from ..methods.memory import predict_evaluation_peak

    blocks = ctx.heldout_blocks()
    predicted = predict_evaluation_peak(ctx.teacher.model.config, blocks.shape[1], with_teacher=False)
    with ctx.reporter.task("evaluating teacher on held-out blocks", total=len(blocks), unit="blocks") as advance:
        metrics = evaluate(torch_logits_fn(ctx.teacher.model), blocks, progress=advance)
    return StageRecord("evaluate_teacher", settings={"heldout_blocks": len(blocks), "block_len": int(blocks.shape[1])},
                       metrics={**metrics.to_dict(), "predicted_peak_rss_mb": round(predicted / 2**20, 1)})


def report_teacher(record: StageRecord, ctx: Any) -> None:
    ctx.report.add_model_row("teacher (fp32)", ctx.report.teacher, record.metrics)
