"""Parity checks: an export counts only once its runtime reproduces the torch model.

Each exported file is reloaded in its runtime and compared with the torch model it was written
from, on held-out blocks: KL(torch || runtime) per token and top-1 agreement. The limits are
the runtimes' numerical floors, not tolerances for exporter bugs:

- llama.cpp quantizes activations to 8 bits inside its Q4/Q8 matrix products; the teacher's own
  Q4_1 file, whose weights equal the fp32 teacher's, sits at KL ~0.003-0.004 and ~96-97% top-1
  on held-out prose. A Q4_0/Q8_0 export must stay within KL 0.01 and 94% top-1.
- F16 GGUF and onnxruntime (fp32 activations, exact weights) must be near-identical.

Each format's limits per runtime live with the format (``WeightFormat.parity``, edgekd.formats).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError
from ..formats import get
from ..methods.evaluate import evaluate


@dataclass
class ParityResult:
    file: str
    runtime: str
    weight_format: str
    kl: float
    top1_agreement: float
    max_kl: float
    min_top1: float
    tokens: int
    passed: bool
    greedy_match: bool | None = None
    note: str = ""  # e.g. why a planned onnxruntime-genai export is a plain onnxruntime one
    greedy_detail: str = ""  # how greedy_match was decided, where not by identical sequences

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PARITY_BATCH = 1  # blocks whose logits both sides hold at once: a runtime computes one block at a time anyway


def check_parity(path: Path, runtime: str, weight_format: str, runtime_fn: Any, torch_fn: Any, blocks: np.ndarray,
                 greedy_match: bool | None = None, limits: tuple[float, float] | None = None,
                 greedy_detail: str = "") -> ParityResult:
    """``greedy_match``: the caller's greedy-decoding verdict (None: not checked); False fails the file."""
    max_kl, min_top1 = limits or parity_limits(weight_format, runtime)
    m = evaluate(runtime_fn, blocks, teacher_fn=torch_fn, batch_size=PARITY_BATCH)
    ok = m.kl_to_teacher <= max_kl and m.top1_agreement >= min_top1 and greedy_match is not False
    return ParityResult(str(path), runtime, weight_format, m.kl_to_teacher, m.top1_agreement, max_kl, min_top1,
                        m.tokens, bool(ok), greedy_match, greedy_detail=greedy_detail)


def parity_limits(weight_format: str, runtime: str) -> tuple[float, float]:
    """(max KL, min top-1) for a file in ``weight_format`` checked in ``runtime``. onnxruntime-genai
    files take llama.cpp's: their int4/int8 products quantize activations to int8 per block of 32
    as llama.cpp's do (accuracy_level 4, edgekd.exporters.onnx_genai)."""
    parity = get(weight_format).parity
    if runtime == "onnxruntime-genai" and runtime not in parity:
        return parity.get("llama.cpp") or parity["onnxruntime"]
    return parity[runtime]


def require(result: ParityResult) -> None:
    """A failed parity check stops the run: the file does not compute what was trained."""
    if result.passed:
        return
    details = [f"KL(torch || {result.runtime}) = {result.kl:.5f} per token (limit {result.max_kl})",
               f"top-1 agreement = {result.top1_agreement:.4f} (limit {result.min_top1})"]
    if result.greedy_match is False:
        details.append("greedy decoding with the KV cache diverged from torch")
    raise EdgekdError(
        f"parity check failed for {Path(result.file).name}: {result.runtime} does not reproduce the torch model",
        details=details,
        fix="the file was kept for inspection but is not a valid export; check the runtime version "
        "(llama-cpp-python, onnxruntime) against the README, then re-run with --resume",
    )
