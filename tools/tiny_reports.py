"""Run three tiny end-to-end compressions and keep their report.json and exported files.

    .venv/bin/python tools/tiny_reports.py OUT_DIR [--work DIR] [--old-profile-keys]

A random 4-layer Llama with a small BPE tokenizer (tests/helpers/tiny_models.py) is compressed
three ways: ``pi5`` (raspberry-pi-5: prune to 3 layers, distill, QAT, Q4_0 GGUF), ``pi5-cache-width``
(the same with MLP width pruning and a sampled teacher-logit cache) and ``phone`` (full depth,
int4 ONNX and GGUF). Run it before and after a change to the code's shape, each time from its own
snapshot of the tree, and compare with tools/report_diff.py: same settings, same numbers and the
same exported bytes mean the change left behaviour alone. The runs use a fixed ``--work``
directory so paths recorded in the reports match. ``--old-profile-keys`` spells the profile keys
as edgekd did before report schema 2 (for a tree from before it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ["compression.evaluation.max_heldout_blocks=4", "compression.prune.calibration_blocks=4",
        "compression.distill.batch_size=2", "compression.distill.checkpoint_every=2", "compression.qat.steps=2"]
RUNS = {
    "pi5": ("raspberry-pi-5", ["compression.prune.keep_layers=3", "compression.distill.steps=4"]),
    "pi5-cache-width": ("raspberry-pi-5", ["compression.prune.keep_layers=3", "compression.distill.steps=4",
                                           "compression.prune.mlp_keep_fraction=0.5", "{cache}"]),
    "phone": ("phone", ["deployment.formats=[onnx, gguf]"]),
}
KEYS = {"new": {"block": "compression.data.block_len=64", "cache": "compression.distill.logit_cache.k=8"},
        "old": {"block": "compression.distill.seq_len=64", "cache": "compression.distill.logit_cache_top_k=8"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--work", default="/tmp/edgekd-tiny-reports", help="fixed work directory (paths in the reports)")
    ap.add_argument("--old-profile-keys", action="store_true")
    args = ap.parse_args()

    from tiny_models import corpus_text, make_tiny_llama, train_tiny_tokenizer

    import edgekd

    keys = KEYS["old" if args.old_profile_keys else "new"]
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = train_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    (work / "docs.txt").write_text(corpus_text(30))
    for name, (profile, extra) in RUNS.items():
        sets = [keys["block"], *TINY, *(keys["cache"] if e == "{cache}" else e for e in extra)]
        report = edgekd.compress(teacher=work / "teacher", profile=profile, data=work / "docs.txt", output=work / "runs",
                                 run_name=name, overrides=sets, quiet=True)
        run = work / "runs" / name
        shutil.copy(run / "report.json", out / f"{name}.report.json")
        for f in run.glob("model-*"):
            shutil.copy(f, out / f"{name}.{f.name}")
        print(name, report.status, "passed" if report.passed else "budget failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
