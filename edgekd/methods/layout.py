"""The models as a training config holds them while it trains, and restored afterwards: the
frozen teacher in the least memory that computes the same targets (bf16 linears, or nothing at
all when the logit cache supplies every target), the student with activation checkpointing and a
sparse lookup gradient where its config asks for them."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..families import family_of
from .memory import stored_weight, teacher_use

SCRATCH_PREFIX = "teacher-parked-"


@contextlib.contextmanager
def training_layout(student: Any, teacher: Any, cfg: Any, scratch: Path | None = None, distributed: bool = False,
                    cached: bool | str | None = False) -> Iterator[None]:
    """The models as ``cfg`` trains them, restored afterwards.

    When no step runs the teacher's blocks (``cached``: a cache supplies its targets, and no
    hidden, attention or on-policy loss needs them), every teacher tensor waits in a file in
    ``scratch`` and the model holds empty ones: the whole teacher leaves memory while the student
    trains, but for its output head when the cache holds its final hidden states (``cached`` is
    "hidden"; under bf16 the head is held in bf16, exact as below).
    Otherwise, with bf16 forward passes, the frozen teacher's linear weights are held in bf16:
    autocast rounds them to bf16 for every product anyway, so the teacher computes exactly what it
    did, in half the memory; their fp32 values wait in the file. Its other tensors are copied out
    of the file a teacher is usually memory-mapped from (transformers maps safetensors), so that
    mapping, resident once read, is released too. Either way the teacher comes back bit for bit.
    ``cfg.gradient_checkpointing``: transformers' gradient checkpointing on the student.

    A student whose token embedding is its head too looks tokens up with a sparse gradient: the
    head's dense gradient reaches the shared table first in backward and the lookup's rows are
    added into it in place, instead of a second (vocab, hidden) gradient and their sum (not when
    ``distributed``: DistributedDataParallel reduces dense gradients only).
    """
    base = getattr(student, "module", student)
    if cfg.gradient_checkpointing:
        _checkpointing(base, True)
    lookup = family_of(base).embedding_module(base)
    sparse_lookup = not distributed and family_of(base).tied(base) and isinstance(lookup, torch.nn.Embedding) and not lookup.sparse
    if sparse_lookup:
        lookup.sparse = True
    use = teacher_use(cfg, cached)
    bf16 = torch.bfloat16 if cfg.precision == "bf16" else None
    if use != "model":  # everything waits in the file; a head read by the step stays, in its products' dtype
        head = stored_weight(family_of(teacher).head_module(teacher)) if use == "head" else None
        parked = {id(p): (p, bf16 if p is head else None) for p in teacher.parameters()
                  if p.numel() and (p is not head or bf16 is not None)}
    else:
        embedding = stored_weight(family_of(teacher).embedding_module(teacher))
        parked = {id(m.weight): (m.weight, bf16) for m in teacher.modules() if isinstance(m, torch.nn.Linear)
                  and m.weight.dtype == torch.float32 and m.weight is not embedding} if bf16 is not None else {}
    tensors = [t for t, _ in parked.values()]
    tmp = where = None
    try:
        if tensors:
            for stale in Path(scratch).glob(f"{SCRATCH_PREFIX}*") if scratch is not None else ():  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            tmp = tempfile.TemporaryDirectory(dir=scratch, prefix=SCRATCH_PREFIX, ignore_cleanup_errors=True)
            where = _park(list(parked.values()), Path(tmp.name) / "tensors.bin")
            if use == "model":
                with torch.no_grad():
                    for t in [*teacher.parameters(), *teacher.buffers()]:
                        if t.dtype == torch.float32:  # out of the file mapping (the linears are bf16 copies now)
                            t.data = t.data.clone()
        yield
    finally:
        if cfg.gradient_checkpointing:
            _checkpointing(base, False)
        if sparse_lookup:
            lookup.sparse = False
        if tmp is not None:
            _unpark(tensors, where, Path(tmp.name) / "tensors.bin")
            tmp.cleanup()


def _park(tensors: list[tuple[torch.Tensor, torch.dtype | None]], path: Path) -> list[tuple[int, torch.dtype, tuple[int, ...]]]:
    """Write each tensor's bytes to ``path`` and swap it for its copy in the dtype paired with it
    (None: an empty tensor), one at a time (a whole-model serializer would hold a second copy of
    every weight while it writes)."""
    where, offset = [], 0
    with open(path, "wb") as f, torch.no_grad():
        for t, to in tensors:
            data = t.data.detach().cpu().contiguous()
            data.view(torch.uint8).numpy().tofile(f)
            where.append((offset, data.dtype, tuple(data.shape)))
            offset += data.numel() * data.element_size()
            t.data = t.data.to(to) if to is not None else torch.empty(0, dtype=data.dtype, device=t.device)
    return where


def _unpark(tensors: list[torch.Tensor], where: list[tuple[int, torch.dtype, tuple[int, ...]]], path: Path) -> None:
    """The tensors back from :func:`_park`'s file, bit for bit, one at a time."""
    with torch.no_grad():
        for t, (offset, dtype, shape) in zip(tensors, where):
            nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset))
            t.data = raw.view(dtype).reshape(shape).to(t.device)


def _checkpointing(model: Any, on: bool) -> None:
    """transformers' activation checkpointing (named gradient checkpointing before 5.x), non-reentrant."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
