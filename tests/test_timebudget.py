"""--time-budget: durations, fitting step counts, and a run whose training is fitted to a budget."""

import json

import pytest

from edgekd import EdgekdError
from edgekd.pipeline.timebudget import fit_steps, parse_duration


@pytest.mark.parametrize("text, seconds", [("45m", 2700), ("1h30m", 5400), ("90s", 90), ("2h", 7200), ("30", 1800), (1.5, 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "0m"])
def test_bad_durations_get_a_fix(text):
    with pytest.raises(EdgekdError) as exc:
        parse_duration(text)
    assert "fix:" in exc.value.render()


def test_steps_scale_together_never_up():
    assert fit_steps([(120, 4.5), (300, 5.0)], 10_000) == [120, 300]  # fits: unchanged
    distill, qat = fit_steps([(120, 10.0), (300, 10.0)], 2100)  # half the time needed
    assert (distill, qat) == (60, 150)
    assert fit_steps([(100, 1.0)], 0) == [1]  # never below one step


def test_profile_rejects_an_unreadable_budget():
    from edgekd import load_profile

    with pytest.raises(EdgekdError, match="compression.time_budget"):
        load_profile("raspberry-pi-5", ["compression.time_budget=soon"])


def test_a_tight_budget_fits_the_training_steps_and_resume_keeps_them(tmp_path, tiny_model_dir, small_corpus_file,
                                                                      tiny_profile_overrides, monkeypatch):
    import edgekd
    from edgekd.pipeline import timebudget

    monkeypatch.setattr(timebudget, "MIN_RESERVE_S", 0.0)
    overrides = [o for o in tiny_profile_overrides if "steps" not in o] + ["compression.distill.steps=40", "compression.qat.steps=40"]
    # a budget the tiny model's ~0.05 s steps cannot fill 80 times on top of loading and evaluation: measured, not assumed
    kw = dict(teacher=tiny_model_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path, run_name="tb",
              overrides=overrides, quiet=True)
    report = edgekd.compress(**kw, time_budget="1s")
    distill = report.stage("distill").settings["time_budget"]
    assert distill["planned_steps"] == 40 and 1 <= distill["steps"] < 40 and distill["seconds_per_step"] > 0
    trained = report.stage("distill").metrics
    # the fitted steps, or fewer where the stage's deadline came first (steps slower than the probe)
    assert trained["steps"] == distill["steps"] or (trained["stopped_at_deadline"] and 1 <= trained["steps"] < distill["steps"])
    if trained["stopped_at_deadline"]:
        assert any("stopped at the time budget's deadline" in n for n in report.notes)
    qat = report.stage("qat").settings["time_budget"]
    assert 1 <= qat["steps"] < 40 and any("fitted to the time budget" in n for n in report.notes)
    saved = json.loads((tmp_path / "tb" / "distill" / "fitted-steps.json").read_text())
    assert saved == distill


def test_a_deadline_stops_training_with_a_checkpoint_and_resume_finishes(tmp_path):
    """Steps slower than the probe said: the loop stops at the deadline, saves where it stopped,
    and a resumed run without one trains the remaining steps from there."""
    import time

    import numpy as np
    from conftest import make_tiny_llama

    from edgekd.methods.checkpoints import latest_checkpoint
    from edgekd.methods.distill import DistillConfig, distill
    from edgekd.methods.prune import make_student

    teacher = make_tiny_llama(200, layers=4, seed=1)
    student = make_student(teacher, [0, 3])
    train = np.random.default_rng(0).integers(0, 200, size=(16, 16)).astype(np.int32)
    cfg = DistillConfig(steps=30, batch_size=2, checkpoint_every=10)
    out = distill(student, teacher, train, cfg, [0, 3], run_dir=tmp_path, deadline=time.perf_counter())
    assert out.stopped_at_deadline and out.steps == 1 and len(out.history) == 1
    assert latest_checkpoint(tmp_path).name == "step-000001"
    rest = distill(student, teacher, train, cfg, [0, 3], run_dir=tmp_path)
    assert not rest.stopped_at_deadline and rest.resumed_from_step == 1 and rest.steps == 30 and len(rest.history) == 30


def test_the_step_probe_times_the_whole_step_and_changes_no_weight(monkeypatch):
    """A student copied from a frozen teacher inherits weights that need no gradient: the probe
    sets the flags as the loop does, so every weight gets its gradient, and times the optimizer's
    update too (at a learning rate of 0: nothing changes)."""
    import numpy as np
    import torch
    from conftest import make_tiny_llama

    from edgekd.methods import step_probe
    from edgekd.methods.distill import DistillConfig
    from edgekd.methods.prune import make_student

    teacher = make_tiny_llama(200, layers=4, seed=1).requires_grad_(False)
    student = make_student(teacher, [0, 3])
    assert not any(p.requires_grad for p in student.parameters())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with_grads, make = [], step_probe.make_optimizer

    def counted(*args, **kw):
        optimizer = make(*args, **kw)
        update = optimizer.step

        def step(*a, **k):
            with_grads.append(sum(p.grad is not None for p in student.parameters()))
            return update(*a, **k)
        optimizer.step = step
        return optimizer

    monkeypatch.setattr(step_probe, "make_optimizer", counted)
    train = np.random.default_rng(0).integers(0, 200, size=(16, 16)).astype(np.int32)
    cfg = DistillConfig(steps=10, batch_size=2, weight_decay=0.1)
    assert step_probe.probe_step_seconds(student, teacher, train, cfg, [0, 3]) > 0
    assert with_grads == [len(list(student.parameters()))] * 3  # each probed step: every weight's gradient, then the update
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_a_short_budget_measures_the_planners_knobs_on_fewer_blocks(tmp_path, tiny_model_dir, small_corpus_file,
                                                                    tiny_profile_overrides, monkeypatch):
    """Under a budget too short for them, the knob measurements use one batch of calibration blocks
    (of the 8 asked), the record says how many and the report says why."""
    import edgekd
    from edgekd.pipeline import timebudget

    monkeypatch.setattr(timebudget, "MIN_RESERVE_S", 0.0)
    overrides = [o for o in tiny_profile_overrides if "tensor_formats" not in o] + [
        "deployment.tensor_formats=auto", "compression.planner.sensitivity_blocks=8",
        "compression.planner.candidates=[q4_0, q8_0]", "compression.planner.embedding_candidates=[q8_0]"]
    report = edgekd.compress(teacher=tiny_model_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path,
                             run_name="short", overrides=overrides, quiet=True, time_budget="1s")
    sens = report.stage("sensitivity")
    assert sens.settings["blocks"] == 8 and sens.metrics["calibration_blocks"] == 4
    assert sens.metrics["tokens"] == 4 * 63 and sens.metrics["seconds_allowed"] == 0
    assert any(n.startswith("sensitivity: measured on 4 of 8 calibration blocks") for n in report.notes)
