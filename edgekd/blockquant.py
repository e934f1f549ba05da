"""GGUF's 32-element block quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): numpy references and torch twins.

Each numpy function is ggml-quants.c's ``quantize_row_<type>_ref`` written with the same IEEE
single-precision operations (so results are bit-identical; tests check the bytes against
``gguf.quants``), and each torch twin computes the same values for fake-quant during QAT:

- symmetric, ``b`` bits (Q4_0 ``b=4``, Q5_0 ``b=5``): the block's signed element of largest
  magnitude ``m`` gives ``d = m / -2^(b-1)``; codes ``q = trunc(x / d + 2^(b-1) + 0.5)`` clipped
  to 0 .. 2^b - 1; a weight is ``fp16(d) * (q - 2^(b-1))``;
- affine, ``b`` bits (Q4_1, Q5_1): ``d = (max - min) / (2^b - 1)``, ``m = min``; codes
  ``trunc((x - min) / d + 0.5)``; a weight is ``fp16(d) * q + fp16(m)``;
- Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (half away from zero); ``fp16(d) * q``.

Storage (one block): fp16 ``d``, fp16 ``m`` (affine), 4 bytes of fifth bits (5-bit types, bit j
for element j), then the low nibbles (element j | element j + 16 << 4), or the int8 codes (Q8_0).
Torch is imported inside the torch functions only: this module is part of the device side.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

BLOCK = 32


class Blocks(NamedTuple):
    """A quantized 2-D weight: per-block fp16 scales [rows, cols/32], codes [rows, cols], and
    per-block fp16 minimums for the affine types."""

    scales: np.ndarray
    codes: np.ndarray
    mins: np.ndarray | None = None


def blocks_of(w: np.ndarray, block: int = BLOCK) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"need a 2-D weight whose rows are a multiple of {block} long, got {w.shape}")
    return w.reshape(w.shape[0], w.shape[1] // block, block)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


# ---------------------------------------------------------------- numpy references


def quantize_symmetric(w: np.ndarray, bits: int) -> Blocks:
    b = blocks_of(w)
    half = np.float32(1 << (bits - 1))
    imax = np.abs(b).argmax(axis=-1)[..., None]
    d = np.take_along_axis(b, imax, axis=-1) / -half
    q = np.trunc(b * _inverse(d) + (half + np.float32(0.5))).astype(np.float32).clip(0, (1 << bits) - 1)
    return Blocks(d[..., 0].astype(np.float16), q.astype(np.uint8).reshape(w.shape))


def quantize_affine(w: np.ndarray, bits: int) -> Blocks:
    b = blocks_of(w)
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32((1 << bits) - 1)
    q = np.trunc((b - lo) * _inverse(d) + np.float32(0.5)).astype(np.float32).clip(0, (1 << bits) - 1)
    return Blocks(d[..., 0].astype(np.float16), q.astype(np.uint8).reshape(w.shape), lo[..., 0].astype(np.float16))


def quantize_q8_0(w: np.ndarray) -> Blocks:
    b = blocks_of(w)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    x = b * _inverse(d)
    q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)  # roundf: half away from zero
    return Blocks(d[..., 0].astype(np.float16), q.reshape(w.shape))


def dequantize(blocks: Blocks, offset: int = 0) -> np.ndarray:
    """The weights a runtime computes with: ``d * (q - offset)``, plus ``m`` for affine blocks."""
    codes = blocks.codes
    d = blocks.scales.astype(np.float32)[..., None]
    q = codes.reshape(codes.shape[0], -1, BLOCK).astype(np.float32) - np.float32(offset)
    out = d * q
    if blocks.mins is not None:
        out = out + blocks.mins.astype(np.float32)[..., None]
    return out.reshape(codes.shape)


def pack(blocks: Blocks, bits: int) -> np.ndarray:
    """GGUF bytes, (rows, blocks * block_bytes) uint8, in the layout described above."""
    rows, cols = blocks.codes.shape
    nb = cols // BLOCK
    parts = [blocks.scales.astype(np.float16).reshape(rows, nb, 1).view(np.uint8)]
    if blocks.mins is not None:
        parts.append(blocks.mins.astype(np.float16).reshape(rows, nb, 1).view(np.uint8))
    if bits == 8:
        parts.append(blocks.codes.reshape(rows, nb, BLOCK).view(np.uint8))
    else:
        q = blocks.codes.reshape(rows, nb, 2, BLOCK // 2)
        if bits == 5:
            high = (blocks.codes.reshape(rows, nb, BLOCK) >> np.uint8(4)) & np.uint8(1)
            parts.append(np.packbits(high, axis=-1, bitorder="little"))
        parts.append((q[:, :, 0, :] & np.uint8(0x0F)) | (q[:, :, 1, :] << np.uint8(4)))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


# ---------------------------------------------------------------- torch twins


def symmetric_grid(b: Any, clip: Any = None, *, bits: int) -> tuple[Any, Any, Any, Any]:
    """Symmetric blocks ``b`` (rows, n_blocks, 32) in torch: (reference scale ``max / -2^(b-1)``,
    scale used (times ``clip``), ``b / scale``, codes before the offset). Shared by the forward
    round trip and the learned-clip gradient (edgekd.methods.qat)."""
    import torch

    half = float(1 << (bits - 1))
    d_ref, d = symmetric_scales(b, clip, bits=bits)
    scaled = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return d_ref, d, scaled, torch.trunc(scaled + (half + 0.5)).clamp(0, (1 << bits) - 1)


def symmetric_scales(b: Any, clip: Any = None, *, bits: int) -> tuple[Any, Any]:
    """(reference scale ``max / -2^(b-1)``, scale used (times ``clip``)) of symmetric blocks ``b``."""
    import torch

    d_ref = torch.gather(b, -1, b.abs().argmax(dim=-1, keepdim=True)) / -float(1 << (bits - 1))
    return d_ref, (d_ref if clip is None else d_ref * clip)


def torch_symmetric(w: Any, clip: Any = None, *, bits: int) -> Any:
    """Torch twin of the symmetric round trip, bit-identical.

    ``clip``: a per-block factor in (0, 1], shape (rows, cols/32, 1), that shrinks the block's
    scale to ``d = clip * m / -2^(b-1)``; values beyond the shrunk range saturate at the extreme
    codes. The result is still a block the reference quantizer reproduces exactly: the extreme
    element ``m`` lands at ``m / d + 2^(b-1) + 0.5 = 2^(b-1) (1 - 1 / clip) + 0.5 <= 0.5``, code 0,
    value ``-2^(b-1) fp16(d)``, the block's largest magnitude (other codes give at most
    (2^(b-1) - 1) |fp16(d)|). Re-quantizing finds ``d' = fp16(d)`` exactly (scaling by a power of
    two is exact) and every element back at its code. With clip > 1 no element would reach code 0
    and the reference would pick another scale, so clip factors never exceed 1.
    """
    import torch

    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    half = float(1 << (bits - 1))
    _, d = symmetric_scales(b, clip, bits=bits)
    # symmetric_grid's arithmetic, in place in one weight-sized buffer (a tied 49k x 576 table
    # would otherwise hold several fp32 copies at once inside every step's forward pass)
    q = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q.add_(half + 0.5).trunc_().clamp_(0, (1 << bits) - 1).sub_(half)
    return q.mul_(d.half().float()).reshape(rows, cols)


def torch_affine(w: Any, clip: Any = None, *, bits: int) -> Any:
    import torch

    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    lo, hi = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
    d = (hi - lo) / float((1 << bits) - 1)
    q = b - lo  # one weight-sized buffer, the rest in place (same operations, same bits)
    q.mul_(torch.where(d == 0, torch.zeros_like(d), 1.0 / d)).add_(0.5).trunc_().clamp_(0, (1 << bits) - 1)
    return q.mul_(d.half().float()).add_(lo.half().float()).reshape(rows, cols)


def torch_q8_0(w: Any, clip: Any = None) -> Any:
    import torch

    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    d = b.abs().amax(dim=-1, keepdim=True) / 127.0
    x = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = x.abs().add_(0.5).floor_().mul_(x.sign_())  # round half away from zero, in two buffers
    return q.mul_(d.half().float()).reshape(rows, cols)
