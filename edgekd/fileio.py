"""Atomic writes: a file or directory appears under its final name only when complete.

An interrupted run therefore never leaves a half-written artifact that looks
finished: at worst a ``.tmp-*`` sibling remains, which readers ignore.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import faults
from .errors import EdgekdError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk: an OSError without errno


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in DISK_FULL or (exc.errno is None and bool(SHORT_WRITE.search(str(exc))))


def disk_full_error(path: Path, exc: OSError, needed: int, exact: bool = True) -> EdgekdError:
    """The one message a full disk gets: the path, the space the write needed (``exact=False``: more
    than ``needed``, what a writer had written when the disk filled), what is free there."""
    try:
        st = os.statvfs(path.parent if path.parent.exists() else Path.cwd())
        free = f"{st.f_bavail * st.f_frsize / 1e6:,.1f} MB free there"
    except OSError:
        free = "free space unknown"
    need = f"{needed / 1e6:,.1f} MB" if exact else f"more than the {needed / 1e6:,.1f} MB written when the disk filled"
    why = os.strerror(exc.errno) if exc.errno else f"short write: {exc}"
    return EdgekdError(f"no room to write {path} ({why}): it needs {need}, {free}",
                       fix="free space on that disk (or point --output elsewhere), then run the same command with --resume: "
                       "files written before this one are intact")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the user's usual mode
        with os.fdopen(fd, "wb") as f:
            faults.disk_full(path)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point(f"before renaming {path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full_error(path, exc, len(data)) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    faults.point(f"after writing {path.name}")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file (or a directory) to; rename it into place on success.

    For writers that insist on a path of their own (``save_pretrained``, ``plt.savefig``,
    the GGUF writer). An existing target is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer produced nothing at {tmp}")
        faults.disk_full(path)
        faults.point(f"before renaming {path.name}")
        if path.is_dir():
            old = path.parent / f".old-{path.name}.{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        written = _size(tmp)
        _remove(tmp)
        if is_disk_full(exc):  # the writer (save_pretrained, the GGUF writer) stopped part-way
            raise disk_full_error(path, exc, written, exact=False) from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    faults.point(f"after writing {path.name}")


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
