"""The arithmetic of training's forward passes: bf16 autocast where the hardware has it, else fp32."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def bf16_supported() -> bool:
    """Native bf16 arithmetic: AVX512-BF16/AMX on x86 (oneDNN's own check), or a bf16-capable GPU."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str) -> str:
    """``auto`` -> ``bf16`` where the hardware computes it natively, else ``fp32``.

    Without native support, bf16 is emulated and slower than fp32, so ``auto`` never picks it there.
    """
    if setting == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return setting


def forward_precision(precision: str, device_type: str, cache_casts: bool = True) -> Any:
    """Autocast context for the forward passes: bf16 matmuls, fp32 master weights (mixed precision,
    Micikevicius et al. 2018; bf16 needs no loss scaling). The losses upcast to fp32 themselves.
    ``cache_casts=False``: no bf16 copy of every weight kept for the whole forward pass (with
    activation checkpointing nothing reuses them: each weight is cast again where it is recomputed)."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=cache_casts)
    return contextlib.nullcontext()


@contextlib.contextmanager
def bf16_linear_weights(model: Any, copies: dict[int, torch.nn.Parameter] | None = None) -> Any:
    """For a frozen model decoding under bf16 autocast: its linear weights held as bf16 copies inside
    the block, put back on exit. Autocast rounds every product's weight to bf16 anyway, so the logits
    are bit for bit those of autocast alone (tested), without casting each weight again at every
    decode step: the teacher's sampling measured 1.35x the tokens/s of fp32 (135M; 1.35-1.79x a Qwen3-0.6B shape)
    on an AMX CPU, where autocast alone was no faster (benchmarks/RESULTS.md, "Speed of the
    toolkit"). A head tied to the token embedding gets a copy of its own; the table stays fp32 for its lookups.
    ``copies``: a dict kept by the caller, so the copies are made once for many blocks (one per shard)."""
    copies = {} if copies is None else copies
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        for m in _fp32_linears(model):
            w = m.weight
            if id(w) not in copies:
                copies[id(w)] = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
            swapped.append((m, w))
            m.weight = copies[id(w)]
        yield
    finally:
        for m, w in swapped:
            m.weight = w


def _fp32_linears(model: Any) -> list[torch.nn.Module]:
    """The linear layers :func:`bf16_linear_weights` gives bf16 copies: fp32 weights, not computed by a parametrization (QAT)."""
    from torch.nn.utils import parametrize

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not parametrize.is_parametrized(m)
            and m.weight.dtype == torch.float32]


def bf16_linear_copy_bytes(model: Any) -> int:
    """What :func:`bf16_linear_weights` holds besides the fp32 weights (a weight two layers share, once)."""
    return 2 * sum({id(m.weight): m.weight.numel() for m in _fp32_linears(model)}.values())
