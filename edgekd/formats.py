"""The weight-format registry: every format a tensor can ship in, defined once.

"Train what you ship": QAT's fake-quant and every exporter ask the :class:`WeightFormat` here,
so the weights an exported file holds are exactly the weights the QAT model computed with.
Adding a format is one entry in :data:`FORMATS` (plus its tests against the runtime's reference).

GGUF Q4_0 (ggml-quants.c ``quantize_row_q4_0_ref``): blocks of 32 along a row; the block's
signed element of largest magnitude ``m`` gives ``d = m / -8`` (fp32); codes
``q = trunc(x / d + 8.5)`` clipped to 0..15; ``d`` is stored as fp16; a weight is
``fp16(d) * (q - 8)``. GGUF Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (half away from
zero), ``fp16(d) * q``. The same block codes and fp16-rounded scales, offset to unsigned with
zero point 2^(bits-1), are an ONNX ``MatMulNBits`` / ``GatherBlockQuantized`` weight, so one
set of codes serves both runtimes.

Each quantizer exists in numpy (exporters, tests) and in torch (fake-quant during training);
they use the same IEEE single-precision operations, so their results are bit-identical.
Torch is imported only inside the torch functions: this module is part of the device side.

Which tensor gets which format is a :class:`FormatPlan`: block linear layers in the profile's
``weight_format``; token embeddings (and a tied output head) in that format's ``embedding``
format, Q8_0 for the 4- and 8-bit formats, because the output head's error reaches every logit
directly; norms in f32. QAT and every exporter read the plan, never the policy itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import EdgekdError

BLOCK = 32


def _blocks(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"need a 2-D weight whose rows are a multiple of {BLOCK} long, got {w.shape}")
    return w.reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack_scales_and(scales: np.ndarray, code_bytes: np.ndarray) -> np.ndarray:
    """GGUF block layout: each block's fp16 scale, then its code bytes; (rows, blocks * (2 + n)) uint8."""
    rows, blocks = scales.shape
    d = scales.astype(np.float16).reshape(rows, blocks, 1).view(np.uint8)
    return np.concatenate([d, code_bytes.reshape(rows, blocks, -1)], axis=-1).reshape(rows, -1)


# ---------------------------------------------------------------- Q4_0


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales fp16 [rows, cols/32], codes uint8 0..15 [rows, cols]) for a 2-D fp32 weight."""
    b = _blocks(w)
    imax = np.abs(b).argmax(axis=-1)[..., None]
    d = np.take_along_axis(b, imax, axis=-1) / np.float32(-8)
    q = np.trunc(b * _inverse(d) + np.float32(8.5)).astype(np.float32).clip(0, 15).astype(np.uint8)
    return d[..., 0].astype(np.float16), q.reshape(w.shape)


def dequantize_q4_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    d = scales.astype(np.float32)[..., None]
    q = codes.reshape(codes.shape[0], -1, BLOCK).astype(np.float32) - np.float32(8)
    return (d * q).reshape(codes.shape)


def pack_q4_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """GGUF Q4_0 bytes, (rows, cols/32*18) uint8: fp16 d, then element j | element j+16 << 4."""
    rows, cols = codes.shape
    q = codes.reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    return _pack_scales_and(scales, q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4)))


def q4_0_grid(b: Any, clip: Any = None) -> tuple[Any, Any, Any, Any]:
    """Q4_0 of blocks ``b`` (rows, n_blocks, 32) in torch: (reference scale ``max / -8``, scale
    used (times ``clip``), ``b / scale``, codes 0..15 before the -8 offset). Shared by the
    forward round trip and the learned-clip gradient (edgekd.methods.qat)."""
    import torch

    d_ref = torch.gather(b, -1, b.abs().argmax(dim=-1, keepdim=True)) / -8.0
    d = d_ref if clip is None else d_ref * clip
    scaled = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return d_ref, d, scaled, torch.trunc(scaled + 8.5).clamp(0, 15)


def torch_round_trip_q4_0(w: Any, clip: Any = None) -> Any:
    """Torch twin of the numpy Q4_0 round trip, bit-identical.

    ``clip``: a per-block factor in (0, 1], shape (rows, cols/32, 1), that shrinks the block's
    scale to ``d = clip * m / -8``; values beyond the shrunk range saturate at the extreme
    codes. The result is still a block the reference quantizer reproduces exactly: the extreme
    element ``m`` lands at ``m / d + 8.5 = 8.5 - 8 / clip <= 0.5``, code 0, value
    ``-8 * fp16(d)``, the block's largest magnitude (other codes give at most 7 * |fp16(d)|).
    Re-quantizing finds ``d' = -8 * fp16(d) / -8 = fp16(d)`` exactly (scaling by 8 is exact)
    and every element back at its code. With clip > 1 no element would reach code 0 and the
    reference would pick another scale, so clip factors never exceed 1.
    """
    rows, cols = w.shape
    _, d, _, q = q4_0_grid(w.float().reshape(rows, cols // BLOCK, BLOCK), clip)
    return (d.half().float() * (q - 8.0)).reshape(rows, cols)


# ---------------------------------------------------------------- Q8_0


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales fp16 [rows, cols/32], codes int8 [rows, cols])."""
    b = _blocks(w)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    x = b * _inverse(d)
    q = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)  # roundf: half away from zero
    return d[..., 0].astype(np.float16), q.reshape(w.shape)


def dequantize_q8_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    d = scales.astype(np.float32)[..., None]
    return (d * codes.reshape(codes.shape[0], -1, BLOCK).astype(np.float32)).reshape(codes.shape)


def pack_q8_0(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return _pack_scales_and(scales, codes.view(np.uint8))


def torch_round_trip_q8_0(w: Any, clip: Any = None) -> Any:
    import torch

    rows, cols = w.shape
    b = w.float().reshape(rows, cols // BLOCK, BLOCK)
    d = b.abs().amax(dim=-1, keepdim=True) / 127.0
    x = b * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)
    return (d.half().float() * q).reshape(rows, cols)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class WeightFormat:
    """One storage format: its cost, its exact reference quantizer, and how each runtime holds it.

    ``quantize`` / ``dequantize`` / ``pack`` are None for float formats (stored as ``numpy_dtype``).
    ``onnx_bits``: the bit width of its ``MatMulNBits`` / ``GatherBlockQuantized`` form (codes
    offset to unsigned, default zero point 2^(bits-1)); ``onnx_file_format``: the format an ONNX
    export of linear layers in this format carries (int8 ``MatMulNBits`` has no fp32-activation
    kernel in onnxruntime, so Q8_0 and f16 profiles export an fp32 ONNX of the same weights).
    ``parity``: runtime -> (max KL, min top-1 agreement) a file in this format must reach against
    the torch model holding the same weights (edgekd.exporters.checks).
    """

    name: str
    bits_per_weight: float
    block: int | None
    gguf_type: str  # gguf.GGMLQuantizationType member
    gguf_file_type: int  # llama_ftype: the file's "mostly" type
    embedding: str  # format of token embeddings and a tied output head when linears use this one
    onnx_file_format: str
    parity: dict[str, tuple[float, float]]
    linear: bool = True  # a profile may name it as deployment.weight_format
    clip_search: bool = False  # per-block scale clipping keeps the file exact (Q4_0 only, see above)
    numpy_dtype: Any = np.float32
    onnx_bits: int | None = None
    quantize: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    dequantize: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    pack: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    torch_quantize: Callable[..., Any] | None = None  # (w, clip) -> round-tripped w
    grid: Callable[..., Any] | None = None  # torch (blocks, clip) -> (d_ref, d, w / d, codes): learned clip
    code_offset: int = 0  # codes are stored + offset (the zero point); grid codes run 0 .. levels - 1
    levels: int = 0

    @property
    def quantized(self) -> bool:
        return self.quantize is not None

    @property
    def identity(self) -> bool:
        """Stored exactly as trained (f32): nothing to fake-quantize."""
        return self.quantize is None and self.numpy_dtype is np.float32

    def tensor_bytes(self, n_weights: int) -> float:
        return n_weights * self.bits_per_weight / 8

    def round_trip(self, w: np.ndarray) -> np.ndarray:
        """The weight a runtime computes with after storing ``w`` in this format."""
        if self.quantize is None:
            return np.asarray(w, dtype=np.float32).astype(self.numpy_dtype).astype(np.float32)
        return self.dequantize(*self.quantize(w))

    def torch_round_trip(self, w: Any, clip: Any = None) -> Any:
        """Torch twin of :meth:`round_trip`, bit-identical; differentiable only through an STE wrapper."""
        if self.torch_quantize is None:
            import torch

            return w if self.numpy_dtype is np.float32 else w.to(torch.float16).float()
        return self.torch_quantize(w, clip)

    def unsigned_codes(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 [rows, cols] offset to zero point 2^(bits-1), fp32 scales [rows, cols/32])."""
        scales, codes = self.quantize(w)
        zero = 1 << (self.onnx_bits - 1)
        return (codes.astype(np.int16) + (zero - self.code_offset)).astype(np.uint8), scales.astype(np.float32)


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("q4_0", 4.5, BLOCK, "Q4_0", 2, embedding="q8_0", onnx_file_format="q4_0",
                 parity={"llama.cpp": (0.01, 0.94), "onnxruntime": (0.002, 0.99)}, clip_search=True, onnx_bits=4,
                 quantize=quantize_q4_0, dequantize=dequantize_q4_0, pack=pack_q4_0,
                 torch_quantize=torch_round_trip_q4_0, grid=q4_0_grid, code_offset=8, levels=16),
    WeightFormat("q8_0", 8.5, BLOCK, "Q8_0", 7, embedding="q8_0", onnx_file_format="f32",
                 parity={"llama.cpp": (0.01, 0.94)}, onnx_bits=8,
                 quantize=quantize_q8_0, dequantize=dequantize_q8_0, pack=pack_q8_0, torch_quantize=torch_round_trip_q8_0),
    WeightFormat("f16", 16.0, None, "F16", 1, embedding="f16", onnx_file_format="f32",
                 parity={"llama.cpp": (0.001, 0.98)}, numpy_dtype=np.float16),
    WeightFormat("f32", 32.0, None, "F32", 0, embedding="f32", onnx_file_format="f32",
                 parity={"onnxruntime": (0.0005, 0.995)}, linear=False),
)}
# what deployment.weight_format may name (the profile schema's allowed values)
LINEAR_FORMATS: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.linear)
FP32 = "f32"  # unquantized: norms, and the fp32 ONNX export
NORM_FORMAT = FP32


def get(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise EdgekdError(f"unknown weight format {name!r}", fix=f"choose one of {', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class FormatPlan:
    """The format of every tensor of one model, by role: what QAT trains on and exporters write.

    Roles are the architecture description's (edgekd.families): a block linear layer's role
    (``attn_q``, ``ffn_down``, ...) with its layer index, ``embedding``, ``head``, ``norm``.
    """

    linear: str
    embedding: str
    head: str  # an untied output head; a tied one is the embedding
    norm: str = NORM_FORMAT

    @classmethod
    def uniform(cls, weight_format: str) -> FormatPlan:
        """Every block linear in ``weight_format``, embeddings and head in its embedding format."""
        fmt = get(weight_format)
        return cls(linear=fmt.name, embedding=fmt.embedding, head=fmt.embedding)

    def format_of(self, role: str, layer: int | None = None) -> WeightFormat:
        """The format of the tensor with ``role`` in block ``layer`` (a uniform plan gives every
        block the same; per-layer choices are what a mixed-precision plan changes)."""
        if role == "embedding":
            return FORMATS[self.embedding]
        if role == "head":
            return FORMATS[self.head]
        if role == "norm":
            return FORMATS[self.norm]
        return FORMATS[self.linear]

    def to_dict(self) -> dict[str, str]:
        return {"linear": self.linear, "embedding": self.embedding, "head": self.head, "norm": self.norm}

    @property
    def name(self) -> str:
        """The file's format as its name says it (``model-<name>.gguf``): the linear layers' format."""
        return self.linear
