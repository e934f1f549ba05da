"""Training corpora: read documents, split train/held-out, tokenise and pack into blocks.

Sources: the embedded default (Python's bundled documentation, ``pydoc_data.topics``),
a plain-text file or a directory of ``.txt``/``.md`` files, a JSONL file with a text
field, a Hugging Face ``datasets`` directory saved with ``save_to_disk``, or a Hub dataset id
(``owner/name[@revision]``: its data files fetched into huggingface_hub's cache, read by
``datasets.load_dataset``; a ``validation`` or ``test`` split becomes the held-out set).

The held-out split is made at document level before tokenisation, so no held-out
text is ever packed into a training block. Documents are ordered by a hash of
their key and taken into the held-out split until it holds the requested fraction
of characters: deterministic, and independent of the order of files on disk.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError

DEFAULT_CORPUS_NAME = "python-docs (pydoc_data.topics)"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
CHUNK_CHARS = 4000  # long documents are cut at paragraph breaks into pieces of about this size


@dataclass
class Document:
    key: str
    text: str


@dataclass
class Corpus:
    name: str
    block_len: int
    train: np.ndarray  # (n_train_blocks, block_len) int32 token ids
    heldout: np.ndarray  # (n_heldout_blocks, block_len)
    stats: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "block_len": self.block_len, **self.stats}

    def save(self, directory: Path) -> None:
        from ..fileio import atomic_write_bytes, atomic_write_json

        for split in ("train", "heldout"):
            buf = _npy_bytes(getattr(self, split))
            atomic_write_bytes(directory / f"{split}.npy", buf)
        atomic_write_json(directory / "corpus.json", self.describe())

    @classmethod
    def load(cls, directory: Path) -> Corpus:
        meta = json.loads((directory / "corpus.json").read_text())
        train = np.load(directory / "train.npy")
        heldout = np.load(directory / "heldout.npy")
        stats = {k: v for k, v in meta.items() if k not in ("name", "block_len")}
        return cls(meta["name"], int(meta["block_len"]), train, heldout, stats)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ---------------------------------------------------------------- reading


def _chunk(key: str, text: str) -> list[Document]:
    """Cut long texts at paragraph breaks so one big file still splits into train and held-out."""
    if len(text) <= 2 * CHUNK_CHARS:
        return [Document(key, text)]
    out, buf, n = [], [], 0
    for para in text.split("\n\n"):
        buf.append(para)
        n += len(para) + 2
        if n >= CHUNK_CHARS:
            out.append(Document(f"{key}#{len(out)}", "\n\n".join(buf)))
            buf, n = [], 0
    if buf:
        out.append(Document(f"{key}#{len(out)}", "\n\n".join(buf)))
    return out


def default_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{name}", topics[name]) for name in sorted(topics)]


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgekdError(f"{path} is not UTF-8 text", fix="convert it to UTF-8, or pass a JSONL/datasets corpus") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) of each non-empty line of a JSONL file; a clear error on a bad line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise EdgekdError(f"{path}:{lineno} is not valid JSON ({exc.msg})", fix="fix that line; JSONL holds one JSON object per line") from None


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise EdgekdError(
                f"{path}:{lineno} has no {text_field!r} field (found: {keys})",
                fix="pass --text-field NAME with the field that holds the text",
            )
        if isinstance(record[text_field], str) and record[text_field].strip():
            docs.append(Document(f"{path.name}:{lineno}", record[text_field]))
    return docs


def _read_hf_dataset(path: Path, text_field: str, hub_name: str | None = None) -> tuple[list[Document], list[Document] | None]:
    """A ``save_to_disk`` directory, or (``hub_name``) a Hub dataset's snapshot read by datasets' loaders."""
    try:
        import datasets
    except ImportError:
        raise EdgekdError("reading a datasets directory needs the `datasets` package", fix="pip install datasets") from None
    try:
        ds = datasets.load_dataset(str(path)) if hub_name else datasets.load_from_disk(str(path))
    except Exception as exc:
        if hub_name:
            raise EdgekdError(f"datasets cannot read the Hub dataset {hub_name} ({type(exc).__name__}: {str(exc)[:200]})",
                              fix="pick a dataset of parquet/JSON/CSV/text files, or pass a local corpus") from None
        raise EdgekdError(f"cannot read the datasets directory {path} ({exc})", fix="save it with Dataset.save_to_disk(path)") from None

    def docs_of(split: Any, name: str) -> list[Document]:
        if text_field not in split.column_names:
            raise EdgekdError(
                f"dataset {hub_name or path} ({name}) has no {text_field!r} column (columns: {split.column_names})",
                fix="pass --text-field NAME with the column that holds the text",
            )
        return [Document(f"{name}:{i}", t) for i, t in enumerate(split[text_field]) if isinstance(t, str) and t.strip()]

    if isinstance(ds, datasets.DatasetDict):
        held_name = next((n for n in ("validation", "test") if n in ds), None)
        train_names = [n for n in ds if n != held_name]
        train = [d for n in train_names for d in docs_of(ds[n], n)]
        return train, (docs_of(ds[held_name], held_name) if held_name else None)
    return docs_of(ds, "data"), None


NOT_FOUND_FIX = "pass a .txt/.jsonl file, a directory of text files, a saved datasets directory, or a Hub dataset id (owner/name)"


def check_corpus_spec(spec: str | os.PathLike | None) -> None:
    """Up-front check (before a run directory is made) that the corpus exists; a Hub dataset id is
    downloaded here (once, into huggingface_hub's cache), so a missing or unreachable one fails now."""
    if spec is None or str(spec) in ("", "default"):
        return
    from .models import download_from_hub, hub_id

    hub = hub_id(spec)
    if hub is not None:
        download_from_hub(*hub, repo_type="dataset")
    elif not Path(spec).expanduser().exists():
        raise EdgekdError(f"corpus not found: {spec}", fix=NOT_FOUND_FIX)


def read_documents(spec: str | os.PathLike | None, text_field: str = "text") -> tuple[str, list[Document], list[Document] | None]:
    """Return (name, documents, held-out documents if the source already splits them)."""
    if spec is None or str(spec) in ("", "default"):
        return DEFAULT_CORPUS_NAME, default_documents(), None
    from .models import download_from_hub, hub_id

    hub = hub_id(spec)
    if hub is not None:
        train, held = _read_hf_dataset(download_from_hub(*hub, repo_type="dataset"), text_field, hub_name=str(spec))
        return f"hub-dataset:{spec}", train, held
    path = Path(spec).expanduser()
    if not path.exists():
        raise EdgekdError(f"corpus not found: {path}", fix=NOT_FOUND_FIX)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            train, held = _read_hf_dataset(path, text_field)
            return f"datasets:{path}", train, held
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise EdgekdError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)}) and is not a datasets directory", fix="point --data at your corpus files")
        docs = [d for p in files for d in _chunk(str(p.relative_to(path)), _read_text_file(p))]
        return f"text-dir:{path}", docs, None
    if path.suffix.lower() in (".jsonl", ".json"):
        return f"jsonl:{path}", _read_jsonl(path, text_field), None
    return f"text:{path}", _chunk(path.name, _read_text_file(path)), None


def split_documents(docs: list[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split: hash order, held-out until it holds the fraction of characters."""
    ordered = sorted(docs, key=lambda d: (zlib.crc32(d.key.encode("utf-8")), d.key))
    total = sum(len(d.text) for d in docs)
    held, n = [], 0
    for doc in ordered:
        if n >= heldout_fraction * total or len(held) == len(docs) - 1:
            break
        held.append(doc)
        n += len(doc.text)
    held_keys = {d.key for d in held}
    train = [d for d in docs if d.key not in held_keys]
    return train, held


# ---------------------------------------------------------------- tokenising


def tokenize_documents(docs: list[Document], tokenizer: Any) -> np.ndarray:
    """One token stream: each document's ids followed by EOS, so blocks never glue two texts silently."""
    if not docs:
        return np.zeros(0, dtype=np.int32)
    eos = tokenizer.eos_token_id
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for seq in ids:
        stream.extend(seq)
        if eos is not None:
            stream.append(eos)
    return np.asarray(stream, dtype=np.int32)


def calibration_blocks(train: np.ndarray, n: int) -> np.ndarray:
    """``n`` evenly spaced training blocks (never held-out ones) for a calibration pass."""
    n = min(n, len(train))
    return train[np.linspace(0, len(train) - 1, n).astype(int)]


def pack(stream: np.ndarray, block_len: int) -> np.ndarray:
    n = len(stream) // block_len
    return stream[: n * block_len].reshape(n, block_len).copy()


def load_corpus(
    spec: str | os.PathLike | None,
    tokenizer: Any,
    block_len: int,
    heldout_fraction: float = 0.1,
    text_field: str = "text",
) -> Corpus:
    name, docs, presplit_heldout = read_documents(spec, text_field)
    docs = [d for d in docs if d.text.strip()]
    if not docs and not presplit_heldout:
        raise EdgekdError(f"the corpus {name} is empty (no text found)", fix="pass a corpus that contains text")
    if presplit_heldout is None:
        train_docs, held_docs = split_documents(docs, heldout_fraction)
    else:
        train_docs, held_docs = docs, presplit_heldout
    train_stream = tokenize_documents(train_docs, tokenizer)
    held_stream = tokenize_documents(held_docs, tokenizer)
    total = len(train_stream) + len(held_stream)
    split_note = "document-level"
    if len(held_stream) < block_len or len(train_stream) < block_len:
        # Too few documents for a document-level split: cut the one token stream instead,
        # keeping the held-out tail strictly after the training part.
        stream = np.concatenate([train_stream, held_stream])
        n_held = max(block_len, int(round(heldout_fraction * len(stream))))
        train_stream, held_stream = stream[:-n_held], stream[-n_held:]
        split_note = "token-stream tail (too few documents for a document-level split)"
    if len(train_stream) < block_len or len(held_stream) < block_len:
        raise EdgekdError(
            f"the corpus {name} has {total} tokens, too few for one training block and one held-out block "
            f"of {block_len} tokens each (needs at least {2 * block_len})",
            fix="pass a larger corpus, or a shorter block with --set compression.data.block_len=N",
        )
    train, heldout = pack(train_stream, block_len), pack(held_stream, block_len)
    stats = {
        "documents": len(docs) + len(presplit_heldout or []),
        "train_documents": len(train_docs),
        "heldout_documents": len(held_docs),
        "split": split_note,
        "tokens": int(total),
        "train_blocks": int(len(train)),
        "heldout_blocks": int(len(heldout)),
        "train_tokens": int(train.size),
        "heldout_tokens": int(heldout.size),
    }
    return Corpus(name, block_len, train, heldout, stats)
