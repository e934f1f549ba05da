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
    trained, ran = report.stage("distill").metrics, report.stage("distill").settings
    # the fitted steps, lowered mid-run where they ran slower than the probe (replans), or fewer
    # where the stage's deadline came first
    assert bool(ran["replans"]) == (ran["steps"] < distill["steps"])
    assert trained["steps"] == ran["steps"] or (trained["stopped_at_deadline"] and 1 <= trained["steps"] < ran["steps"])
    if ran["replans"]:
        assert any(n.startswith(f"distill: lowered from {distill['steps']} ") for n in report.notes)
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


def test_a_replan_keeps_the_schedule_continuous_and_ends_it_at_the_new_last_step():
    from edgekd.methods.distill import DistillConfig

    planned = DistillConfig(steps=100, learning_rate=1.0)
    cut = DistillConfig(steps=60, learning_rate=1.0, replans=[(40, 100)])
    floor = planned.min_lr_fraction
    assert cut.warm() == planned.warm() == 5  # the warm-up of the count planned first
    assert [cut.lr_at(s) for s in range(40)] == [planned.lr_at(s) for s in range(40)]  # the steps trained before
    assert abs(cut.lr_at(40) - planned.lr_at(40)) < 0.01  # no jump where it changed
    rates = [cut.lr_at(s) for s in range(5, 60)]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # decaying all the way
    assert cut.lr_at(59) < floor + 0.01 < planned.lr_at(59)  # at its floor by the new last step, not at 59 of 100
    twice = DistillConfig(steps=50, learning_rate=1.0, replans=[(40, 100), (45, 60)])
    assert [twice.lr_at(s) for s in range(45)] == [cut.lr_at(s) for s in range(45)]
    assert twice.lr_at(49) < floor + 0.03 < cut.lr_at(49)


def test_replanned_steps_lower_only_what_does_not_fit():
    from edgekd.methods.mixture import Mixture, OnPolicy
    from edgekd.methods.replan import replanned_steps

    assert replanned_steps(100, 10, 5, 1000.0, None) is None  # too few steps timed yet
    assert replanned_steps(100, 10, 5, 1000.0, 1.0) is None  # 90 steps left fit in 1000 s
    assert replanned_steps(100, 10, 5, 88.0, 1.0) is None  # short by 5 steps or fewer: the deadline's guard
    assert replanned_steps(100, 10, 5, 45.0, 1.0) == 10 + int(45 / 1.03)
    assert replanned_steps(100, 3, 5, 45.0, 1.0) is None  # still warming up
    assert replanned_steps(100, 10, 5, 0.0, 1.0) == 11  # never below the next step
    mixture = Mixture((16,), (0.5,), 0.5, OnPolicy(start=0.5))
    assert replanned_steps(100, 10, 5, 45.0, 1.0, mixture) == 53  # the join moves to 26, ahead of step 10
    assert replanned_steps(100, 30, 5, 10.0, 1.0, mixture) is None  # it would move behind the steps trained
    assert replanned_steps(100, 60, 5, 10.0, 1.0, mixture) is None  # the rows have joined: it stays where it was
    cold = Mixture((16,), (0.5,), 0.5, OnPolicy(start=0.0))
    assert replanned_steps(100, 60, 5, 10.0, 1.0, cold) == 69  # joined from the first step: nothing to move


def test_steps_slower_than_planned_are_lowered_mid_run_and_resume_keeps_the_new_count(tmp_path, monkeypatch):
    """A clock on which every step takes 1 s and a deadline 20 s away: 40 planned steps become
    the 19 that fit once 3 steps are timed, the stage finishes (not stopped) with its learning rate
    at the floor, and a resumed run reads the lowered count and its schedule from the checkpoint."""
    import numpy as np
    from conftest import make_tiny_llama

    from edgekd.methods import distill as loop
    from edgekd.methods.distill import DistillConfig, distill
    from edgekd.methods.prune import make_student

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    def one_second():
        Clock.now += 1.0

    monkeypatch.setattr(loop, "time", Clock)
    teacher = make_tiny_llama(200, layers=4, seed=1)
    student = make_student(teacher, [0, 3])
    train = np.random.default_rng(0).integers(0, 200, size=(16, 16)).astype(np.int32)
    cfg = DistillConfig(steps=40, batch_size=2, checkpoint_every=10)
    out = distill(student, teacher, train, cfg, [0, 3], run_dir=tmp_path, deadline=20.0, after_step=one_second)
    assert cfg.replans == [(4, 40)] and cfg.steps == 4 + int(16 / 1.03) == 19
    assert out.steps == 19 and not out.stopped_at_deadline and len(out.history) == 19
    assert out.history[-1]["lr"] == cfg.lr_at(18) < cfg.learning_rate * (cfg.min_lr_fraction + 0.01)
    again = DistillConfig(steps=40, batch_size=2, checkpoint_every=10)
    rest = distill(student, teacher, train, again, [0, 3], run_dir=tmp_path)
    assert (again.steps, again.replans, rest.steps, rest.resumed_from_step) == (19, [(4, 40)], 19, 19)


def test_the_report_says_where_steps_were_lowered():
    from edgekd.pipeline.timebudget import budget_notes
    from edgekd.report import StageRecord

    record = StageRecord("qat", settings={"steps": 50, "replans": [[40, 100], [45, 60]]}, metrics={"steps": 50})
    notes = budget_notes([record])
    assert "qat: lowered from 100 to 60 steps at step 40" in notes[0] and "lowered from 60 to 50 steps at step 45" in notes[1]
