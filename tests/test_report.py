import json

import pytest

from edgekd import EdgekdError, load_profile
from edgekd.device.budgets import check_budgets
from edgekd.report import SCHEMA, Report, StageRecord


def make_report(tmp_path, budgets=None) -> Report:
    prof = load_profile("raspberry-pi-5")
    r = Report(run_name="r", run_dir=str(tmp_path), profile=prof.model_dump(mode="json"), status="complete")
    r.stages.append(StageRecord("evaluate_teacher", settings={"heldout_blocks": 4}, metrics={"perplexity": 12.5}, wall_time_s=3.0))
    r.evaluation["teacher (fp32)"] = {"params": 1000, "perplexity": 12.5, "kl_to_teacher": None, "top1_agreement": None}
    r.budgets = budgets or []
    return r


def test_budget_checks_directions_and_unmeasured():
    prof = load_profile("raspberry-pi-5", ["budgets.max_model_mb=100", "budgets.min_decode_tokens_per_s=30"])
    checks = {c.budget: c for c in check_budgets(prof.budgets, {"model_mb": 92.0, "decode_tokens_per_s": 25.0})}
    assert checks["max_model_mb"].passed is True
    assert checks["min_decode_tokens_per_s"].passed is False
    assert checks["max_ttft_ms"].passed is None and checks["max_ttft_ms"].measured is None
    assert "not measured" in checks["max_ttft_ms"].describe()


def test_null_budget_is_not_checked():
    prof = load_profile("raspberry-pi-5", ["budgets.max_ttft_ms=null"])
    assert "max_ttft_ms" not in {c.budget for c in check_budgets(prof.budgets, {})}


def test_report_passed_and_failures(tmp_path):
    prof = load_profile("raspberry-pi-5")
    checks = check_budgets(prof.budgets, {"model_mb": 500.0})
    r = make_report(tmp_path, checks)
    assert not r.passed
    assert len(r.failures()) == 1 and "max_model_mb" in r.failures()[0] and "FAILED" in r.failures()[0]
    assert len(r.unchecked()) == 4
    ok = make_report(tmp_path, check_budgets(prof.budgets, {"model_mb": 50.0}))
    assert ok.passed


def test_json_round_trip_and_markdown(tmp_path):
    r = make_report(tmp_path, check_budgets(load_profile("phone").budgets, {"model_mb": 50.0}))
    r.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == SCHEMA and data["passed"] is True
    again = Report.load(tmp_path)
    assert again.evaluation == r.evaluation and again.budgets == r.budgets and again.stages == r.stages
    md = (tmp_path / "report.md").read_text()
    assert "12.5" in md and "max_model_mb" in md and "evaluate_teacher" in md


def test_schema_1_reports_still_render(tmp_path):
    """A run written before schema 2 (whose profile used the old key names) is still readable."""
    r = make_report(tmp_path, check_budgets(load_profile("phone").budgets, {"model_mb": 50.0}))
    data = r.to_dict()
    data["schema"] = "edgekd.report/1"
    (tmp_path / "report.json").write_text(json.dumps(data))
    old = Report.load(tmp_path)
    assert old.schema == "edgekd.report/1" and old.evaluation == r.evaluation and old.passed


def test_unknown_schema_is_refused(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"schema": "edgekd.report/99"}))
    with pytest.raises(EdgekdError, match="not supported"):
        Report.load(tmp_path)


def test_missing_report(tmp_path):
    with pytest.raises(EdgekdError, match="no report.json"):
        Report.load(tmp_path)


def test_report_diff_ignores_timings_and_finds_real_differences(tmp_path):
    """tools/report_diff.py: what shows a restructuring left a run's results unchanged."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "report_diff.py"
    base = {"schema": "edgekd.report/2", "created_at": "t0", "profile": {"compression": {"distill": {"seq_len": 64}}},
            "stages": [{"name": "distill", "wall_time_s": 1.0, "metrics": {"final_kd": 0.5, "tokens_per_s": 10.0}}],
            "budgets": [{"budget": "max_ttft_ms", "measured": 3.0, "passed": True, "limit": 9.0}]}
    other = json.loads(json.dumps(base))
    other.update(created_at="t1", profile={"compression": {"data": {"block_len": 64}}})
    other["stages"][0].update(wall_time_s=2.0, metrics={"final_kd": 0.5, "tokens_per_s": 20.0})
    other["budgets"][0]["measured"] = 4.0
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(other))
    same = subprocess.run([sys.executable, str(tool), str(a), str(b), "--rename",
                           "profile.compression.distill.seq_len=profile.compression.data.block_len"], capture_output=True, text=True)
    assert same.returncode == 0 and "identical, timings aside" in same.stdout
    other["stages"][0]["metrics"]["final_kd"] = 0.6
    b.write_text(json.dumps(other))
    changed = subprocess.run([sys.executable, str(tool), str(a), str(b)], capture_output=True, text=True)
    assert changed.returncode == 1 and "stages[0].metrics.final_kd: 0.5 -> 0.6" in changed.stdout
    assert "profile.compression" in changed.stdout  # without --rename the renamed key is a difference
