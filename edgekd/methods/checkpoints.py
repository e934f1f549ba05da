"""Training checkpoints: student weights, optimizer state, step and loss history, written atomically.

``<run_dir>/checkpoints/step-NNNNNN/`` holds one checkpoint; ``latest.json`` points at the newest
complete one, so a kill during a write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_path, atomic_write_json

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
KEEP_CHECKPOINTS = 2


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = run_dir / CHECKPOINTS / json.loads(pointer.read_text())["dir"]
    return path if (path / "trainer.json").exists() else None


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, step: int, tokens: int, history: list, cfg: Any,
                    extra: dict[str, Any] | None = None) -> None:
    """``extra``: JSON-able state of the loop's own (the on-policy rows of the current generation)."""
    from safetensors.torch import save_model

    name = f"step-{step:06d}"
    root = run_dir / CHECKPOINTS
    with atomic_path(root / name) as tmp:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "student.safetensors"))  # handles tied embeddings
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "tokens": tokens, "history": history, "config": asdict(cfg),
                                                    "extra": extra or {}}))
    atomic_write_json(root / LATEST, {"dir": name, "step": step})
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> tuple[int, int, list, dict[str, Any]]:
    """(step, tokens, history, extra) of the checkpoint at ``path``, its weights and optimizer state loaded."""
    from safetensors.torch import load_model

    load_model(model, str(path / "student.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "trainer.json").read_text())
    return int(state["step"]), int(state["tokens"]), list(state["history"]), dict(state.get("extra") or {})
