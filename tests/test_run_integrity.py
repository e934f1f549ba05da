"""One writer per run directory, and what a resume reuses checked against its recorded size and checksum."""

import json
import os
import signal
import subprocess
import sys

import pytest

from edgekd.errors import EdgekdError
from edgekd.pipeline.rundir import STATE, RunDir
from edgekd.report import StageRecord

HOLD = """
import sys, time
from edgekd.pipeline.rundir import RunDir
run = RunDir(sys.argv[1])
run.open({{"a": 1}}, resume={resume})
print("locked", flush=True)
time.sleep(120)
"""


def _holder(root, resume=False):
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(resume=resume), str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid_and_the_lock_dies_with_it(tmp_path):
    root = tmp_path / "run"
    holder = _holder(root)
    try:
        for flags in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(EdgekdError) as exc:
                RunDir(root).open({"a": 1}, **flags)
            assert f"in use by another edgekd run (pid {holder.pid}, started 20" in str(exc.value)
        assert (root / ".edgekd-run").exists()  # the refused overwrite deleted nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL cannot release a lock politely: the kernel does, and the run resumes
    run = RunDir(root)
    assert run.open({"a": 1}, resume=True) is True
    run.close()


def test_one_process_holds_the_lock_until_it_closes(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({"a": 1})
    with pytest.raises(EdgekdError, match=f"pid {os.getpid()}"):
        RunDir(tmp_path / "run").open({"a": 1}, resume=True)
    run.close()
    again = RunDir(tmp_path / "run")
    assert again.open({"a": 1}, resume=True) is True
    again.close()


def test_a_corrupt_state_file_is_an_error_with_a_fix_not_a_silent_restart(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({"a": 1})
    (run.root / "x.npy").write_bytes(b"1")
    run.record(StageRecord("s", artifacts={"x": "x.npy"}))
    run.close()
    for garbage in ('{"stages": {"s": {"nam', "[]", '{"stages": {"s": {"bogus": 1}}}'):
        (run.root / STATE).write_text(garbage)
        with pytest.raises(EdgekdError) as exc:
            RunDir(run.root).open({"a": 1}, resume=True)
        assert "state.json is corrupt" in str(exc.value) and "--overwrite" in str(exc.value)
    assert (run.root / "x.npy").exists()  # nothing the run had was removed


def test_a_changed_artifact_is_named_and_its_stage_runs_again(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({})
    (run.root / "model.gguf").write_bytes(b"GGUF" + bytes(100))
    (run.root / "ckpt").mkdir()
    (run.root / "ckpt" / "weights.bin").write_bytes(bytes(64))
    run.record(StageRecord("export", artifacts={"file": "model.gguf"}))
    run.record(StageRecord("distill", artifacts={"student": "ckpt"}))
    recorded = json.loads((run.root / STATE).read_text())["fingerprints"]
    assert recorded["export"]["model.gguf"]["bytes"] == 104 and len(recorded["distill"]["ckpt"]["sha256"]) == 64
    assert run.completed("export") is not None and run.completed("distill") is not None
    with open(run.root / "model.gguf", "r+b") as f:  # cut short, as a half-copied file is
        f.truncate(50)
    (run.root / "ckpt" / "weights.bin").write_bytes(bytes(63) + b"\1")  # same size, one byte changed
    assert run.completed("export") is None and run.completed("distill") is None
    assert run.stale["export"] == "model.gguf changed since its stage finished (104 bytes then, 50 now)"
    assert "ckpt changed since its stage finished (same size, different SHA-256)" == run.stale["distill"]
    (run.root / "model.gguf").unlink()
    assert run.completed("export") is None and run.stale["export"] == "model.gguf is missing"


def test_a_record_without_fingerprints_is_checked_for_existence(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({})
    (run.root / "a.npy").write_bytes(b"1")
    state = {"stages": {"s": {"name": "s", "artifacts": {"a": "a.npy"}}}}  # as an edgekd before fingerprints wrote it
    (run.root / STATE).write_text(json.dumps(state))
    assert run.completed("s") is not None


def test_a_refused_new_run_leaves_no_folder_behind(tmp_path, tiny_model_dir):
    from edgekd.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "new" / "deeper"
    assert main(["compress", "--teacher", str(tiny_model_dir), "--data", str(empty), "--output", str(out), "--quiet"]) == 2
    assert not (tmp_path / "new").exists()


def test_a_resume_reruns_the_stage_whose_file_was_damaged(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides, capsys):
    import edgekd

    def run(**kw):
        return edgekd.compress(teacher=tiny_model_dir, data=small_corpus_file, output=tmp_path, run_name="r",
                               overrides=tiny_profile_overrides + ["compression.evaluation.chat_new_tokens=0"], **kw)

    first = run(quiet=True)
    gguf = tmp_path / "r" / "model-q4_0.gguf"
    good = gguf.read_bytes()
    with open(gguf, "r+b") as f:
        f.truncate(len(good) // 2)
    again = run(resume=True)
    err = capsys.readouterr().err + capsys.readouterr().out
    assert gguf.read_bytes() == good  # written again, the same bytes
    assert "export: finished earlier, but model-q4_0.gguf changed since its stage finished" in " ".join(err.split())
    assert again.stage("distill").wall_time_s == first.stage("distill").wall_time_s  # reused, checked by its checksum


def test_a_run_killed_before_its_marker_was_in_place_starts_again(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / ".edgekd-lock").write_text("{}")
    (root / ".tmp-.edgekd-run.abc").write_text("{")  # the marker's temporary file, never renamed
    run = RunDir(root)
    assert run.status() == "empty" and run.open({"a": 1}, resume=True) is False
    run.close()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ".tmp-notes").write_text("x")  # without edgekd's lock it is someone else's directory
    assert RunDir(tmp_path / "mine").status() == "foreign"
