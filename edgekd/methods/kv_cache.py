"""The KV cache the torch sampler decodes with: transformers' cache, its keys and values written in place.

transformers' ``DynamicCache`` grows each layer's keys and values by ``torch.cat`` at every decode
step, so a step copies the whole cache: memory traffic that grows with the sequence (quadratic over
a sample). Here each layer's buffers are allocated once for the decode's whole length (prompt + new
tokens, known before it starts) and each step writes its token's keys and values into them;
attention reads a view of the part written so far, so the masks, positions and sampled tokens are
those of ``DynamicCache``. Measured: 1.09x the teacher's sampling tokens/s on the default teacher,
1.11x on a Qwen3-0.6B shape, the same tokens; the resident peak barely changes (the allocator reuses
the freed copies) (benchmarks/RESULTS.md, "Speed of the toolkit", item 9). The transformers-facing
names live in this module only.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers of ``capacity`` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # sized by the first call: batch, heads, head_dim and dtype as the model makes them
            self.device = key_states.device
            self.key_buffer = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; this step would fill {end}")
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def _not_for_sampling(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("edgekd's sampling cache is only filled in order (crop and batch reordering would leave it stale)")

    crop = batch_repeat_interleave = batch_select_indices = _not_for_sampling


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` (what model code expects) of :class:`PreallocatedLayer` layers."""

    def __init__(self, capacity: int):
        Cache.__init__(self, layer_class_to_replicate=functools.partial(PreallocatedLayer, capacity))


def decode_cache(capacity: int) -> PreallocatedCache:
    """A KV cache for decoding sequences of at most ``capacity`` positions (prompt + new tokens)."""
    return PreallocatedCache(capacity)


def cache_argument(model: Any) -> str:
    """The name ``model``'s forward takes its KV cache by (transformers 5.x renamed ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

