"""A GGUF file checked in Python before llama.cpp's native parser sees it.

llama.cpp has had out-of-bounds reads in its GGUF parser, and a truncated or crafted file can
crash the process inside native code instead of raising an error. Every file edgekd hands to
llama.cpp first goes through the ``gguf`` package's reader (pure Python over a memory map): the
magic, the version, every key-value pair and tensor description inside the file, key-value and
tensor counts the file's size can hold, and every tensor's data inside the file. Checked once per
file state (path, size, modification time) in a process.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ..errors import EdgekdError

GGUF_MAGIC = b"GGUF"
MIN_KV_BYTES = 8 + 8 + 4  # a key's length, one byte of key at least (padded to the length field), the value type
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset
BAD_FILE_FIX = "re-download or re-export the file (compare its size with the original); edgekd writes GGUF files with `edgekd compress`"


_PASSED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files that passed in this process


def _key(path: str | os.PathLike) -> tuple[str, int, int]:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise EdgekdError(f"cannot read {p}: {exc.strerror}", fix="check the path") from None
    return str(p.resolve()), st.st_size, st.st_mtime_ns


def check_gguf(path: str | os.PathLike) -> None:
    """Raise an EdgekdError naming what is wrong unless ``path`` is a sound GGUF file. The verdict is
    kept per file state, not the reader: it holds the whole vocabulary as Python objects (170 MB for a
    49k-token one), which a benchmark would count as the runtime's memory."""
    if _key(path) not in _PASSED:
        read_gguf(path)


def mark_checked(path: str | os.PathLike) -> None:
    """Record that ``path`` passed (a benchmark's worker process, whose parent checked the file)."""
    _PASSED.add(_key(path))


def read_gguf(path: str | os.PathLike) -> Any:
    """The ``gguf`` reader of ``path`` after every check (uncached), for callers that read its fields."""
    key = _key(path)
    reader = _read(key[0], key[1])
    _PASSED.add(key)
    return reader


def _read(path: str, size: int) -> Any:
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise EdgekdError(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')",
                          fix="pass a .gguf file written by llama.cpp or edgekd")
    if len(head) < 24:
        raise EdgekdError(f"{path} is truncated inside its header ({size} bytes)", fix=BAD_FILE_FIX)
    tensors, kvs = struct.unpack("<QQ", head[8:24])
    if kvs * MIN_KV_BYTES + tensors * MIN_TENSOR_BYTES > size:
        raise EdgekdError(f"{path} claims {kvs:,} key-value pairs and {tensors:,} tensors, more than its {size:,} bytes can hold",
                          fix=BAD_FILE_FIX)
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EdgekdError("reading GGUF files needs the `gguf` package", fix="pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, KeyError, OverflowError... on a bad file
        raise EdgekdError(f"{path} is a corrupt or truncated GGUF file ({type(exc).__name__}: {str(exc)[:200]})", fix=BAD_FILE_FIX) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise EdgekdError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}", fix=BAD_FILE_FIX)
    _check_vocabulary(reader, path)
    return reader


def _check_vocabulary(reader: Any, path: str) -> None:
    """What llama.cpp asserts on (aborting the process) rather than reports: every token string
    distinct, and one score and one type per token where the file has them (found by the header fuzz)."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return
    tokens = [bytes(field.parts[i]) for i in field.data]
    if len(set(tokens)) != len(tokens):
        seen: set[bytes] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise EdgekdError(f"{path} has a vocabulary with a repeated token ({dup[:40]!r}): a corrupt or tampered file", fix=BAD_FILE_FIX)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        other = reader.fields.get(key)
        if other is not None and len(other.data) != len(tokens):
            raise EdgekdError(f"{path} has {len(tokens):,} tokens but {len(other.data):,} entries in {key}", fix=BAD_FILE_FIX)
