"""The fault-injection suite (`pytest -m faults`): SIGKILL at points swept through every stage, then
`--resume`, must end with the files an uninterrupted run writes (the same GGUF and ONNX bytes, the
same student weights); a full disk during a checkpoint, the logit cache and an export is one clear
error, leaves what was written intact, and the run resumes to the same files once space is back.

Kill points are edgekd.faults' (around every atomic write, every stage start, every training step),
chosen per stage from a traced uninterrupted run with a fixed seed; the closing count is printed and
written to $EDGEKD_FAULT_SUMMARY when set.
"""

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "fault_run.py"
KILLS_PER_STAGE = 3
SEED = 20261202


def settings(tiny_profile_overrides):
    """Every stage a run can have: teacher samples in the mixture, the logit cache, GGUF and ONNX."""
    return list(tiny_profile_overrides) + [
        "compression.time_budget=null", "compression.evaluation.chat_new_tokens=4", "deployment.formats=[gguf, onnx]",
        "compression.data.generation.tokens=600", "compression.data.generation.new_tokens=40",
        "compression.data.generation.batch_size=4", "compression.data.mixture.teacher_samples=0.5"]  # the profile's hidden-state cache


def compress(args, out, name, env=None, resume=False):
    cmd = [sys.executable, str(HELPER), *args, "--output", str(out), "--run-name", name, "--quiet"] + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}  # the edgekd of this tree, whatever is installed
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def outputs(run: Path) -> dict[str, str]:
    """What must come out the same: the shipped files' bytes and the student's weights."""
    from safetensors.numpy import load_file

    got = {}
    for f in sorted([*run.glob("model-*.gguf"), *run.glob("model-*.onnx*"), *run.glob("model-*-genai/*.onnx*")]):
        got[str(f.relative_to(run))] = hashlib.sha256(f.read_bytes()).hexdigest()
    for f in sorted((run / "student-qat").glob("*.safetensors")):
        tensors = load_file(str(f))
        got[f"student-qat/{f.name}"] = hashlib.sha256(b"".join(np.ascontiguousarray(tensors[k]).tobytes() for k in sorted(tensors))).hexdigest()
    return got


@pytest.fixture(scope="module")
def reference(tiny_model_dir, small_corpus_file, tmp_path_factory):
    from conftest import TINY_OVERRIDES

    args = ["--teacher", str(tiny_model_dir), "--data", str(small_corpus_file)]
    for o in settings(TINY_OVERRIDES):
        args += ["--set", o]
    out = tmp_path_factory.mktemp("faults")
    trace = out / "trace.txt"
    done = compress(args, out, "reference", env={"EDGEKD_FAULT_TRACE": str(trace)})
    assert done.returncode == 0, done.stderr[-3000:]
    points = [line.split(" ", 2) for line in trace.read_text().splitlines()]
    again = compress(args, out, "again")  # an uninterrupted run is deterministic, or nothing below means anything
    assert again.returncode == 0 and outputs(out / "again") == outputs(out / "reference")
    return args, out, outputs(out / "reference"), [(int(n), stage, where) for n, stage, where in points]


def test_kills_in_every_stage_resume_to_the_same_files(reference):
    args, out, expected, points = reference
    by_stage = defaultdict(list)
    for n, stage, where in points:
        by_stage[stage].append((n, where))
    rng = np.random.default_rng(SEED)
    summary = {}
    for stage, pts in by_stage.items():
        picks = {pts[0], pts[-1]} | {pts[int(i)] for i in rng.choice(len(pts), size=min(KILLS_PER_STAGE - 2, len(pts)), replace=False)}
        row = {"points": len(pts), "kills": 0, "identical": 0, "different": [], "not_reached": []}
        for n, where in sorted(picks):
            name = f"kill-{n}"
            killed = compress(args, out, name, env={"EDGEKD_KILL_AT": str(n)})
            if killed.returncode != -9:
                row["not_reached"].append(f"{n} ({where}): exit {killed.returncode}")
                continue
            row["kills"] += 1
            resumed = compress(args, out, name, resume=True)
            if resumed.returncode == 0 and outputs(out / name) == expected:
                row["identical"] += 1
            else:
                row["different"].append(f"{n} ({where}): exit {resumed.returncode} {resumed.stderr.strip()[-300:]}")
        summary[stage] = row
    total = {k: sum(r[k] for r in summary.values()) for k in ("kills", "identical")}
    lines = [f"{'stage':18} {'points':>6} {'kills':>5} {'identical':>9}  lost or different"]
    lines += [f"{s:18} {r['points']:>6} {r['kills']:>5} {r['identical']:>9}  {len(r['different']) + len(r['not_reached'])}" for s, r in summary.items()]
    lines.append(f"{'total':18} {len(points):>6} {total['kills']:>5} {total['identical']:>9}  {total['kills'] - total['identical']}")
    print("\n" + "\n".join(lines))
    if os.environ.get("EDGEKD_FAULT_SUMMARY"):
        Path(os.environ["EDGEKD_FAULT_SUMMARY"]).write_text(json.dumps({"kills": summary, "total": total}, indent=2) + "\n")
    problems = [p for r in summary.values() for p in r["different"] + r["not_reached"]]
    assert not problems, problems
    assert total["kills"] >= 2 * len(summary)


def _full_disk_then_resume(args, out, name, expected, env):
    full = compress(args, out, name, env=env)
    err = " ".join(full.stderr.split())
    assert full.returncode == 2 and "no room to write" in err and "needs" in err and "--resume" in err, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    state = json.loads((out / name / "state.json").read_text())  # what was recorded before the disk filled is intact
    for stage, prints in state.get("fingerprints", {}).items():
        from edgekd.pipeline.integrity import artifact_problem

        assert not [rel for rel, fp in prints.items() if artifact_problem(out / name, rel, fp)], stage
    resumed = compress(args, out, name, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert outputs(out / name) == expected
    return err[err.index("no room"):][:240], sorted(state["stages"])


@pytest.mark.parametrize("target", ["distill/checkpoints", "teacher-logits", "model-q4_0.gguf"])
def test_a_full_disk_at_a_checkpoint_the_logit_cache_and_an_export(reference, target):
    """ENOSPC at the first write of the target: one clear error, what was recorded intact, a resume to the same files."""
    args, out, expected, _ = reference
    name = f"full-{len(target)}"  # a run name the target does not appear in
    message, done = _full_disk_then_resume(args, out, name, expected, {"EDGEKD_DISK_FULL_AT": target})
    assert target.split("/")[-1] in message
    print(f"\nfull disk at {target}: {message} (stages done before: {', '.join(done)})")


def test_a_real_small_filesystem_fills_up(reference, tmp_path):
    """A 2 MB tmpfs as the output root: the run stops at the write that does not fit, and resumes elsewhere-freed."""
    args, out, expected, _ = reference
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not let the test mount a small filesystem")
    try:
        full = compress(args, mnt, "r")
        err = " ".join(full.stderr.split())
        assert full.returncode == 2 and "no room to write" in err and ("No space left" in err or "short write" in err), full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        print(f"\nreal full disk (2 MB tmpfs): {err[err.index('no room'):][:240]}")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)  # space freed
        resumed = compress(args, mnt, "r", resume=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert outputs(mnt / "r") == expected
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


LOAD_EACH = """
import sys, llama_cpp
from edgekd.errors import EdgekdError
from edgekd.device import llamacpp
for path in sys.argv[1:]:
    print("try", path, flush=True)
    try:
        llm = llamacpp.load(path, n_ctx=32, threads=1)
        llm.eval([1, 2, 3])
        llm.close()
        print("loaded", path, flush=True)
    except EdgekdError:
        print("refused", path, flush=True)
"""


def test_fuzzed_ggufs_never_crash_llama_cpp(tiny_gguf_of, tmp_path):
    """The header fuzz of the default tier, then every mutated file through edgekd's llama.cpp loader
    (the reader's check first): each one loads or is refused with a message; none aborts the process."""
    from test_hostile_input import FUZZ_FILES, _layout, mutate

    src = tiny_gguf_of("q8_0")
    good, head = src.read_bytes(), _layout(src)["infos_end"]
    rng = np.random.default_rng(SEED)
    paths = []
    for i in range(FUZZ_FILES):
        p = tmp_path / f"m{i}.gguf"
        p.write_bytes(mutate(good, head, i, rng))
        paths.append(str(p))
    outcome, crashed, todo = defaultdict(int), [], paths
    while todo:
        proc = subprocess.run([sys.executable, "-c", LOAD_EACH, *todo], capture_output=True, text=True, cwd=ROOT, timeout=1800,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = proc.stdout.split("\n")
        for line in lines:
            word, _, path = line.partition(" ")
            if word in ("loaded", "refused"):
                outcome[word] += 1
        tried = [line.split(" ", 1)[1] for line in lines if line.startswith("try ")]
        if proc.returncode == 0:
            break
        crashed.append(f"{tried[-1]} (exit {proc.returncode})")
        todo = todo[todo.index(tried[-1]) + 1:]
    print(f"\nfuzzed GGUFs through llama.cpp: {FUZZ_FILES} files, {outcome['refused']} refused with a message, "
          f"{outcome['loaded']} loaded, {len(crashed)} crashed")
    assert not crashed, crashed
