"""Plan and run a compression: profile -> plan -> stages -> report.

Each stage is a function ``(ctx) -> StageRecord``. Completed stages are recorded in
the run directory's ``state.json`` with their artifacts, so ``--resume`` skips them.
Loading the teacher and the corpus is cheap and always re-done (the objects live in
memory); everything expensive is a resumable stage.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budgets import check_budgets
from .errors import EdgekdError
from .profiles import DeviceProfile, load_profile
from .progress import Reporter
from .report import Report, StageRecord
from .rundir import RunDir, now_iso
from .versions import edgekd_version, host_info, library_versions, usable_threads


@dataclass
class RunContext:
    profile: DeviceProfile
    run: RunDir
    report: Report
    reporter: Reporter
    teacher_spec: Any = None
    data_spec: Any = None
    text_field: str = "text"
    trust_remote_code: bool = False
    teacher: Any = None  # models.LoadedModel
    corpus: Any = None  # data.Corpus
    student: Any = None  # transformers model, once pruned (or distilled)
    prune_plan: dict[str, Any] | None = None  # keep list, layer map, MLP channels
    quantized: Any = None  # the QAT (or round-to-nearest) student, weights on the shipped grid
    # metric name -> value, for the budget check (filled by bench stages)
    measured: dict[str, float] = field(default_factory=dict)
    measured_sources: dict[str, str] = field(default_factory=dict)


Stage = Callable[[RunContext], StageRecord]


# ---------------------------------------------------------------- stages


def stage_load_teacher(ctx: RunContext) -> StageRecord:
    from .models import load_causal_lm, resolve_model_source

    source = resolve_model_source(ctx.teacher_spec)
    with ctx.reporter.task(f"loading teacher {source.name}"):
        ctx.teacher = load_causal_lm(source, trust_remote_code=ctx.trust_remote_code)
    ctx.report.teacher = {**source.describe(), **ctx.teacher.info}
    return StageRecord("load_teacher", settings=source.describe(), metrics=dict(ctx.teacher.info))


def stage_load_corpus(ctx: RunContext) -> StageRecord:
    from .data import Corpus, load_corpus

    corpus_dir = ctx.run.path("corpus")
    settings = {
        "source": str(ctx.data_spec or "default"),
        "block_len": ctx.profile.compression.distill.seq_len,
        "heldout_fraction": ctx.profile.compression.evaluation.heldout_fraction,
    }
    if (corpus_dir / "corpus.json").exists():
        ctx.corpus = Corpus.load(corpus_dir)  # resume: the exact same blocks
    else:
        with ctx.reporter.task("tokenising corpus"):
            ctx.corpus = load_corpus(
                ctx.data_spec, ctx.teacher.tokenizer, settings["block_len"],
                settings["heldout_fraction"], ctx.text_field,
            )
        ctx.corpus.save(corpus_dir)
    ctx.report.corpus = ctx.corpus.describe()
    return StageRecord(
        "load_corpus", settings=settings, metrics=dict(ctx.corpus.stats),
        artifacts={"train blocks": "corpus/train.npy", "held-out blocks": "corpus/heldout.npy"},
    )


def heldout_eval_blocks(ctx: RunContext):
    return ctx.corpus.heldout[: ctx.profile.compression.evaluation.max_heldout_blocks]


def stage_evaluate_teacher(ctx: RunContext) -> StageRecord:
    from .evaluate import evaluate, torch_logits_fn

    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating teacher on held-out blocks", total=len(blocks), unit="blocks") as advance:
        metrics = evaluate(torch_logits_fn(ctx.teacher.model), blocks, progress=advance)
    return StageRecord(
        "evaluate_teacher",
        settings={"heldout_blocks": len(blocks), "block_len": int(blocks.shape[1])},
        metrics=metrics.to_dict(),
    )


def _calibration_blocks(ctx: RunContext):
    from .data import calibration_blocks

    return calibration_blocks(ctx.corpus.train, ctx.profile.compression.prune.calibration_blocks)


def stage_score_blocks(ctx: RunContext) -> StageRecord:
    from .fileio import atomic_write_json
    from .prune import loss_increase_scores, score_blocks

    settings = ctx.profile.compression.prune
    calib = _calibration_blocks(ctx)
    model = ctx.teacher.model
    with ctx.reporter.task("scoring blocks (calibration pass)", total=len(calib), unit="blocks") as advance:
        scores = score_blocks(model, calib, progress=advance)
    if settings.method == "loss_increase":
        with ctx.reporter.task("measuring loss increase per dropped block", total=model.config.num_hidden_layers, unit="blocks") as advance:
            scores.loss_increase = loss_increase_scores(model, calib, progress=advance)
    atomic_write_json(ctx.run.path("prune", "scores.json"), scores.to_dict())
    return StageRecord(
        "score_blocks", settings={"method": settings.method, "calibration_blocks": len(calib)},
        metrics={"calibration_tokens": scores.calibration_tokens}, artifacts={"block scores": "prune/scores.json"},
    )


def _rebuild_student(ctx: RunContext) -> Any:
    """The pruned student from the stored plan (deterministic; used on resume)."""
    from .prune import apply_mlp_channels, make_student

    plan = ctx.prune_plan or json.loads(ctx.run.path("prune", "plan.json").read_text())
    ctx.prune_plan = plan
    student = make_student(ctx.teacher.model, plan["keep"])
    if plan.get("mlp_channels"):
        apply_mlp_channels(student, plan["mlp_channels"])
    return student.eval()


def stage_prune(ctx: RunContext) -> StageRecord:
    from .costmodel import ArchShape
    from .evaluate import evaluate, torch_logits_fn
    from .fileio import atomic_write_json
    from .planner import plan_depth
    from .plots import block_scores_plot
    from .prune import (
        BlockScores,
        mlp_channel_importance,
        resolve_keep_layers,
        select_layers,
        select_mlp_channels,
    )

    settings = ctx.profile.compression.prune
    teacher = ctx.teacher.model
    n_layers = teacher.config.num_hidden_layers
    scores = BlockScores.from_dict(json.loads(ctx.run.path("prune", "scores.json").read_text()))
    keep_n = resolve_keep_layers(settings.keep_layers, n_layers)
    depth_plan: dict[str, Any] = {"reason": f"keep_layers={settings.keep_layers} from the profile"}
    if keep_n is None:
        keep_n, depth_plan = plan_depth(ctx.profile, ArchShape.from_config(teacher.config))
    keep = select_layers(scores, keep_n, settings.method)
    mlp_channels = None
    if settings.mlp_keep_fraction < 1.0:
        importance = mlp_channel_importance(teacher, _calibration_blocks(ctx))
        mlp_channels = select_mlp_channels(importance, settings.mlp_keep_fraction)
    ctx.prune_plan = {"keep": keep, "layer_map": keep, "mlp_channels": mlp_channels, "depth_plan": depth_plan}
    atomic_write_json(ctx.run.path("prune", "plan.json"), ctx.prune_plan)
    ctx.student = _rebuild_student(ctx)
    removed = [i for i in range(n_layers) if i not in keep]
    block_scores_plot(ctx.run.path("prune", "scores.png"),
                      {"block_influence": scores.block_influence, "angular_distance": scores.angular_distance,
                       "loss_increase": scores.loss_increase}, removed)
    rows = [[i, "kept" if i in keep else "removed", round(scores.block_influence[i], 5), round(scores.angular_distance[i], 5),
             None if scores.loss_increase is None else round(scores.loss_increase[i], 5)] for i in range(n_layers)]
    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating pruned student (no healing)", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(ctx.student), blocks, torch_logits_fn(teacher), progress=advance)
    from .models import model_summary

    return StageRecord(
        "prune",
        settings={"method": settings.method, "keep_layers": settings.keep_layers, "mlp_keep_fraction": settings.mlp_keep_fraction},
        metrics={"kept_layers": len(keep), "removed_blocks": removed, "layer_map": keep,
                 "intermediate_size": ctx.student.config.intermediate_size, "depth_plan": depth_plan,
                 "student": model_summary(ctx.student), "heldout": m.to_dict(), "block_table": rows},
        artifacts={"prune plan": "prune/plan.json", "block scores plot": "prune/scores.png"},
    )


def stage_teacher_logits(ctx: RunContext) -> StageRecord:
    from . import logit_cache

    ds = ctx.profile.compression.distill
    train = ctx.corpus.train
    what = f"{ds.logit_cache_top_k} sampled tokens" if ds.logit_cache_kind == "sample" else f"top-{ds.logit_cache_top_k} logits"
    with ctx.reporter.task(f"caching the teacher's {what} per position", total=len(train), unit="blocks") as advance:
        cache = logit_cache.build(ctx.teacher.model, train, ds.logit_cache_top_k, ds.temperature,
                                  ctx.run.path("teacher-logits"), batch_size=ds.batch_size, progress=advance,
                                  kind=ds.logit_cache_kind, seed=ds.seed)
    tokens = int(cache.indices.shape[0] * cache.indices.shape[1])
    return StageRecord("teacher_logits", settings={"top_k": cache.k, "kind": cache.kind, "temperature": ds.temperature},
                       metrics={"tokens": tokens, "size_mb": logit_cache.cache_size_bytes(tokens, cache.k) / 1e6,
                                "mb_per_million_tokens": cache.bytes_per_million_tokens() / 1e6},
                       artifacts={"teacher logit cache": "teacher-logits"})


def _logit_cache(ctx: RunContext) -> Any:
    from . import logit_cache

    ds = ctx.profile.compression.distill
    if ds.logit_cache_top_k is None:
        return None
    return logit_cache.load(ctx.run.path("teacher-logits"), ds.logit_cache_top_k, ds.temperature, ctx.corpus.train,
                            ds.logit_cache_kind)


def stage_distill(ctx: RunContext) -> StageRecord:
    from .distill import DistillConfig, check_memory, distill, estimate_training_memory
    from .fileio import atomic_path
    from .logit_cache import live_target_bytes_per_token
    from .plots import loss_curves_plot

    if ctx.student is None:
        ctx.student = _rebuild_student(ctx)
    cfg = DistillConfig.from_settings(ctx.profile.compression.distill)
    teacher_cfg = ctx.teacher.model.config
    if ctx.student.config.num_hidden_layers == teacher_cfg.num_hidden_layers and \
            ctx.student.config.intermediate_size == teacher_cfg.intermediate_size:
        # nothing was pruned: the student is the teacher, and distilling it from itself changes nothing
        with atomic_path(ctx.run.path("student")) as tmp:
            ctx.student.save_pretrained(tmp)
            ctx.teacher.tokenizer.save_pretrained(tmp)
        return StageRecord("distill", settings={"steps": 0}, metrics={"skipped": "nothing was pruned; the student equals the teacher"},
                           artifacts={"student (Hugging Face directory)": "student"})
    estimate = estimate_training_memory(ctx.teacher.model, ctx.student, cfg.batch_size, ctx.corpus.block_len,
                                        attention_loss=cfg.w_attention > 0, hidden_loss=cfg.w_hidden > 0)
    check_memory(estimate)
    with ctx.reporter.task("distilling", total=cfg.steps, unit="steps") as advance:
        outcome = distill(ctx.student, ctx.teacher.model, ctx.corpus.train, cfg, ctx.prune_plan["layer_map"],
                          run_dir=ctx.run.path("distill"), resume=True, progress=advance, logit_cache=_logit_cache(ctx))
    with atomic_path(ctx.run.path("student")) as tmp:
        ctx.student.save_pretrained(tmp)
        ctx.teacher.tokenizer.save_pretrained(tmp)
    loss_curves_plot(ctx.run.path("distill", "loss.png"), outcome.history, "distillation losses")
    from dataclasses import asdict

    return StageRecord(
        "distill", settings=asdict(cfg),
        metrics={**outcome.summary(), "memory_estimate_gb": round(estimate["total"] / 1e9, 2),
                 "logit_cache": ctx.profile.compression.distill.logit_cache_top_k is not None,
                 "live_targets_if_cached_bytes_per_token": live_target_bytes_per_token(
                     ctx.teacher.model.config, ctx.corpus.block_len)},
        artifacts={"student (Hugging Face directory)": "student", "loss curves": "distill/loss.png"},
    )


def stage_evaluate_student(ctx: RunContext) -> StageRecord:
    from .evaluate import evaluate, torch_logits_fn
    from .models import model_summary

    if ctx.student is None:
        from transformers import AutoModelForCausalLM

        ctx.student = AutoModelForCausalLM.from_pretrained(str(ctx.run.path("student"))).eval()
    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating student on held-out blocks", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(ctx.student), blocks, torch_logits_fn(ctx.teacher.model), progress=advance)
    return StageRecord("evaluate_student", settings={"heldout_blocks": len(blocks)},
                       metrics={**m.to_dict(), "student": model_summary(ctx.student)})


def _student_for_qat(ctx: RunContext) -> Any:
    """The distilled student if there is one, else a copy of the teacher (full-depth QAT)."""
    import copy

    from transformers import AutoModelForCausalLM

    if ctx.run.path("student", "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(str(ctx.run.path("student"))).eval()
    return copy.deepcopy(ctx.teacher.model)


def stage_qat(ctx: RunContext) -> StageRecord:
    """QAT-KD on the exact grid of the shipped format (or round-to-nearest when qat.steps is 0)."""
    from dataclasses import asdict

    from .distill import DistillConfig, check_memory, distill, estimate_training_memory
    from .evaluate import evaluate, torch_logits_fn
    from .fileio import atomic_path
    from .models import model_summary
    from .plots import loss_curves_plot
    from .quant import clip_factors, learned_clip_stats, materialize, prepare_qat

    fmt = ctx.profile.deployment.weight_format
    qs = ctx.profile.compression.qat
    student = _student_for_qat(ctx)
    layer_map = ctx.prune_plan["layer_map"] if ctx.prune_plan else list(range(student.config.num_hidden_layers))
    settings: dict[str, Any] = {"weight_format": fmt, "steps": qs.steps, "learning_rate": qs.learning_rate,
                                "clip_search": qs.clip_search and fmt == "q4_0", "learn_clip": qs.learn_clip and fmt == "q4_0"}
    metrics: dict[str, Any] = {}
    artifacts = {"QAT student (weights on the shipped grid)": "student-qat"}
    clips: dict[Any, Any] = {}
    if settings["clip_search"]:
        with ctx.reporter.task("searching Q4_0 scale clip factors (calibration pass)"):
            clips, clip_stats = clip_factors(student, fmt, _calibration_blocks(ctx))
        metrics.update(clip_stats)
    if qs.steps > 0 and fmt != "f16":
        cfg = DistillConfig.for_qat(ctx.profile.compression.distill, qs.steps, qs.learning_rate, qs.alpha)
        prepare_qat(student, fmt, clips, learn_clip=settings["learn_clip"])
        estimate = estimate_training_memory(ctx.teacher.model, student, cfg.batch_size, ctx.corpus.block_len, False, False)
        check_memory(estimate)
        with ctx.reporter.task(f"QAT-KD to {fmt}", total=cfg.steps, unit="steps") as advance:
            outcome = distill(student, ctx.teacher.model, ctx.corpus.train, cfg, layer_map,
                              run_dir=ctx.run.path("qat"), resume=True, progress=advance, logit_cache=_logit_cache(ctx))
        loss_curves_plot(ctx.run.path("qat", "loss.png"), outcome.history, f"QAT-KD losses ({fmt})")
        artifacts["QAT loss curves"] = "qat/loss.png"
        settings.update(asdict(cfg))
        metrics.update(outcome.summary())
        metrics.update(learned_clip_stats(student))
    else:
        settings["method"] = ("clipped scales, no QAT steps" if clips else "round-to-nearest (no QAT steps)") \
            if fmt != "f16" else "f16 (no quantization)"
    materialize(student, fmt, clips)
    with atomic_path(ctx.run.path("student-qat")) as tmp:
        student.save_pretrained(tmp)
        ctx.teacher.tokenizer.save_pretrained(tmp)
    ctx.quantized = student.eval()
    blocks = heldout_eval_blocks(ctx)
    with ctx.reporter.task("evaluating the quantized student (torch)", total=len(blocks), unit="blocks") as advance:
        m = evaluate(torch_logits_fn(ctx.quantized), blocks, torch_logits_fn(ctx.teacher.model), progress=advance)
    return StageRecord("qat", settings=settings, metrics={**metrics, "heldout": m.to_dict(), "student": model_summary(ctx.quantized)},
                       artifacts=artifacts)


def _qat_student(ctx: RunContext) -> Any:
    from transformers import AutoModelForCausalLM

    if ctx.quantized is None:  # resumed after the qat stage
        ctx.quantized = AutoModelForCausalLM.from_pretrained(str(ctx.run.path("student-qat"))).eval()
    return ctx.quantized


def exported_file_name(profile: DeviceProfile, export_format: str) -> str:
    """The file name the export stage writes for ``export_format`` ("gguf" or "onnx")."""
    fmt = profile.deployment.weight_format
    if export_format == "gguf":
        return f"model-{fmt}.gguf"
    return f"model-{'q4_0' if fmt == 'q4_0' else 'f32'}.onnx"  # int4 ONNX for q4_0, else fp32


def _parity_blocks(ctx: RunContext):
    return heldout_eval_blocks(ctx)[:8]


def stage_export(ctx: RunContext) -> StageRecord:
    """Write every format the profile names, then prove each file reproduces the torch model."""
    from .evaluate import torch_logits_fn
    from .exporters.checks import check_parity, require

    fmt = ctx.profile.deployment.weight_format
    student = _qat_student(ctx)
    torch_fn = torch_logits_fn(student)
    blocks = _parity_blocks(ctx)
    source = ctx.teacher.source
    artifacts, checks = {}, []
    threads = usable_threads(ctx.profile.deployment.threads)
    for export_format in ctx.profile.deployment.formats:
        if export_format == "gguf":
            from . import llamacpp
            from .exporters.gguf import export_gguf

            name = exported_file_name(ctx.profile, "gguf")
            with ctx.reporter.task(f"writing {name}"):
                path = export_gguf(student, ctx.teacher.tokenizer, ctx.run.path(name), fmt,
                                   source_gguf=source.path if source.kind in ("gguf", "default") else None,
                                   source_name=source.name, extra_metadata={"profile": ctx.profile.name})
            with ctx.reporter.task(f"parity check {name} (llama.cpp)"):
                result = check_parity(path, "llama.cpp", fmt, llamacpp.logits_fn(path, blocks.shape[1], threads), torch_fn, blocks)
        else:
            from .exporters.onnx import export_onnx
            from .onnxrt import Decoder

            name = exported_file_name(ctx.profile, "onnx")
            onnx_fmt = name[len("model-"):-len(".onnx")]
            with ctx.reporter.task(f"writing {name}"):
                path = export_onnx(student, ctx.run.path(name), onnx_fmt)
            with ctx.reporter.task(f"parity check {name} (onnxruntime, incl. KV-cache greedy decoding)"):
                dec = Decoder(path, threads)
                prompt = blocks[0, :32]
                import torch

                with torch.no_grad():
                    ref = student.generate(torch.from_numpy(prompt[None].astype("int64")), max_new_tokens=16, do_sample=False,
                                           pad_token_id=ctx.teacher.tokenizer.pad_token_id)[0, len(prompt):].tolist()
                result = check_parity(path, "onnxruntime", onnx_fmt, dec.logits, torch_fn, blocks, greedy=(dec.greedy(prompt, 16), ref))
        checks.append(result.to_dict())
        artifacts[name] = name
        require(result)
    floor = _llamacpp_floor(ctx, blocks) if "gguf" in ctx.profile.deployment.formats else None
    return StageRecord("export", settings={"formats": ctx.profile.deployment.formats, "weight_format": fmt,
                                           "parity_blocks": int(len(blocks))},
                       metrics={"parity": checks, "llamacpp_floor": floor}, artifacts=artifacts)


def _llamacpp_floor(ctx: RunContext, blocks) -> dict[str, Any] | None:
    """llama.cpp's own noise floor: the teacher's GGUF (weights equal to the fp32 teacher) against the fp32 teacher."""
    from . import llamacpp
    from .evaluate import evaluate, torch_logits_fn

    source = ctx.teacher.source
    if source.kind not in ("gguf", "default"):
        return None
    m = evaluate(llamacpp.logits_fn(source.path, blocks.shape[1], usable_threads(ctx.profile.deployment.threads)),
                 blocks, torch_logits_fn(ctx.teacher.model))
    return {"file": source.path.name, "kl": m.kl_to_teacher, "top1_agreement": m.top1_agreement, "tokens": m.tokens}


def stage_bench(ctx: RunContext) -> StageRecord:
    """Benchmark every exported file; the runtime's own file is the one checked against the budgets."""
    from .benchmark import bench
    from .budgets import BUDGET_METRICS
    from .plots import tradeoff_plot
    from .profiles import RUNTIME_FORMAT

    runtime_file = exported_file_name(ctx.profile, RUNTIME_FORMAT[ctx.profile.deployment.runtime])
    names = list(dict.fromkeys([runtime_file] + [exported_file_name(ctx.profile, f) for f in ctx.profile.deployment.formats]))
    threads = usable_threads(ctx.profile.deployment.threads)
    results = {}
    for name in names:
        with ctx.reporter.task(f"benchmarking {name} ({threads} threads)"):
            results[name] = bench(ctx.run.path(name), ctx.profile, threads=threads)
    main = results[runtime_file]
    ctx.measured.update({k: v for k, v in main.measured().items() if v is not None})
    for check in main.budgets:
        ctx.measured_sources[BUDGET_METRICS[check.budget][0]] = check.source
    kl = _exported_kl(ctx)
    points = [{"label": name, "file_mb": r.file_mb, "host_tps": r.tg_tokens_per_s.median,
               "projected_tps": r.projection["decode_tokens_per_s"] if r.projection else None, "kl": kl}
              for name, r in results.items()]
    b = ctx.profile.budgets
    tradeoff_plot(ctx.run.path("bench", "tradeoff.png"), points, b.max_model_mb, b.min_decode_tokens_per_s, ctx.profile.name)
    return StageRecord("bench", settings={"files": names, "budgets_checked_on": runtime_file, "threads": threads,
                                          "prompt_tokens": main.prompt_tokens, "gen_tokens": main.gen_tokens},
                       metrics={"bench": main.to_dict(), "all": {n: r.to_dict() for n, r in results.items()}},
                       artifacts={"size vs speed vs KL": "bench/tradeoff.png"})


def _exported_kl(ctx: RunContext) -> float | None:
    """KL to the teacher of the shipped weights (held-out, torch), shared by every exported file."""
    rec = ctx.report.stage("qat")
    return rec.metrics["heldout"].get("kl_to_teacher") if rec is not None else None


STAGES: dict[str, Stage] = {
    "load_teacher": stage_load_teacher,
    "load_corpus": stage_load_corpus,
    "evaluate_teacher": stage_evaluate_teacher,
    "score_blocks": stage_score_blocks,
    "prune": stage_prune,
    "teacher_logits": stage_teacher_logits,
    "distill": stage_distill,
    "evaluate_student": stage_evaluate_student,
    "qat": stage_qat,
    "export": stage_export,
    "bench": stage_bench,
}
ALWAYS_RUN = {"load_teacher", "load_corpus"}


def plan_stages(profile: DeviceProfile) -> list[str]:
    """The stages edgekd runs for ``profile``, in order."""
    stages = ["load_teacher", "load_corpus", "evaluate_teacher"]
    comp = profile.compression
    if comp.prune.method != "none":
        stages += ["score_blocks", "prune"]
    training = (comp.distill.steps > 0 and comp.prune.method != "none") or comp.qat.steps > 0
    if comp.distill.logit_cache_top_k is not None and training:
        stages += ["teacher_logits"]
    if comp.distill.steps > 0 and comp.prune.method != "none":
        stages += ["distill", "evaluate_student"]
    return stages + ["qat", "export", "bench"]


def _collect_evaluation(ctx: RunContext) -> None:
    """The held-out comparison table: teacher, pruned student, distilled student."""
    def row(summary: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
        return {"params": summary.get("params"), "layers": summary.get("layers"), "perplexity": m["perplexity"],
                "kl_to_teacher": m.get("kl_to_teacher"), "top1_agreement": m.get("top1_agreement"), "tokens": m["tokens"]}

    rec = ctx.report.stage("evaluate_teacher")
    if rec is not None:
        ctx.report.evaluation["teacher (fp32)"] = row(ctx.report.teacher, rec.metrics)
    rec = ctx.report.stage("prune")
    pruned = rec is not None and rec.metrics["student"].get("params") != ctx.report.teacher.get("params")
    if pruned:  # a full-depth "student" is the teacher itself: no rows that only repeat it
        ctx.report.evaluation["pruned, no healing"] = row(rec.metrics["student"], rec.metrics["heldout"])
    if rec is not None:
        ctx.report.tables["Block importance (teacher)"] = {
            "headers": ["block", "decision", "Block Influence", "angular distance (n=1)", "loss increase"],
            "rows": rec.metrics["block_table"]}
    rec = ctx.report.stage("evaluate_student")
    if rec is not None and pruned:
        ctx.report.evaluation["student, distilled"] = row(rec.metrics["student"], rec.metrics)
    rec = ctx.report.stage("qat")
    if rec is not None:
        fmt = rec.settings.get("weight_format")
        method = "QAT-KD" if rec.settings.get("steps") else ("clipped scales" if rec.settings.get("clip_search") else "round-to-nearest")
        label = f"student, {fmt} {method} (torch)"
        ctx.report.evaluation[label] = row(rec.metrics["student"], rec.metrics["heldout"])
    rec = ctx.report.stage("export")
    if rec is not None:
        rows = [[Path(c["file"]).name, c["runtime"], round(c["kl"], 6), round(c["top1_agreement"], 4), c["max_kl"], c["min_top1"],
                 {True: "yes", False: "NO", None: "n/a"}[c["greedy_match"]], "pass" if c["passed"] else "FAIL"] for c in rec.metrics["parity"]]
        floor = rec.metrics.get("llamacpp_floor")
        if floor:
            rows.append([f"{floor['file']} (teacher, reference floor)", "llama.cpp", round(floor["kl"], 6),
                         round(floor["top1_agreement"], 4), None, None, "n/a", "reference"])
        ctx.report.tables["Export parity (runtime vs torch, held-out blocks)"] = {
            "headers": ["file", "runtime", "KL per token", "top-1 agreement", "KL limit", "top-1 limit", "greedy match", "verdict"],
            "rows": rows}
    rec = ctx.report.stage("bench")
    if rec is not None:
        results = rec.metrics.get("all") or {Path(rec.metrics["bench"]["model"]).name: rec.metrics["bench"]}
        rows, proj_rows = [], []
        for name, b in results.items():
            rows.append([name, b["runtime"], b["threads"], round(b["pp_tokens_per_s"]["median"], 1),
                         round(b["tg_tokens_per_s"]["median"], 1), round(b["ttft_ms"]["median"], 1), round(b["peak_rss_mb"]),
                         round(b["file_mb"], 1), round(b["energy"]["energy_mj_per_token"], 1)])
            p = b.get("projection")
            if p:
                proj_rows.append([name, round(p["decode_tokens_per_s"], 1), round(p["ttft_ms"]), round(p["roofline_decode_tokens_per_s"], 1),
                                  round(p["roofline_ttft_ms"]), f"{100 * p['host_efficiency_decode']:.0f}%", p["device_decode_bound"]])
        ctx.report.tables["On-device benchmark (measured on this host)"] = {
            "headers": ["file", "runtime", "threads", "pp tokens/s", "tg tokens/s", "TTFT ms", "peak RSS MB", "file MB", "energy mJ/token"],
            "rows": rows}
        if proj_rows:
            ctx.report.tables[f"PROJECTION to {ctx.profile.name} (host-calibrated roofline; not measured on the device)"] = {
                "headers": ["file", "decode tokens/s", "TTFT ms", "roofline alone tokens/s", "roofline alone TTFT ms",
                            "host efficiency (decode)", "device decode bound"], "rows": proj_rows}


# ---------------------------------------------------------------- driver


def _run_stages(ctx: RunContext) -> None:
    report, run = ctx.report, ctx.run
    for stage_name in report.plan:
        done = None if stage_name in ALWAYS_RUN else run.completed(stage_name)
        if done is not None:
            ctx.reporter.info(f"  {stage_name}: done earlier, reused")
            report.stages.append(done)
            continue
        t0 = time.perf_counter()
        record = STAGES[stage_name](ctx)
        record.wall_time_s = round(time.perf_counter() - t0, 3)
        run.record(record)
        report.stages.append(record)
        report.save(run.root)  # a readable (status: running) report after every stage


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def compress(
    teacher: str | Path | None = None,
    profile: str | Path | DeviceProfile = "raspberry-pi-5",
    data: str | Path | None = None,
    *,
    output: str | Path = "export",
    run_name: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    text_field: str = "text",
    quiet: bool = False,
) -> Report:
    """Compress ``teacher`` for the device ``profile`` and return the run's :class:`Report`.

    ``teacher``: a Hugging Face model directory, a GGUF file, or None for the embedded
    SmolLM2-135M-Instruct. ``data``: a text/JSONL file, a directory, a saved datasets
    directory, or None for Python's bundled documentation. ``report.passed`` tells
    whether every measured budget of the profile holds.
    """
    from .data import check_corpus_spec
    from .models import resolve_model_source

    reporter = Reporter(quiet=quiet)
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, overrides)
    # fail fast on bad paths, before any directory is made
    source = resolve_model_source(teacher)
    check_corpus_spec(data)
    name = run_name or f"{prof.name}-{_slug(source.name)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EdgekdError(f"bad run name {name!r}", fix="use letters, digits, '.', '_' and '-' only")
    run = RunDir(Path(output) / name)
    run_config = {
        "profile": prof.model_dump(mode="json"),
        "teacher": source.describe(),
        "data": str(data or "default"),
        "text_field": text_field,
    }
    resumed = run.open(run_config, overwrite=overwrite, resume=resume)
    report = Report(
        run_name=name, run_dir=str(run.root), profile=prof.model_dump(mode="json"),
        edgekd_version=edgekd_version(), created_at=now_iso(),
        host=host_info(), versions=library_versions(), plan=plan_stages(prof),
    )
    ctx = RunContext(prof, run, report, reporter, teacher, data, text_field, trust_remote_code)
    reporter.info(f"[bold]edgekd[/] {'resuming' if resumed else 'run'} {run.root}  plan: {' -> '.join(report.plan)}")
    try:
        _run_stages(ctx)
    except EdgekdError:
        # A user error before any expensive stage finished: remove the run this call
        # created, so fixing the input and re-running needs no --overwrite.
        if not resumed and not any(s.name not in ALWAYS_RUN for s in report.stages):
            run.discard()
        raise
    _collect_evaluation(ctx)
    report.budgets = check_budgets(
        prof.budgets, ctx.measured, ctx.measured_sources,
        missing_reason="no exported model was benchmarked in this run",
    )
    report.status = "complete"
    report.finished_at = now_iso()
    report.save(run.root)
    reporter.info(f"[green]done[/]: {run.root / 'report.md'}")
    return report
