"""Weight formats, defined once: storage cost, reference quantizers, and the precision policy.

"Train what you ship": QAT's fake-quant and every exporter call the functions here, so the
weights an exported file holds are exactly the weights the QAT model computed with.

GGUF Q4_0 (ggml-quants.c ``quantize_row_q4_0_ref``): blocks of 32 along a row; the block's
signed element of largest magnitude ``m`` gives ``d = m / -8`` (fp32); codes
``q = trunc(x / d + 8.5)`` clipped to 0..15; ``d`` is stored as fp16; a weight is
``fp16(d) * (q - 8)``. GGUF Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (half away from
zero), ``fp16(d) * q``. The same Q4_0 codes and fp16-rounded scales, with the default zero
point 8, are an ONNX MatMulNBits int4 block-32 weight, so one set of codes serves both runtimes.

Both quantizers exist in numpy (exporters, tests) and in torch (fake-quant during training);
they use the same IEEE single-precision operations, so their results are bit-identical.
Policy for tensors kept in higher precision, mirrored by QAT and all exporters: norms stay
f32; token embeddings (and a tied output head) use Q8_0 when the linear layers are 4- or
8-bit, because the output head's error reaches every logit directly.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
BITS_PER_WEIGHT = {"q4_0": 4.5, "q8_0": 8.5, "f16": 16.0, "f32": 32.0}
EMBEDDING_FORMAT = {"q4_0": "q8_0", "q8_0": "q8_0", "f16": "f16"}


def tensor_bytes(n_weights: int, fmt: str) -> float:
    return n_weights * BITS_PER_WEIGHT[fmt] / 8


def _blocks(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"need a 2-D weight whose rows are a multiple of {BLOCK} long, got {w.shape}")
    return w.reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)


# ---------------------------------------------------------------- numpy reference


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales fp16 [rows, cols/32], codes uint8 0..15 [rows, cols]) for a 2-D fp32 weight."""
    b = _blocks(w)
    imax = np.abs(b).argmax(axis=-1)[..., None]
    d = np.take_along_axis(b, imax, axis=-1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(b * inv + np.float32(8.5)).astype(np.float32).clip(0, 15).astype(np.uint8)
    return d[..., 0].astype(np.float16), q.reshape(w.shape)


def dequantize_q4_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    d = scales.astype(np.float32)[..., None]
    q = codes.reshape(codes.shape[0], -1, BLOCK).astype(np.float32) - np.float32(8)
    return (d * q).reshape(codes.shape)


def pack_q4_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """GGUF Q4_0 bytes, (rows, cols/32*18) uint8: fp16 d, then element j | element j+16 << 4."""
    rows, cols = codes.shape
    q = codes.reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))
    d = scales.astype(np.float16).reshape(rows, cols // BLOCK, 1).view(np.uint8)
    return np.concatenate([d, packed], axis=-1).reshape(rows, -1)


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales fp16 [rows, cols/32], codes int8 [rows, cols])."""
    b = _blocks(w)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = b * inv
    q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)  # roundf: half away from zero
    return d[..., 0].astype(np.float16), q.reshape(w.shape)


def dequantize_q8_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    d = scales.astype(np.float32)[..., None]
    return (d * codes.reshape(codes.shape[0], -1, BLOCK).astype(np.float32)).reshape(codes.shape)


def pack_q8_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    rows, cols = codes.shape
    d = scales.astype(np.float16).reshape(rows, cols // BLOCK, 1).view(np.uint8)
    q = codes.reshape(rows, cols // BLOCK, BLOCK).view(np.uint8)
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


QUANTIZERS = {"q4_0": (quantize_q4_0, dequantize_q4_0, pack_q4_0), "q8_0": (quantize_q8_0, dequantize_q8_0, pack_q8_0)}


def round_trip(w: np.ndarray, fmt: str) -> np.ndarray:
    """The weight a runtime computes with after storing ``w`` in ``fmt``."""
    if fmt == "f16":
        return np.asarray(w, dtype=np.float32).astype(np.float16).astype(np.float32)
    if fmt == "f32":
        return np.asarray(w, dtype=np.float32)
    q, dq, _ = QUANTIZERS[fmt]
    return dq(*q(w))


# ---------------------------------------------------------------- torch (fake-quant)


def q4_0_grid(b, clip=None):
    """Q4_0 of blocks ``b`` (rows, n_blocks, 32) in torch: (reference scale ``max / -8``, scale
    used (times ``clip``), ``b / scale``, codes 0..15 before the -8 offset). Shared by the
    forward round trip and the learned-clip gradient (edgekd.quant)."""
    import torch

    d_ref = torch.gather(b, -1, b.abs().argmax(dim=-1, keepdim=True)) / -8.0
    d = d_ref if clip is None else d_ref * clip
    scaled = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return d_ref, d, scaled, torch.trunc(scaled + 8.5).clamp(0, 15)


def torch_round_trip(w, fmt: str, clip=None):
    """Torch twin of :func:`round_trip`, bit-identical, differentiable only through an STE wrapper.

    ``clip`` (Q4_0 only): a per-block factor in (0, 1], shape (rows, cols/32, 1), that shrinks
    the block's scale to ``d = clip * m / -8``; values beyond the shrunk range saturate at the
    extreme codes. The result is still a block the reference quantizer reproduces exactly:
    the extreme element ``m`` lands at ``m / d + 8.5 = 8.5 - 8 / clip <= 0.5``, code 0, value
    ``-8 * fp16(d)``, the block's largest magnitude (other codes give at most 7 * |fp16(d)|).
    Re-quantizing finds ``d' = -8 * fp16(d) / -8 = fp16(d)`` exactly (scaling by 8 is exact)
    and every element back at its code. With clip > 1 no element would reach code 0 and the
    reference would pick another scale, so clip factors never exceed 1.
    """
    import torch

    if fmt == "f32":
        return w
    if fmt == "f16":
        return w.half().float()
    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    if fmt == "q4_0":
        _, d, _, q = q4_0_grid(b, clip)
        return (d.half().float() * (q - 8.0)).reshape(rows, cols)
    if fmt == "q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        x = b * inv
        q = torch.sign(x) * torch.floor(x.abs() + 0.5)
        return (d.half().float() * q).reshape(rows, cols)
    raise ValueError(f"unknown weight format {fmt!r}")
