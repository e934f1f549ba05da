"""A model path turned into logits from the runtime that ships it: llama.cpp, onnxruntime(-genai) or torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgekdError
from ..methods.evaluate import LogitsFn

KINDS = ("gguf", "onnx", "onnx-genai", "hf")


@dataclass
class Scored:
    """A model as evaluation sees it: where it is, what runs it, and its logits."""

    path: Path
    kind: str  # one of KINDS
    runtime: str  # "llama.cpp", "onnxruntime", "onnxruntime-genai" or "torch"
    logits: LogitsFn
    vocab_size: int | None = None
    tokenizer: Any = None  # the torch kinds' tokenizer (a GGUF teacher's is read by transformers)
    model: Any = None  # the torch kinds' model


def kind_of(path: Path) -> str:
    """What ``path`` holds, or a clear error."""
    from ..device import onnxgenai

    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if onnxgenai.folder_of(path) is not None:
        return "onnx-genai"
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise EdgekdError(f"{path} is not a model edgekd can score",
                      fix="pass a .gguf file, an .onnx file or onnxruntime-genai folder, a Hugging Face directory, or an edgekd run directory")


def check_model(spec: Any) -> None:
    """Fail fast, before any reference is loaded: the path exists, is a kind edgekd scores, and a GGUF's header is sound."""
    if spec is None:
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise EdgekdError(f"model not found: {path}", fix="check the path")
    if kind_of(path) == "gguf":
        from ..device.gguf_check import check_gguf

        check_gguf(path)


def open_model(spec: Any, block_len: int, threads: int) -> Scored:
    """``spec`` (a path; None: the embedded default teacher) with its logits one block of ``block_len`` at a time."""
    if spec is None:
        return torch_reference(None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise EdgekdError(f"model not found: {path}", fix="check the path")
    kind = kind_of(path)
    if kind == "gguf":
        from ..device import llamacpp

        return Scored(path, kind, "llama.cpp", llamacpp.logits_fn(path, block_len, threads))
    if kind == "onnx-genai":
        from ..device import onnxgenai

        return Scored(path, kind, "onnxruntime-genai", onnxgenai.logits_fn(path, threads))
    if kind == "onnx":
        from ..device import onnxrt

        return Scored(path, kind, "onnxruntime", onnxrt.logits_fn(path, threads))
    return torch_reference(path)


def torch_reference(spec: Any) -> Scored:
    """A reference model in torch: a Hugging Face directory, a GGUF teacher (loaded dequantized, as
    edgekd's teacher is), or None for the embedded default."""
    from ..methods.models import load_causal_lm, resolve_model_source

    loaded = load_causal_lm(resolve_model_source(spec))
    return torch_model(loaded.source.path, loaded.model, loaded.tokenizer)


def torch_model(path: Path, model: Any, tokenizer: Any = None) -> Scored:
    from ..methods.evaluate import torch_logits_fn

    return Scored(Path(path), "hf", "torch", torch_logits_fn(model.eval()), int(model.config.vocab_size), tokenizer, model)
