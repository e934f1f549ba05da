import subprocess
import sys

HEAVY = ["torch", "transformers", "onnx", "onnxruntime", "accelerate", "gguf", "llama_cpp", "datasets"]


def test_import_edgekd_stays_light():
    code = (
        "import sys, edgekd\n"
        "from edgekd import compress, bench, load_profile, Report, EdgekdError\n"
        "load_profile('raspberry-pi-5')\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import edgekd pulled in heavy modules: {out}"


def test_cli_help_is_light_and_has_examples():
    code = "import sys; from edgekd.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    helptext = subprocess.run([sys.executable, "-m", "edgekd.cli", "--help"], capture_output=True, text=True).stdout
    assert "examples:" in helptext and "edgekd compress --profile raspberry-pi-5" in helptext
    assert "exit codes: 0 ok, 1 a budget failed, 2 bad input" in helptext
