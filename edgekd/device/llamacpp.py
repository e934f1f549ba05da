"""The one module that talks to llama.cpp (through llama-cpp-python).

Loading a GGUF, logits for held-out evaluation, and the raw calls the benchmark times.
No torch here: this runs on the device.
"""

from __future__ import annotations

import atexit
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EdgekdError(
            "this needs llama-cpp-python",
            fix="run `make install` (it compiles llama-cpp-python for this CPU; see the README's install notes)",
        ) from None
    return llama_cpp


def version() -> str:
    return _llama_cpp().__version__


# the instruction sets that decide which ggml kernels run (x86 and ARM names in llama.cpp's system info)
_KERNEL_ISA = ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8", "NEON", "DOTPROD", "MATMUL_INT8", "SVE", "SME")


def isa_from_system_info(info: str) -> str:
    """The kernel-relevant instruction sets switched on in llama.cpp's system-info line."""
    on = {k.split(":")[-1].strip() for k, _, v in (part.partition("=") for part in info.split("|")) if v.strip() == "1"}
    return " ".join(f for f in _KERNEL_ISA if f in on) or "generic"


def build_isa() -> str:
    """The instruction sets this llama.cpp build was compiled with, e.g. "AVX2 AVX512 AVX512_VNNI":
    decode speed depends on them (benchmarks/RESULTS.md, "llama.cpp builds")."""
    return isa_from_system_info(_llama_cpp().llama_print_system_info().decode())


_OPEN: weakref.WeakSet = weakref.WeakSet()  # closed at exit; a strong list would keep every model ever opened


class Owned:
    """A function over one llama.cpp model that closes the model when the function is dropped.

    llama-cpp-python's ``Llama`` sits in reference cycles (its exit stack's callbacks), so once
    unreferenced it waits for the garbage collector, holding its weights' mapping, KV cache and
    logits buffers (~200 MB for the 135M default at 256 positions with every position's logits).
    """

    def __init__(self, llm: Any, fn: Any) -> None:
        self.llm, self._fn = llm, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = self._fn = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # during interpreter shutdown
            pass


@atexit.register
def _close_all() -> None:
    # llama-cpp-python's finalizers fail when they run during interpreter shutdown
    while _OPEN:
        try:
            _OPEN.pop().close()
        except Exception:
            pass


def load(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False, n_batch: int = 512,
         flash_attn: bool = True) -> Any:
    """Open a GGUF in llama.cpp.

    ``flash_attn``: llama.cpp itself enables flash attention on CPU by default (``-fa auto``);
    llama-cpp-python turns it off unless asked. Measured on the 30-layer SmolLM2 Q4_0 file it
    decodes 16-19% faster (benchmarks/RESULTS.md, "Decode against the memory-bandwidth limit").
    Sliding-window blocks (Gemma 3) get llama.cpp's small SWA cache (the window plus one
    micro-batch), as its own CLI and server allocate it; llama-cpp-python's default is a full-size one.
    """
    from .gguf_check import check_gguf

    llama_cpp = _llama_cpp()
    check_gguf(path)  # a bad file gets an error here, not a crash in llama.cpp's parser
    try:
        llm = llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
            n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False,
            flash_attn=flash_attn, swa_full=False,
        )
        _OPEN.add(llm)
        return llm
    except Exception as exc:  # llama.cpp reports every bad file as a generic load failure
        raise EdgekdError(
            f"llama.cpp could not load {path} ({exc})",
            fix="check that the file is a complete GGUF written by llama.cpp or edgekd",
        ) from None


def logits_fn(path: str | Path, block_len: int, threads: int):
    """A LogitsFn (see edgekd.methods.evaluate) backed by llama.cpp: all positions' logits per block."""
    llm = load(path, n_ctx=block_len, threads=threads, logits_all=True, n_batch=block_len)

    def fn(batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), batch.shape[1], llm.n_vocab()), dtype=np.float32)
        for i, row in enumerate(batch):
            llm.reset()
            llm.eval([int(t) for t in row])
            out[i] = llm.scores[: len(row)]
        return out

    return Owned(llm, fn)


class Tokenizer:
    """A GGUF's own tokenizer in llama.cpp (the vocabulary only, no weights loaded), with the two
    things corpus packing needs (``edgekd.methods.data.tokenize_documents``): a call on a list of
    texts returning ``{"input_ids": [...]}`` and ``eos_token_id``. Lets ``edgekd bench`` tokenize
    held-out text on a device without transformers."""

    def __init__(self, path: str | Path) -> None:
        from .gguf_check import check_gguf

        llama_cpp = _llama_cpp()
        check_gguf(path)
        try:
            self._vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except Exception as exc:
            raise EdgekdError(f"llama.cpp could not read the vocabulary of {path} ({exc})",
                              fix="check that the file is a complete GGUF written by llama.cpp or edgekd") from None
        _OPEN.add(self._vocab)
        self.eos_token_id = int(self._vocab.token_eos())
        self.bos_token_id = int(self._vocab.token_bos())

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [self._vocab.tokenize(t.encode("utf-8"), add_bos=add_special_tokens, special=False) for t in texts]}


def greedy(llm: Any, prompt: list[int], new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of ``prompt`` (argmax of the context's logits each step), ending at any of ``stop_ids``."""
    llm.reset()
    llm.eval([int(t) for t in prompt])
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(last_logits(llm).argmax())
        out.append(token)
        if token in stop_ids or len(prompt) + len(out) >= llm.n_ctx():
            break
        llm.eval([token])
    return out


def _attention_shape(meta: dict[str, str]) -> tuple[int, int, int, int] | None:
    """(layers, heads, kv_heads, head_dim) from GGUF metadata."""
    try:
        arch = meta["general.architecture"]
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta[f"{arch}.embedding_length"]) // heads))
    except (KeyError, ValueError):
        return None
    return layers, heads, kv_heads, head_dim


def model_facts(llm: Any) -> dict[str, float] | None:
    """Tensor bytes, parameter count and attention shape of a loaded model (for the roofline)."""
    shape = _attention_shape(dict(llm.metadata))
    if shape is None:
        return None
    layers, heads, kv_heads, head_dim = shape
    return {"tensor_bytes": float(llm._model.size()), "params": float(llm._model.n_params()),
            "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


def quantize(source: str | Path, out_path: str | Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's own quantizer (``llama-quantize``; K-quant and round-to-nearest baselines) from an F16 GGUF.

    ``ftype``: llama.cpp's file-type name in lower case, as ``llama-quantize`` spells it (``q4_k_m``).
    """
    from ..fileio import atomic_path

    llama_cpp = _llama_cpp()
    code = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}", None)
    if code is None:
        raise EdgekdError(f"llama.cpp has no file type {ftype!r}", fix="use a name llama-quantize knows, such as q4_k_m")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = code
    params.nthread = threads
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EdgekdError(f"llama.cpp failed to quantize {source} to {ftype} (code {rc})", fix="check the F16 file")
    return out_path


def last_logits(llm: Any) -> np.ndarray:
    """The logits of the last position ``llm.eval`` computed (a copy): llama-cpp-python keeps them in
    ``scores`` only with ``logits_all``, so they are read from the context's own buffer."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32)


# ggml's type ids of the formats quantized through ggml_quantize_chunk (ggml.h, enum ggml_type), and the
# bytes of a 256-weight row in each: a library whose ggml_row_size disagrees is not used
GGML_TYPE_IDS = {"q4_k": 12, "q5_k": 13, "q6_k": 14}
GGML_ROW_BYTES_256 = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


_GGML: dict[str, Any] = {}  # "lib": the loaded library, or None once it was looked for and not found


def _ggml_base() -> Any:
    """llama-cpp-python's ggml base library with ``ggml_quantize_chunk`` declared, or None where
    llama-cpp-python (or that symbol) is not installed. Found without importing llama_cpp itself."""
    if "lib" not in _GGML:
        import ctypes
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        folders = [Path(f) / "lib" for f in (spec.submodule_search_locations or [])] if spec else []
        _GGML["lib"] = None
        for path in (f / name for f in folders for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")):
            try:
                lib = ctypes.CDLL(str(path))
                quantize, row_size = lib.ggml_quantize_chunk, lib.ggml_row_size
            except (OSError, AttributeError):  # not there, or a build without the symbols
                continue
            quantize.restype = ctypes.c_size_t
            quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p]
            row_size.restype, row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
            if all(row_size(GGML_TYPE_IDS[k], 256) == n for k, n in GGML_ROW_BYTES_256.items()):
                _GGML["lib"] = lib
            break
    return _GGML["lib"]


def ggml_quantize(kind: str, w: np.ndarray, row_bytes: int, threads: int) -> np.ndarray | None:
    """GGUF bytes (rows, ``row_bytes``) of the float32 matrix ``w`` in ``kind``, written by llama.cpp's own
    quantizer: ``ggml_quantize_chunk`` with no importance matrix, what ``llama-quantize`` runs (for the
    K-quants, ggml-quants.c's ``quantize_row_q*_K_ref``). Rows are split over ``threads`` threads (ctypes
    lets go of the GIL in the call; each row is quantized on its own, so the bytes do not depend on the
    split). None where the library is not installed: the caller falls back to its numpy reference."""
    lib = _ggml_base()
    if lib is None or kind not in GGML_TYPE_IDS:
        return None
    from ..kquants import _in_row_chunks  # numpy only: the split the numpy references use

    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape

    def rows_quantized(part: np.ndarray) -> tuple[np.ndarray]:
        out = np.empty((len(part), row_bytes), np.uint8)
        written = lib.ggml_quantize_chunk(GGML_TYPE_IDS[kind], part.ctypes.data, out.ctypes.data, 0, len(part), cols, None)
        if written != out.size:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {len(part)} rows of {row_bytes}")
        return (out,)

    threads = max(1, min(threads, rows))
    return _in_row_chunks(rows_quantized, w, workers=threads, chunk_rows=-(-rows // threads), min_rows=1)[0]
