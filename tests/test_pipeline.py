"""End-to-end runs on a tiny random model, and the user-facing errors of `edgekd compress`."""

import json

import pytest

import edgekd
from edgekd import EdgekdError
from edgekd.cli import main


def run(tmp_path, tiny_model_dir, small_corpus_file, overrides, **kw):
    return edgekd.compress(
        teacher=tiny_model_dir, profile="raspberry-pi-5", data=small_corpus_file,
        output=tmp_path, run_name="tiny", overrides=overrides, quiet=True, **kw,
    )


def test_end_to_end_tiny(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    report = run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides)
    run_dir = tmp_path / "tiny"
    data = json.loads((run_dir / "report.json").read_text())
    assert data["status"] == "complete" and data["schema"] == "edgekd.report/2"
    assert data["versions"]["torch"] and data["versions"]["transformers"]
    teacher = data["evaluation"]["teacher (fp32)"]
    assert teacher["perplexity"] > 1 and teacher["tokens"] == 4 * 63
    assert [s["name"] for s in data["stages"]] == report.plan
    assert all(s["wall_time_s"] >= 0 for s in data["stages"])
    assert "teacher (fp32)" in (run_dir / "report.md").read_text()
    # every budget of the profile was checked on the benchmark of the exported file
    assert len(report.budgets) == 5 and not report.unchecked()
    assert all(c.measured is not None for c in report.budgets)
    assert (run_dir / "corpus" / "heldout.npy").exists()
    # pruning and distillation produced a loadable, smaller Hugging Face student
    # no teacher_logits: the profile's hidden-state cache serves logit-only steps, and its distillation and
    # QAT-KD steps match hidden states too, so they run the teacher (tests/test_profiles.py)
    assert report.plan == ["load_teacher", "load_corpus", "evaluate_teacher", "score_blocks", "prune", "distill",
                           "evaluate_student", "qat", "export", "bench"]
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 3
    assert set(data["evaluation"]) == {"teacher (fp32)", "pruned, no healing", "student, distilled", "student, q4_0 QAT-KD (torch)"}
    # the exported Q4_0 GGUF passed its llama.cpp parity check against the QAT torch model
    export = next(s for s in data["stages"] if s["name"] == "export")
    parity = export["metrics"]["parity"][0]
    assert parity["passed"] and parity["kl"] <= 0.01 and (run_dir / "model-q4_0.gguf").exists()
    assert "Export parity" in (run_dir / "report.md").read_text()
    distilled = data["evaluation"]["student, distilled"]
    assert distilled["kl_to_teacher"] > 0 and 0 <= distilled["top1_agreement"] <= 1
    prune = next(s for s in data["stages"] if s["name"] == "prune")
    assert len(prune["metrics"]["layer_map"]) == 3 and len(prune["metrics"]["removed_blocks"]) == 1
    md = (run_dir / "report.md").read_text()
    assert "Block importance (teacher)" in md and "![loss curves](distill/loss.png)" in md
    assert (run_dir / "prune" / "scores.png").stat().st_size > 1000 and (run_dir / "distill" / "loss.png").exists()
    assert json.loads((run_dir / "distill" / "checkpoints" / "latest.json").read_text())["step"] == 4


def test_qat_hidden_state_term_on_a_pruned_student(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    """qat.losses' hidden-state term (the default, set here explicitly): the pruned student's blocks are
    matched to the teacher blocks they were kept from (the prune stage's layer map), and the stage
    records the term it trained with."""
    run(tmp_path, tiny_model_dir, small_corpus_file,
        [*tiny_profile_overrides, "compression.qat.losses={logit_kl: 1.0, hidden_mse: 30.0}"])
    data = json.loads((tmp_path / "tiny" / "report.json").read_text())
    qat = next(s for s in data["stages"] if s["name"] == "qat")
    prune = next(s for s in data["stages"] if s["name"] == "prune")
    assert len(prune["metrics"]["removed_blocks"]) == 1
    assert (qat["settings"]["w_logit"], qat["settings"]["w_hidden"]) == (1.0, 30.0)
    assert qat["metrics"]["steps"] > 0 and qat["metrics"]["final_hidden"] > 0


def test_second_run_is_refused_then_resumed(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    first = run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides)
    with pytest.raises(EdgekdError, match="already holds a finished run"):
        run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides)
    again = run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, resume=True)
    # the evaluation stage was reused, not recomputed
    assert again.stage("evaluate_teacher").metrics == first.stage("evaluate_teacher").metrics
    assert again.stage("evaluate_teacher").wall_time_s == first.stage("evaluate_teacher").wall_time_s
    # the reused bench stage's checks are still the run's budgets
    assert [c.to_dict() for c in again.budgets] == [c.to_dict() for c in first.budgets] and not again.unchecked()
    fresh = run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, overwrite=True)
    assert fresh.status == "complete"


def test_cli_compress_and_report(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, capsys):
    sets = [a for o in tiny_profile_overrides for a in ("--set", o)]
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file),
                 "--output", str(tmp_path), "--run-name", "cli", "--quiet", *sets])
    assert code == 0
    (tmp_path / "cli" / "report.md").unlink()
    assert main(["report", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.md").exists()
    assert "teacher (fp32)" in capsys.readouterr().out


def test_cli_exit_1_when_a_budget_fails(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, monkeypatch):
    from types import SimpleNamespace

    from edgekd.device.budgets import BudgetCheck
    from edgekd.pipeline import run as pipeline_run
    from edgekd.report import StageRecord
    from edgekd.stages import STAGES, Stage

    def fake_bench_stage(ctx):  # a benchmark whose measured file size breaks the budget
        ctx.bench = SimpleNamespace(budgets=[BudgetCheck("max_model_mb", 80.0, "MB", 1e6, False, "measured: file size")])
        return StageRecord("bench_stub")

    monkeypatch.setitem(STAGES, "bench_stub", Stage(fake_bench_stage))
    monkeypatch.setattr(pipeline_run, "plan_stages", lambda prof, data_free=False: ["load_teacher", "load_corpus", "bench_stub"])
    sets = [a for o in tiny_profile_overrides for a in ("--set", o)]
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file),
                 "--output", str(tmp_path), "--quiet", *sets])
    assert code == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--profile", "raspberry-pi-5", "--set", "deployment.threadz=2"], "did you mean 'threads'"),
        (["--set", "compression.data.mixture={corpus:0.5,teacher_samples:0.5}"], "YAML needs a space after the colon: corpus: 0.5"),
        (["--teacher", "/no/such/dir"], "model not found: /no/such/dir"),
        (["--data", "/no/such/corpus.txt"], "corpus not found"),
        (["--run-name", "bad name!"], "bad run name"),
    ],
)
def test_cli_bad_input_exit_2_no_traceback_no_files(tmp_path, tiny_model_dir, capsys, args, message):
    base = ["compress", "--output", str(tmp_path / "out"), "--quiet"]
    if "--teacher" not in args:
        base += ["--teacher", str(tiny_model_dir)]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and "Traceback" not in err
    # nothing half-written: no run directory with a report
    assert not list((tmp_path / "out").glob("*/report.json"))


def test_cli_refuses_finished_run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, capsys):
    sets = [a for o in tiny_profile_overrides for a in ("--set", o)]
    args = ["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file),
            "--output", str(tmp_path), "--run-name", "x", "--quiet", *sets]
    assert main(args) == 0
    before = (tmp_path / "x" / "report.json").read_bytes()
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (tmp_path / "x" / "report.json").read_bytes() == before


def test_empty_corpus_error_leaves_no_run_directory(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["compress", "--teacher", str(tiny_model_dir), "--data", str(empty),
                 "--output", str(tmp_path / "out"), "--quiet"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_width_pruning_through_the_pipeline(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    report = run(tmp_path, tiny_model_dir, small_corpus_file,
                 tiny_profile_overrides + ["compression.prune.mlp_keep_fraction=0.5"])
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "student")
    assert student.config.intermediate_size == 64 and student.config.num_hidden_layers == 3
    assert report.stage("prune").metrics["intermediate_size"] == 64


def test_resume_after_prune_rebuilds_the_student(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, monkeypatch):
    from edgekd.stages import STAGES, Stage

    def crash(ctx):
        raise RuntimeError("killed during distillation")

    monkeypatch.setitem(STAGES, "distill", Stage(crash))
    with pytest.raises(RuntimeError):
        run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides)
    monkeypatch.undo()
    report = run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, resume=True)
    assert report.status == "complete" and "student, distilled" in report.evaluation


def test_logit_cache_through_the_pipeline(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    report = run(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides + ["compression.distill.logit_cache.k=8",
                                                                                    "compression.distill.logit_cache.kind=sample"])
    assert "teacher_logits" in report.plan and report.plan.index("teacher_logits") < report.plan.index("distill")
    rec = report.stage("teacher_logits")
    assert rec.metrics["mb_per_million_tokens"] == 64.0  # 8 bytes x k=8
    assert report.stage("distill").metrics["logit_cache"] is True


def test_hidden_state_cache_through_the_pipeline(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    # QAT-KD on the logits alone: the step the cache spares the teacher's pass
    sets = [*tiny_profile_overrides, "compression.distill.logit_cache.kind=hidden", "compression.qat.losses={logit_kl: 1.0}"]
    report = run(tmp_path, tiny_model_dir, small_corpus_file, sets)
    rec = report.stage("teacher_logits")
    assert rec.settings["kind"] == "hidden" and rec.metrics["mb_per_million_tokens"] == 64 * (2 if rec.settings["precision"] == "bf16" else 4)
    # distillation's hidden-state and attention losses run the teacher; QAT-KD reads its targets from the cache
    assert report.stage("distill").metrics["teacher_while_training"] != report.stage("qat").metrics["teacher_while_training"]
    assert "but its head" in report.stage("qat").metrics["teacher_while_training"]
    resumed = run(tmp_path, tiny_model_dir, small_corpus_file, sets, resume=True)
    assert resumed.status == "complete"


def test_failed_parity_check_stops_the_run_with_exit_2(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, monkeypatch, capsys):
    from edgekd.formats import FORMATS

    monkeypatch.setitem(FORMATS["q4_0"].parity, "llama.cpp", (0.0, 1.01))  # impossible limits
    sets = [a for o in tiny_profile_overrides for a in ("--set", o)]
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file),
                 "--output", str(tmp_path), "--run-name", "p", "--quiet", *sets])
    assert code == 2
    err = capsys.readouterr().err
    assert "parity check failed for model-q4_0.gguf" in err and "top-1 agreement" in err and "Traceback" not in err
    state = json.loads((tmp_path / "p" / "report.json").read_text())
    assert state["status"] == "running"  # never marked complete
    assert "export" not in [s["name"] for s in state["stages"]]


def test_full_depth_profile_runs_qat_and_onnx_export(tmp_path, tiny_model_dir, small_corpus_file):
    """The phone profile keeps every layer (budgets hold at full depth) and ships an int4 ONNX;
    with a GGUF asked for too, both files are benchmarked and the ONNX one gates the budgets."""
    report = edgekd.compress(
        teacher=tiny_model_dir, profile="phone", data=small_corpus_file, output=tmp_path, run_name="phone", quiet=True,
        overrides=["compression.data.block_len=64", "compression.evaluation.max_heldout_blocks=4",
                   "compression.prune.calibration_blocks=4", "compression.qat.steps=2", "compression.distill.batch_size=2",
                   "deployment.formats=[onnx, gguf]", "compression.planner.candidates=[q4_0]"],
    )
    bench = report.stage("bench")
    onnx_file = "model-q4_0-genai/model-q4_0.onnx"
    assert set(bench.metrics["all"]) == {onnx_file, "model-q4_0.gguf"}
    assert bench.settings["budgets_checked_on"] == onnx_file
    assert all(b["projection"]["label"].startswith("PROJECTION") for b in bench.metrics["all"].values())
    assert (tmp_path / "phone" / "bench" / "tradeoff.png").stat().st_size > 1000
    md = (tmp_path / "phone" / "report.md").read_text()
    assert "PROJECTION to phone" in md and "![size vs speed vs KL](bench/tradeoff.png)" in md
    qat = report.stage("qat")
    assert qat.settings["clip_search"] is True and 0.6 <= qat.metrics["mean_clip"] <= 1.0
    assert report.stage("prune").metrics["kept_layers"] == 4
    assert report.stage("distill").metrics.get("skipped")
    parity = report.stage("export").metrics["parity"]
    assert [p["runtime"] for p in parity] == ["onnxruntime-genai", "llama.cpp"] and parity[0]["greedy_match"] is True
    folder = tmp_path / "phone" / "model-q4_0-genai"
    assert {"model-q4_0.onnx", "model-q4_0.onnx.data", "genai_config.json", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
    assert report.stage("bench").metrics["bench"]["runtime"].startswith("onnxruntime-genai")


def test_planner_chooses_formats_and_the_files_follow_its_plan(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    """tensor_formats, depth and width auto: the sensitivity and plan stages run, the plan meets a
    size budget set between the all-4-bit and all-8-bit files, and QAT and the GGUF use its formats."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    from edgekd.device.costmodel import ArchShape, model_bytes
    from edgekd.formats import FormatPlan

    shape = ArchShape.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    low = model_bytes(shape, FormatPlan.uniform("q4_0", {"embedding": "q4_0"})) / 1e6
    high = model_bytes(shape, FormatPlan.uniform("q8_0")) / 1e6
    budget = round((low + high) / 2, 4)
    overrides = [o for o in tiny_profile_overrides if "keep_layers" not in o] + [
        "deployment.tensor_formats=auto", "compression.prune.mlp_keep_fraction=auto", "compression.planner.sensitivity_blocks=2",
        "compression.planner.candidates=[q4_0, q8_0]", "compression.planner.embedding_candidates=[q4_0, q8_0]",
        "compression.planner.mlp_fractions=[0.5]", f"budgets.max_model_mb={budget}"]
    report = run(tmp_path, tiny_model_dir, small_corpus_file, overrides)
    assert report.plan[3:5] == ["sensitivity", "plan"]
    chosen = report.stage("plan").metrics["chosen"]
    assert chosen["model_mb"] <= budget and not chosen["violations"] and chosen["predicted_kl"] > 0
    plan = FormatPlan.from_dict(chosen["formats"])
    assert report.stage("qat").settings["format_plan"] == plan.to_dict()
    assert report.stage("prune").metrics["kept_layers"] == chosen["layers"]
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "tiny" / f"model-{plan.name}.gguf")).tensors}
    for layer in range(chosen["layers"]):
        for role in ("attn_q", "ffn_down"):
            assert types[f"blk.{layer}.{role}.weight"] == plan.format_of(role, layer).gguf_type
    assert types["token_embd.weight"] == plan.format_of("embedding").gguf_type
    md = (tmp_path / "tiny" / "report.md").read_text()
    assert "Compression plan" in md and "Planner prediction against the measurement" in md and "plan/pareto.png" in md


def test_a_teacher_already_on_the_planned_grids_ships_exactly_without_qat(tmp_path, tiny_tokenizer, small_corpus_file,
                                                                         tiny_profile_overrides):
    """A teacher distributed in Q4_1 (as the default one is) planned at Q4_1: nothing to recover,
    so no QAT steps, and the exported file computes the teacher itself (at llama.cpp's floor)."""
    from conftest import make_tiny_llama

    from edgekd.formats import FormatPlan
    from edgekd.methods.qat import convert

    teacher = convert(make_tiny_llama(len(tiny_tokenizer), seed=5), FormatPlan.uniform("q4_1"))  # Q4_1 linears, Q8_0 embedding
    teacher.save_pretrained(tmp_path / "q41-teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "q41-teacher")
    overrides = [o for o in tiny_profile_overrides if "keep_layers" not in o] + [
        "deployment.weight_format=q4_1", "compression.prune.keep_layers=1.0"]
    report = edgekd.compress(teacher=tmp_path / "q41-teacher", profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path,
                             run_name="exact", overrides=overrides, quiet=True)
    qat = report.stage("qat")
    assert qat.settings["steps"] == 0 and qat.settings["method"].startswith("exact")
    assert qat.metrics["heldout"]["kl_to_teacher"] < 1e-9
    assert report.evaluation["student, q4_1 exact (torch)"]["kl_to_teacher"] < 1e-9
    assert report.stage("export").metrics["parity"][0]["passed"]


def test_an_impossible_budget_exits_2_naming_the_nearest_plans(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, capsys):
    sets = [a for o in tiny_profile_overrides if "keep_layers" not in o
            for a in ("--set", o)] + ["--set", "deployment.tensor_formats=auto", "--set", "budgets.max_model_mb=0.001",
                                      "--set", "compression.planner.sensitivity_blocks=2"]
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file), "--output", str(tmp_path),
                 "--run-name", "impossible", "--quiet", *sets])
    assert code == 2
    err = capsys.readouterr().err
    assert "no plan meets the raspberry-pi-5 budgets" in err and "(limit 0.001)" in err and "relax max_model_mb" in err
    assert "Traceback" not in err and not (tmp_path / "impossible" / "model-q4_0.gguf").exists()
