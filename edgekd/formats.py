"""Weight formats: storage cost per weight, and which tensors stay in higher precision.

Block formats store a scale per block of 32 weights (GGUF): Q4_0 = 32 4-bit codes + one fp16
scale = 18 bytes per 32 weights (4.5 bits/weight); Q8_0 = 34 bytes per 32 (8.5 bits/weight).

Policy for tensors that stay in higher precision, mirrored by QAT and every exporter:
norms stay f32; token embeddings (and a tied output head) use Q8_0 when the linear layers
are 4- or 8-bit, because the output head's error reaches every logit directly.
"""

from __future__ import annotations

BLOCK = 32
BITS_PER_WEIGHT = {"q4_0": 4.5, "q8_0": 8.5, "f16": 16.0, "f32": 32.0}
EMBEDDING_FORMAT = {"q4_0": "q8_0", "q8_0": "q8_0", "f16": "f16"}


def tensor_bytes(n_weights: int, fmt: str) -> float:
    return n_weights * BITS_PER_WEIGHT[fmt] / 8
