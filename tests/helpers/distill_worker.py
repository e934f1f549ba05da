"""Run a tiny distillation; used by tests under `accelerate launch` and for kill/resume.

usage: distill_worker.py OUT_DIR STEPS [KILL_AT_STEP]
With DISTILL_DEADLINE_S set, training gets a deadline that many seconds away (each step's stop
decision is then broadcast from the main process).
Writes OUT_DIR/rank-<r>.json with the block indices this rank saw and a hash of its final weights.
"""

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_llama  # noqa: E402

from edgekd.methods.distill import DistillConfig, distill  # noqa: E402
from edgekd.methods.prune import make_student  # noqa: E402


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out_dir = Path(sys.argv[1])
    steps = int(sys.argv[2])
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    teacher = make_tiny_llama(300, layers=4)
    student = make_student(teacher, [0, 2, 3])
    blocks = np.random.default_rng(0).integers(0, 300, size=(40, 32)).astype(np.int32)
    cfg = DistillConfig(steps=steps, batch_size=2, w_hidden=1.0, w_attention=1.0, checkpoint_every=2, learning_rate=1e-3)

    def on_step(done: int) -> None:
        if kill_at is not None and done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no final save

    deadline = os.environ.get("DISTILL_DEADLINE_S")
    out = distill(student, teacher, blocks, cfg, [0, 2, 3], run_dir=out_dir, on_step=on_step,
                  deadline=time.perf_counter() + float(deadline) if deadline else None)
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"rank-{rank}.json").write_text(json.dumps({
        "seen": out.seen_blocks, "digest": weights_digest(student), "resumed_from": out.resumed_from_step,
        "world": int(os.environ.get("WORLD_SIZE", "1")),
    }))


if __name__ == "__main__":
    main()
