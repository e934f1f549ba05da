import pytest

from edgekd import EdgekdError
from edgekd.fileio import atomic_path, atomic_write_text
from edgekd.pipeline.rundir import RunDir
from edgekd.report import StageRecord


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_directory_only_when_complete(tmp_path):
    target = tmp_path / "student"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (target / "old.txt").exists()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert (target / "new.txt").exists() and not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"


def test_foreign_directory_is_never_touched(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(EdgekdError, match="was not created by edgekd"):
            RunDir(tmp_path).open({"a": 1}, **flags)
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.open({"a": 1}) is False
    run.close()
    with pytest.raises(EdgekdError) as exc:
        RunDir(tmp_path / "run").open({"a": 1})
    assert "already holds an unfinished run" in str(exc.value) and "--resume" in str(exc.value)
    assert RunDir(tmp_path / "run").open({"a": 1}, resume=True) is True
    with pytest.raises(EdgekdError) as exc:
        RunDir(tmp_path / "run").open({"a": 2}, resume=True)
    assert "settings changed" in str(exc.value) and "a: was 1, now 2" in str(exc.value)
    assert RunDir(tmp_path / "run").open({"a": 2}, overwrite=True) is False


def test_resume_without_run(tmp_path):
    with pytest.raises(EdgekdError, match="nothing to resume"):
        RunDir(tmp_path / "nothing").open({}, resume=True)


def test_completed_stage_requires_its_artifacts(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({})
    (run.root / "x.npy").write_bytes(b"1")
    run.record(StageRecord("s", artifacts={"x": "x.npy"}))
    assert run.completed("s") is not None
    (run.root / "x.npy").unlink()
    assert run.completed("s") is None


def test_atomic_files_get_the_usual_mode(tmp_path):
    import os

    atomic_write_text(tmp_path / "r.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~mask
