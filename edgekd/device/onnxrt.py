"""The one module that talks to onnxruntime: sessions, evaluation logits, KV-cache generation.

No torch here: this runs on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise EdgekdError("this needs onnxruntime", fix="pip install onnxruntime") from None
    return onnxruntime


def version() -> str:
    return _ort().__version__


def load(path: str | Path, threads: int) -> Any:
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EdgekdError(f"onnxruntime could not load {path} ({str(exc)[:300]})",
                          fix="check that the .onnx file (and its .data file beside it) is complete") from None


class Decoder:
    """A KV-cache decoder session exported by edgekd.exporters.onnx."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.session = load(path, threads)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not self.past_names or "input_ids" not in {i.name for i in self.session.get_inputs()}:
            raise EdgekdError(f"{path} is not a KV-cache decoder exported by edgekd (no past_key_values inputs)",
                              fix="export it with edgekd (formats: [onnx])")
        shape = next(i for i in self.session.get_inputs() if i.name == self.past_names[0]).shape
        self.kv_heads, self.head_dim = int(shape[1]), _head_dim(shape[3], Path(path))
        self.output_names = [o.name for o in self.session.get_outputs()]
        # an onnxruntime-genai decoder derives positions from the mask inside GroupQueryAttention
        self.input_names = {i.name for i in self.session.get_inputs()}

    def model_facts(self, file_bytes: float) -> dict[str, float] | None:
        """Parameter count and attention shape for the roofline, from the metadata edgekd writes on export."""
        meta = self.session.get_modelmeta().custom_metadata_map
        if "edgekd.params" not in meta:
            return None
        return {"tensor_bytes": file_bytes, "params": float(meta["edgekd.params"]), "layers": len(self.past_names) // 2,
                "heads": int(meta["edgekd.attention_heads"]), "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        batch, seq = ids.shape
        feeds = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": np.ones((batch, past_len + seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
            **past,
        }
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        outs = self.session.run(self.output_names, feeds)
        presents = {name.replace("present.", "past_key_values."): v for name, v in zip(self.output_names[1:], outs[1:])}
        return outs[0], presents

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out, _ = self.step(batch, self.empty_past(len(batch)), 0)
        return out

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> list[int]:
        """Greedy decoding with the KV cache: prefill the prompt, then one token at a time."""
        logits, past = self.step(prompt[None, :], self.empty_past(1), 0)
        out = []
        length = len(prompt)
        for _ in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits, past = self.step(np.array([[nxt]]), past, length)
            length += 1
        return out


def _head_dim(dim: Any, path: Path) -> int:
    """The KV cache's last axis: a number in edgekd's plain decoder; named in an onnxruntime-genai
    decoder, whose genai_config.json beside it gives the head size."""
    from .onnxgenai import folder_of, read_config

    if isinstance(dim, int):
        return dim
    folder = folder_of(path)
    if folder is None:
        raise EdgekdError(f"{path}: the KV cache's head size is not fixed in the graph", fix="export it with edgekd")
    return int(read_config(folder)["model"]["decoder"]["head_size"])


def logits_fn(path: str | Path, threads: int = 2):
    """A LogitsFn (see edgekd.methods.evaluate) backed by onnxruntime."""
    return Decoder(path, threads).logits
