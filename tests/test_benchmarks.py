"""The benchmark scripts still start and parse their arguments (they run for hours, so they are
not run here; this catches a script broken by a change to the methods it calls)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in ("common.py", "phases.py"))  # their shared modules


@pytest.mark.parametrize("args", [[s, "--help"] for s in SCRIPTS] +
                         [["speed_table.py", sub, "--help"] for sub in ("loop", "cache", "bf16", "sampling", "decode", "builds", "files", "profile", "round-trips")])
def test_benchmark_script_starts(args):
    out = subprocess.run([sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_every_benchmark_module_compiles():
    import py_compile

    for path in BENCHMARKS.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)


def test_qat_recipe_runs_the_pipelines_recipe_on_a_tiny_teacher(tiny_model_dir, tmp_path):
    """One short variant end to end on a tiny random teacher: the sweep calls edgekd's QAT-KD recipe."""
    import json

    out = tmp_path / "recipe.json"
    run = subprocess.run([sys.executable, "qat_recipe.py", "--teacher", str(tiny_model_dir), "--variant", "tiny:steps=2,batch_size=2",
                          "--out", str(out)], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["variant"] == "tiny" and row["kl_to_teacher"] > 0 and 0.6 <= row["mean_clip"] <= 1.0
