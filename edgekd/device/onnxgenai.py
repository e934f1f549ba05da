"""The one module that talks to onnxruntime-genai: models, evaluation logits, generation.

An onnxruntime-genai model is a folder: the decoder ``.onnx`` (and its ``.data``),
``genai_config.json`` and the tokenizer files, as edgekd.exporters.onnx_genai writes it and a
phone app bundles it. No torch here: this runs on the device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError

CONFIG_FILE = "genai_config.json"
FACTS_FILE = "edgekd.json"  # written beside it by edgekd's exporter: parameters and weight format, for the projection


def _og():
    try:
        import onnxruntime_genai
    except ImportError:
        raise EdgekdError("this needs onnxruntime-genai", fix="pip install onnxruntime-genai") from None
    return onnxruntime_genai


def available() -> bool:
    """onnxruntime-genai (its runtime, and the model builder that ships with it) is installed."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("onnxruntime-genai")


def folder_of(path: str | Path) -> Path | None:
    """The onnxruntime-genai folder ``path`` (a folder or the .onnx inside it) belongs to, else None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / CONFIG_FILE).is_file() else None


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's genai_config.json."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text())


def decoder_file(folder: Path) -> Path:
    return folder / read_config(folder)["model"]["decoder"]["filename"]


class GenaiModel:
    """An onnxruntime-genai model on the CPU with ``threads`` intra-op threads."""

    def __init__(self, folder: str | Path, threads: int):
        og = _og()
        self.folder = Path(folder)
        self.meta = read_config(self.folder)
        try:
            config = og.Config(str(self.folder))
            config.clear_providers()  # the CPU
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
            self.model = og.Model(config)
        except Exception as exc:
            raise EdgekdError(f"onnxruntime-genai could not load {self.folder} ({str(exc)[:300]})",
                              fix="check that the folder is complete (genai_config.json, the .onnx and its .data file)") from None
        dec = self.meta["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        self.heads, self.vocab = dec["num_attention_heads"], self.meta["model"]["vocab_size"]
        self.max_length = int(self.meta["search"]["max_length"])
        self.context_length = int(self.meta["model"]["context_length"])

    def generator(self, max_length: int | None = None) -> Any:
        """A greedy generator whose KV buffer holds ``max_length`` tokens (default: the folder's)."""
        og = _og()
        length = int(max_length or self.max_length)
        if length > self.context_length:
            raise EdgekdError(f"{length} tokens do not fit this model's context of {self.context_length}",
                              fix="use a shorter prompt or context length (deployment.context_length)")
        try:
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=length, do_sample=False, batch_size=1)
            return og.Generator(self.model, params)
        except Exception as exc:
            raise EdgekdError(f"onnxruntime-genai could not start a generator on {self.folder} ({str(exc)[:300]})",
                              fix="re-export the folder with edgekd") from None

    def kv_cache_mb(self, n_ctx: int) -> float:
        """K and V of every block for ``n_ctx`` positions, fp32 (the buffer onnxruntime-genai allocates for max_length)."""
        return 2 * self.layers * n_ctx * self.kv_heads * self.head_dim * 4 / 1e6

    def model_facts(self, file_bytes: float) -> dict[str, float] | None:
        facts = self.folder / FACTS_FILE
        meta = json.loads(facts.read_text()) if facts.is_file() else {}
        if "params" not in meta:
            return None
        return {"tensor_bytes": file_bytes, "params": float(meta["params"]), "layers": self.layers,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] of every position, one token at a time through the KV cache
        (the exported graph computes the head for the last position only, as an app needs)."""
        out = []
        for row in np.asarray(batch):
            gen = self.generator(len(row) + 1)
            steps = []
            for tok in row.astype(np.int32):
                gen.append_tokens(tok[None])
                steps.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))
            out.append(np.stack(steps))
        return np.stack(out)

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> list[int]:
        """Greedy decoding with onnxruntime-genai's own search: prefill the prompt, then one token at a time."""
        gen = self.generator(len(prompt) + new_tokens)
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)[len(prompt):]]


def logits_fn(path: str | Path, threads: int = 2):
    """A LogitsFn (see edgekd.methods.evaluate) backed by onnxruntime-genai."""
    folder = folder_of(path)
    if folder is None:
        raise EdgekdError(f"{path} is not an onnxruntime-genai model folder (no {CONFIG_FILE})",
                          fix="export it with edgekd (deployment.runtime: onnxruntime-genai, as the phone profile has)")
    return GenaiModel(folder, threads).logits
