"""`edgekd eval`: token KL statistics as llama.cpp prints them, in every runtime, and the quality budgets."""

import json

import numpy as np
import pytest

import edgekd
from edgekd.cli import main
from edgekd.methods.evaluate import evaluate as heldout_evaluate
from edgekd.methods.kl_stats import compare, position_stats
from edgekd.quality.check import quality_checks


def test_statistics_by_hand():
    ref = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]]))
    got = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]))
    targets = np.array([0, 2, 1])
    v = position_stats(got, ref, targets)
    p, q = np.exp(ref), np.exp(got)
    assert np.allclose(v["kl"], (p * (np.log(p) - np.log(q))).sum(-1))
    assert np.allclose(v["dp"], [0.6 - 0.7, 0.5 - 0.3, 0.0])
    assert list(v["same"]) == [True, False, True]
    from edgekd.methods.kl_stats import summarize

    s = summarize(v)
    assert s.tokens == 3 and np.isclose(s.kl_max, v["kl"].max()) and np.isclose(s.kl_median, np.median(v["kl"]))
    assert np.isclose(s.delta_p_rms_pct, 100 * np.sqrt(np.mean(np.array([-0.1, 0.2, 0.0]) ** 2)))
    assert np.isclose(s.same_top1, 2 / 3) and any(line.startswith("RMS     Δp") for line in s.lines())


def test_mean_kl_and_top1_agree_with_the_held_out_evaluation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 50)), rng.normal(size=(7, 50))
    blocks = rng.integers(0, 50, size=(3, 6))
    fa = lambda x: np.repeat(a[None, :6], len(x), 0)  # noqa: E731
    fb = lambda x: np.repeat(b[None, :6], len(x), 0)  # noqa: E731
    s, m = compare(fa, fb, blocks), heldout_evaluate(fa, blocks, fb)
    assert np.isclose(s.kl_mean, m.kl_to_teacher, rtol=1e-5) and np.isclose(s.same_top1, m.top1_agreement)
    assert np.isclose(s.perplexity, m.perplexity, rtol=1e-5)


def test_a_quality_budget_not_measured_fails():
    checks = quality_checks({"max_kl_to_teacher": 0.1, "min_top1_agreement": None}, None, "no file")
    assert len(checks) == 1 and checks[0].passed is False and "not measured" in checks[0].describe()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_gguf_of):
    return tiny_gguf_of("q8_0")


def test_a_gguf_against_its_teacher_passes_and_fails_its_budgets(tiny_gguf, tiny_model_dir, small_corpus_file, tmp_path, capsys):
    result = edgekd.evaluate(tiny_gguf, against=tiny_model_dir, data=small_corpus_file, blocks=2, max_kl=0.05, min_top1=0.8)
    (c,) = result.comparisons
    assert c.runtime == "llama.cpp" and c.against == "teacher" and c.stats.tokens == 2 * 255
    assert 0 < c.stats.kl_mean < 0.05 and c.stats.same_top1 > 0.8 and result.passed and not result.failures
    junit = tmp_path / "q.xml"
    code = main(["eval", str(tiny_gguf), "--against", str(tiny_model_dir), "--data", str(small_corpus_file), "--blocks", "2",
                 "--max-kl", "1e-9", "--junit", str(junit), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "max_kl_to_teacher" in out and "FAILED" in out
    xml = junit.read_text()
    assert 'name="max_kl_to_teacher"' in xml and "<failure" in xml
    code = main(["eval", str(tiny_gguf), "--against", str(tiny_model_dir), "--data", str(small_corpus_file), "--blocks", "2",
                 "--profile", "raspberry-pi-5", "--set", "budgets.min_top1_agreement=0.5", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["passed"] and data["budgets"][0]["budget"] == "min_top1_agreement"


def test_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["eval", str(tmp_path / "notes.txt")]) == 2
    assert "not a model edgekd can score" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.gguf")]) == 2


@pytest.fixture(scope="module")
def tiny_f16_gguf(tiny_gguf_of):
    return tiny_gguf_of("f16")


def test_bench_checks_the_quality_budgets_against_a_reference_file(tiny_gguf, tiny_f16_gguf, small_corpus_file, tmp_path, capsys):
    """On a device without torch: the file against the teacher's GGUF, both in llama.cpp, text tokenized by llama.cpp."""
    junit = tmp_path / "bench.xml"
    quick = ["--repeats", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--no-projection", "--threads", "1"]
    code = main(["bench", str(tiny_gguf), "--against", str(tiny_f16_gguf), "--data", str(small_corpus_file), "--blocks", "2",
                 "--max-kl", "1e-9", "--min-top1", "0.5", "--junit", str(junit), "--json", *quick])
    data = json.loads(capsys.readouterr().out)
    q, verdicts = data["quality"], {b["budget"]: b["passed"] for b in data["budgets"]}
    assert code == 1 and q["runtime"] == "llama.cpp" and q["against"] == "tiny-f16.gguf" and q["tokens"] == 2 * 255
    assert 0 < q["kl_mean"] < 0.05 and verdicts["max_kl_to_teacher"] is False and verdicts["min_top1_agreement"] is True
    assert '<testcase classname="edgekd.bench.' in junit.read_text() and 'name="max_kl_to_teacher"><failure' in junit.read_text()
    # token blocks from a .npy (a run's corpus/heldout.npy) are scored as they are
    blocks = np.random.default_rng(0).integers(0, 200, size=(3, 32))
    np.save(tmp_path / "heldout.npy", blocks)
    result = edgekd.bench(tiny_gguf, against=tiny_f16_gguf, data=tmp_path / "heldout.npy", quality_blocks=2, repeats=1,
                          prompt_tokens=8, gen_tokens=4, projection=False, overrides=["budgets.max_kl_to_teacher=1.0"])
    assert result.quality["tokens"] == 2 * 31 and result.passed
    # a quality budget with no reference to measure it against fails: not measured is never a pass
    result = edgekd.bench(tiny_gguf, repeats=1, prompt_tokens=8, gen_tokens=4, projection=False,
                          overrides=["budgets.min_top1_agreement=0.5"])
    assert not result.passed and "not measured" in result.failures[-1] and "--against" in result.failures[-1]


def test_a_run_directory_is_scored_against_its_teacher_and_its_qat_master(tmp_path, tiny_model_dir, small_corpus_file,
                                                                          tiny_profile_overrides):
    pytest.importorskip("lm_eval")
    tasks = write_task(tmp_path / "tasks")
    report = edgekd.compress(teacher=tiny_model_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path, run_name="r",
                             overrides=tiny_profile_overrides + [
                                 "budgets.max_kl_to_teacher=1e-9", "compression.evaluation.tasks=[edgekd_tiny_mc]",
                                 f"compression.evaluation.task_include_path={tasks}", "budgets.min_task_accuracy={edgekd_tiny_mc: 1.0}",
                                 "compression.evaluation.chat_new_tokens=6"], quiet=True)
    # compress scored its file against the teacher and checked the quality budgets on it
    failed = report.failures()
    assert not report.passed and any("max_kl_to_teacher" in f for f in failed) and any("min_accuracy[edgekd_tiny_mc]" in f for f in failed)
    export = report.stage("export").metrics
    stats = export["against_teacher"]["model-q4_0.gguf"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert stats["runtime"] == "llama.cpp" and stats["kl_mean"] > 0 and "llama.cpp's KL statistics" in md
    # the tasks ran on the shipped file and on the teacher; the chat prompts through both, side by side
    task = export["tasks"]["model-q4_0.gguf"]["edgekd_tiny_mc"]
    assert 0 <= task["model"] <= 1 and 0 <= task["teacher"] <= 1 and "lm-evaluation-harness tasks" in md
    chat = export["chat"]
    assert len(chat) == 3 and set(chat[0]["files"]) == {"model-q4_0.gguf"} and chat[0]["teacher_tokens"] <= 6
    assert "Chat side by side" in md and chat[0]["prompt"] in md
    result = edgekd.evaluate(tmp_path / "r", blocks=3, max_kl=10.0)
    rows = {(c.model, c.against): c.stats for c in result.comparisons}
    assert set(rows) == {("student-qat (QAT master)", "teacher"), ("model-q4_0.gguf", "teacher"), ("model-q4_0.gguf", "QAT master (torch)")}
    export_loss, total = rows[("model-q4_0.gguf", "QAT master (torch)")], rows[("model-q4_0.gguf", "teacher")]
    assert export_loss.kl_mean < total.kl_mean  # the file is much closer to what it was written from
    assert result.passed and result.checks[0].budget == "max_kl_to_teacher [model-q4_0.gguf]"


# ---------------------------------------------------------------- lm-evaluation-harness

ITEMS = [{"question": "The capital of France is", "choices": ["Paris", "a list", "return"], "answer": 0},
         {"question": "def main():\n    return", "choices": [" None", " the", " Paris"], "answer": 0},
         {"question": "A list holds", "choices": ["items", "France", "keys"], "answer": 0},
         {"question": "Python is a", "choices": ["language", "fish", "capital"], "answer": 1}]


def write_task(folder):
    from edgekd.quality.harness import write_multiple_choice_task

    return write_multiple_choice_task(folder, "edgekd_tiny_mc", ITEMS)


def hand_accuracy(logits, tok):
    """Each choice scored as lm-eval pairs it (' ' + choice after the question), the argmax against the answer."""
    from edgekd.quality.harness import score

    right = 0
    for item in ITEMS:
        lls = []
        for choice in item["choices"]:
            ctx, whole = tok(item["question"], add_special_tokens=False)["input_ids"], tok(item["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            lls.append(score(logits, ctx, whole[len(ctx):], 256)[0])
        right += int(np.argmax(lls) == item["answer"])
    return right / len(ITEMS)


def test_lm_eval_through_a_runtime_matches_a_hand_computed_accuracy(tmp_path, tiny_gguf, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from edgekd.device import llamacpp
    from edgekd.quality.harness import run_tasks, runtime_lm

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fn = llamacpp.logits_fn(tiny_gguf, 256, 1)
    got = run_tasks(runtime_lm(fn, tok, 255), ["edgekd_tiny_mc"], include_path=write_task(tmp_path / "tasks"))
    assert got["edgekd_tiny_mc"]["acc"] == hand_accuracy(fn, tok)


def test_lm_eval_log_likelihoods_of_the_gguf_agree_with_lm_evals_hf_model(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("llama_cpp")
    import copy

    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekd.device import llamacpp
    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan
    from edgekd.methods.qat import convert
    from edgekd.quality.harness import hf_lm, runtime_lm

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    path = export_gguf(model, tok, tmp_path / "f16.gguf", FormatPlan.uniform("f16"), source_name="tiny")
    in_f16 = convert(copy.deepcopy(model), FormatPlan.uniform("f16"))  # the weights the file holds, in torch
    requests = [Instance("loglikelihood", {}, (i["question"], " " + c), n) for n, i in enumerate(ITEMS) for c in i["choices"]]
    by_llama = [ll for ll, _ in runtime_lm(llamacpp.logits_fn(path, 256, 1), tok, 255).loglikelihood(requests)]
    by_hf = [ll for ll, _ in hf_lm(in_f16, tok).loglikelihood(requests)]
    assert np.allclose(by_llama, by_hf, atol=2e-3, rtol=1e-4), (by_llama, by_hf)


def test_task_floors_gate_the_result():
    from edgekd.quality.tasks import task_checks

    results = {"arc_easy": {"model": 0.40, "teacher": 0.45}}
    checks = task_checks(results, {"arc_easy": 0.5, "piqa": 0.6}, 0.02)
    verdicts = {c.budget: c.passed for c in checks}
    assert verdicts == {"min_accuracy[arc_easy]": False, "min_accuracy[piqa]": False, "max_accuracy_drop[arc_easy]": False}
    assert all(c.passed for c in task_checks(results, {"arc_easy": 0.3}, 0.1))


def test_cli_runs_tasks_side_by_side_and_gates_them(tmp_path, tiny_gguf, tiny_model_dir, small_corpus_file, capsys):
    pytest.importorskip("lm_eval")
    tasks = write_task(tmp_path / "tasks")
    code = main(["eval", str(tiny_gguf), "--against", str(tiny_model_dir), "--data", str(small_corpus_file), "--blocks", "1",
                 "--tasks", "edgekd_tiny_mc", "--include-path", str(tasks), "--min-acc", "edgekd_tiny_mc=1.01", "--json"])
    data = json.loads(capsys.readouterr().out)
    row = data["tasks"]["edgekd_tiny_mc"]
    assert code == 1 and 0 <= row["model"] <= 1 and 0 <= row["teacher"] <= 1
    assert [b["budget"] for b in data["budgets"]] == ["min_accuracy[edgekd_tiny_mc]"] and not data["passed"]
    assert main(["eval", str(tiny_gguf), "--min-acc", "arc_easy"]) == 2
