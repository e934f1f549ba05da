"""Quantization-aware training for the profile's weight format, and PTQ baselines.

QAT replaces every weight the exporter will quantize by its round trip through the
reference quantizer of :mod:`edgekd.formats` in the forward pass, with a straight-through
estimator in the backward pass (Bengio et al. 2013): the gradient reaches the fp32 master
weight unchanged. Training then distills from the unquantized teacher (QAD), as in
torchao's QAT recipe, but on the exact grid of the shipped file: GGUF Q4_0's grid
(``d = max / -8``, codes 0..15) differs from torchao's symmetric int4 grid, so torchao's
fake-quantizer would train for a different file.

After training, :func:`materialize` writes the round-tripped weights into the model: the
torch model then *is* the shipped model in fp32 arithmetic, and re-quantizing it on export
reproduces the same codes and scales (the round trip is a fixed point on the grid).
torchao is used only for the torchao int4 PTQ baseline, in :func:`torchao_int4_ptq`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from .formats import EMBEDDING_FORMAT, torch_round_trip

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _RoundTripSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: str) -> torch.Tensor:
        return torch_round_trip(w, fmt)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class FakeQuant(torch.nn.Module):
    """Parametrization: weight -> its exact round trip through ``fmt`` (STE gradient)."""

    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _RoundTripSTE.apply(w, self.fmt)


def quantized_modules(model: Any, weight_format: str) -> list[tuple[Any, str]]:
    """(module, format) for every tensor the exporters quantize: the policy of formats.py."""
    out = []
    for layer in model.model.layers:
        for name in LINEAR_NAMES:
            mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name, None)
            if mod is not None:
                out.append((mod, weight_format))
    emb_fmt = EMBEDDING_FORMAT[weight_format]
    out.append((model.model.embed_tokens, emb_fmt))
    out.append((model.lm_head, emb_fmt))  # tied: the same Parameter, quantized the same way
    return out


def prepare_qat(model: Any, weight_format: str) -> Any:
    """Register fake-quant parametrizations in place; returns the model."""
    for mod, fmt in quantized_modules(model, weight_format):
        if fmt in ("f32",):
            continue
        parametrize.register_parametrization(mod, "weight", FakeQuant(fmt), unsafe=True)
    return model


def is_prepared(model: Any) -> bool:
    return parametrize.is_parametrized(model.model.layers[0].self_attn.q_proj)


def materialize(model: Any, weight_format: str) -> Any:
    """Remove QAT parametrizations, leaving the exactly round-tripped weights (what ships)."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight if not is_prepared(model) else \
        model.lm_head.parametrizations.weight.original is model.model.embed_tokens.parametrizations.weight.original
    for mod, fmt in quantized_modules(model, weight_format):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        else:
            with torch.no_grad():
                mod.weight.data = torch_round_trip(mod.weight.data, fmt)
    if tied:  # removal leaves two tensors; tie them again so the model saves and exports as tied
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def torchao_int4_ptq(model: Any, group_size: int = 32) -> Any:
    """torchao's int4 weight-only PTQ (symmetric, groups of 32) on CPU, as a baseline row.

    Uses ``IntxWeightOnlyConfig`` (its CPU path); ``Int4WeightOnlyConfig`` needs CUDA to convert.
    """
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    def is_block_linear(mod: torch.nn.Module, fqn: str) -> bool:
        return isinstance(mod, torch.nn.Linear) and ".layers." in fqn

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)), filter_fn=is_block_linear)
    return model
