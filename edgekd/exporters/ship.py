"""Write one planned file and prove it in its runtime: the export recipe of the pipeline and the benchmarks.

A :class:`PlannedExport` says what a file will be (container, runtime, the weight format it
carries, its name) before it exists, so the export and bench stages, the report and the
benchmarks all name files the same way and never parse a format back out of a file name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import FormatPlan
from ..profiles import RUNTIME_FORMAT
from .checks import ParityResult, check_parity

RUNTIME_OF = {container: runtime for runtime, container in RUNTIME_FORMAT.items()}
GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 32, 16


@dataclass(frozen=True)
class PlannedExport:
    container: str  # "gguf" or "onnx"
    runtime: str
    file_format: str  # the weight format the file carries (its linear layers')
    file_name: str


def planned_export(container: str, plan: FormatPlan) -> PlannedExport:
    if container == "gguf":
        file_format = plan.name
    else:
        from .onnx import onnx_file_format

        file_format = onnx_file_format(plan)
    return PlannedExport(container, RUNTIME_OF[container], file_format, f"model-{file_format}.{container}")


def write_checked(export: PlannedExport, model: Any, tokenizer: Any, plan: FormatPlan, out_dir: Path, blocks: np.ndarray,
                  threads: int, source_gguf: Path | None = None, source_name: str = "",
                  metadata: dict[str, str] | None = None) -> tuple[Path, ParityResult]:
    """Write ``model`` as ``export`` under ``out_dir``, reload it in its runtime and compare it with
    the torch model on ``blocks`` (ONNX: also greedy KV-cache decoding). The caller decides what
    a failed check means (edgekd.exporters.checks.require)."""
    from ..methods.evaluate import torch_logits_fn

    path = Path(out_dir) / export.file_name
    torch_fn = torch_logits_fn(model)
    if export.container == "gguf":
        from ..device import llamacpp
        from .gguf import export_gguf

        export_gguf(model, tokenizer, path, plan, source_gguf=source_gguf, source_name=source_name, extra_metadata=metadata)
        return path, check_parity(path, export.runtime, export.file_format, llamacpp.logits_fn(path, blocks.shape[1], threads),
                                  torch_fn, blocks)
    import torch

    from ..device.onnxrt import Decoder
    from .onnx import export_onnx

    export_onnx(model, path, plan)
    dec = Decoder(path, threads)
    prompt = blocks[0, :GREEDY_PROMPT_TOKENS]
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt[None].astype("int64")), max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    return path, check_parity(path, export.runtime, export.file_format, dec.logits, torch_fn, blocks,
                              greedy=(dec.greedy(prompt, GREEDY_NEW_TOKENS), ref))
