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
from .checks import ParityResult, check_parity
from .onnx_genai import GENAI

GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 32, 16


@dataclass(frozen=True)
class PlannedExport:
    container: str  # "gguf" or "onnx"
    runtime: str
    file_format: str  # the weight format the file carries (its linear layers')
    file_name: str


def onnx_runtime_of(profile_runtime: str) -> str:
    """Which ONNX a profile gets: the plain file where its runtime is plain onnxruntime, else the
    onnxruntime-genai folder (fused attention, the int4 head; what phone apps load)."""
    return "onnxruntime" if profile_runtime == "onnxruntime" else GENAI


def planned_export(container: str, plan: FormatPlan, onnx_runtime: str = "onnxruntime") -> PlannedExport:
    if container == "gguf":
        return PlannedExport(container, "llama.cpp", plan.name, f"model-{plan.name}.gguf")
    if onnx_runtime == GENAI:
        from .onnx_genai import genai_file_format

        file_format = genai_file_format(plan)
        # a folder a phone app bundles whole: the decoder, genai_config.json, the tokenizer
        return PlannedExport(container, GENAI, file_format, f"model-{file_format}-genai/model-{file_format}.onnx")
    from .onnx import onnx_file_format

    file_format = onnx_file_format(plan)
    return PlannedExport(container, "onnxruntime", file_format, f"model-{file_format}.onnx")


def write_checked(export: PlannedExport, model: Any, tokenizer: Any, plan: FormatPlan, out_dir: Path, blocks: np.ndarray,
                  threads: int, source_gguf: Path | None = None, source_name: str = "",
                  metadata: dict[str, str] | None = None, context_length: int = 2048) -> tuple[Path, ParityResult]:
    """Write ``model`` as ``export`` under ``out_dir``, reload it in its runtime and compare it with
    the torch model on ``blocks`` (ONNX: also greedy KV-cache decoding). The caller decides what
    a failed check means (edgekd.exporters.checks.require).

    An onnxruntime-genai export of a model its builder cannot carry (or without onnxruntime-genai
    installed) is written as the plain ONNX decoder at the same path, checked in onnxruntime; the
    result's ``note`` says why."""
    from ..methods.evaluate import torch_logits_fn

    path = Path(out_dir) / export.file_name
    torch_fn = torch_logits_fn(model)
    if export.container == "gguf":
        from ..device import llamacpp
        from .gguf import export_gguf

        export_gguf(model, tokenizer, path, plan, source_gguf=source_gguf, source_name=source_name, extra_metadata=metadata)
        return path, check_parity(path, export.runtime, export.file_format, llamacpp.logits_fn(path, blocks.shape[1], threads),
                                  torch_fn, blocks)
    reason = None
    if export.runtime == GENAI:
        from .onnx_genai import BuilderFailed, unsupported_reason

        reason = unsupported_reason(model)
        if reason is None:
            try:
                return path, _write_checked_genai(export, model, tokenizer, plan, path, blocks, threads, context_length, metadata,
                                                  torch_fn)
            except BuilderFailed as exc:  # a model the builder should take but does not: the plain decoder ships
                reason = f"{exc.problem}: {(exc.details or [''])[-1][-200:]}"
    from ..device.onnxrt import Decoder
    from .onnx import export_onnx, onnx_file_format

    export_onnx(model, path, plan)
    dec = Decoder(path, threads)
    prompt = blocks[0, :GREEDY_PROMPT_TOKENS]
    reference = torch_greedy(model, tokenizer, prompt, GREEDY_NEW_TOKENS)
    result = check_parity(path, "onnxruntime", onnx_file_format(plan), dec.logits, torch_fn, blocks,
                          greedy_match=dec.greedy(prompt, GREEDY_NEW_TOKENS) == reference)
    if reason:
        result.note = f"plain onnxruntime decoder instead of onnxruntime-genai: {reason}"
    return path, result


# A greedy choice counts as decided where torch's top-1 logit leads the runner-up by more than
# this: int8 activations moved torch's top-1 margin by 0.08 (median), 0.40 (p99), 0.52 at most over
# 512 positions of the phone run's weights (benchmarks/phone_runtime.py), so a closer choice is a
# tie either way, and a greedy sequence may fork there without the file computing anything else.
DECISIVE_MARGIN = 1.0
GENAI_GREEDY_PROMPTS = 4


def _write_checked_genai(export: PlannedExport, model: Any, tokenizer: Any, plan: FormatPlan, path: Path, blocks: np.ndarray,
                         threads: int, context_length: int, metadata: dict[str, str] | None, torch_fn: Any) -> ParityResult:
    """The onnxruntime-genai folder against the torch model. Its products take int8 activations
    (llama.cpp's floor, not fp32's: edgekd.exporters.onnx_genai), so after the first rounding
    difference the two compute slightly different sequences of numbers: greedy decoding is
    checked at every decided choice along torch's own greedy continuation (teacher-forced
    through the runtime), over several prompts, and reported identical or not as it is."""
    from ..device.onnxgenai import GenaiModel
    from .onnx_genai import export_genai

    export_genai(model, tokenizer, path, plan, context_length, metadata=metadata)
    runtime = GenaiModel(path.parent, threads)
    prompts = [b[:GREEDY_PROMPT_TOKENS] for b in blocks[:GENAI_GREEDY_PROMPTS]]
    identical, decided, agreed = 0, 0, 0
    for prompt in prompts:
        reference = torch_greedy(model, tokenizer, prompt, GREEDY_NEW_TOKENS)
        identical += runtime.greedy(prompt, GREEDY_NEW_TOKENS) == reference
        seq = np.concatenate([prompt, reference[:-1]]).astype(np.int64)[None]
        picks = slice(len(prompt) - 1, seq.shape[1])
        top2 = np.sort(torch_fn(seq)[0, picks], axis=-1)[:, -2:]
        chosen = runtime.logits(seq)[0, picks].argmax(-1)
        decisive = top2[:, 1] - top2[:, 0] > DECISIVE_MARGIN
        decided += int(decisive.sum())
        agreed += int((chosen == np.array(reference))[decisive].sum())
    return check_parity(path, GENAI, export.file_format, runtime.logits, torch_fn, blocks, greedy_match=agreed == decided,
                        greedy_detail=f"greedy sequences identical for {identical} of {len(prompts)} prompts; "
                                      f"{agreed} of {decided} decided choices (torch margin > {DECISIVE_MARGIN}) the same")


def torch_greedy(model: Any, tokenizer: Any, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` by the torch model, as transformers' generate() decodes it."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt[None].astype("int64")), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()
