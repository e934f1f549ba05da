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
