"""torchao's int4 weight-only post-training quantization, as a baseline row of the benchmarks.

The only module that calls torchao. It quantizes onto torchao's symmetric int4 grid, which is
not any shipped file's grid, so it serves comparison only; edgekd's own QAT uses the exact
grids of edgekd.formats.
"""

from __future__ import annotations

from typing import Any

import torch


def torchao_int4_ptq(model: Any, group_size: int = 32) -> Any:
    """torchao's int4 weight-only PTQ (symmetric, groups of 32) on CPU, as a baseline row.

    Uses ``IntxWeightOnlyConfig`` (its CPU path); ``Int4WeightOnlyConfig`` needs CUDA to convert.
    """
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from ..families import family_of

    linears = family_of(model).linear_modules(model)  # the decoder blocks' linear layers, not the head

    def is_block_linear(mod: torch.nn.Module, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and any(mod is m for _, _, m in linears)

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)), filter_fn=is_block_linear)
    return model
