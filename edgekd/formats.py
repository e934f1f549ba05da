"""The weight-format registry: every format a tensor can ship in, defined once.

"Train what you ship": QAT's fake-quant and every exporter ask the :class:`WeightFormat` here,
so the weights an exported file holds are exactly the weights the QAT model computed with.
Adding a format is one entry in :data:`FORMATS` (plus its tests against the runtime's reference).
The quantizers themselves, bit-exact with llama.cpp's references in numpy and twinned in torch,
are in :mod:`edgekd.blockquant` (32-weight blocks) and :mod:`edgekd.kquants` (K-quants, whose
QAT trains on a grid fixed at its start: ``fixed_grid``). The same block codes and fp16-rounded scales, offset to unsigned
with zero point 2^(bits-1), are an ONNX ``MatMulNBits`` / ``GatherBlockQuantized`` weight where
onnxruntime has that bit width (4 and 8), so one set of codes serves both runtimes.

Which tensor gets which format is a :class:`FormatPlan`: block linear layers in the profile's
``weight_format``; token embeddings (and a tied output head) in that format's ``embedding``
format, Q8_0 for the 4- to 8-bit formats by default, because the output head's error reaches every
logit directly; norms in f32. QAT and every exporter read the plan, never the policy itself.
Torch is imported only inside the torch functions: this module is part of the device side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from . import blockquant as bq
from . import kquants as kq
from .errors import EdgekdError

BLOCK = bq.BLOCK


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
    quantize: Callable[[np.ndarray], bq.Blocks] | None = None
    dequantize: Callable[[bq.Blocks], np.ndarray] | None = None
    pack: Callable[[bq.Blocks], np.ndarray] | None = None
    torch_quantize: Callable[..., Any] | None = None  # (w, clip) -> round-tripped w
    grid: Callable[..., Any] | None = None  # torch (blocks, clip) -> (d_ref, d, w / d, codes): learned clip
    code_offset: int = 0  # codes are stored + offset (the zero point); grid codes run 0 .. levels - 1
    levels: int = 0
    # K-quants: re-quantizing their own output need not give the same codes, so QAT trains on the
    # grid the reference quantizer picks at its start and exporters write codes on that grid
    fixed_grid: bool = False

    @property
    def quantized(self) -> bool:
        return self.quantize is not None

    @property
    def identity(self) -> bool:
        """Stored exactly as trained (f32): nothing to fake-quantize."""
        return self.quantize is None and self.numpy_dtype is np.float32

    def tensor_bytes(self, n_weights: int) -> float:
        return n_weights * self.bits_per_weight / 8

    def fits(self, cols: int) -> bool:
        """Whether a weight with rows ``cols`` long can be stored in this format (K-quants: multiples of 256)."""
        return self.block is None or cols % self.block == 0

    def blocks_for(self, w: np.ndarray, grid: Any = None) -> Any:
        """The stored blocks of ``w``: the reference quantizer's, or, for a fixed-grid format given
        the ``grid`` QAT trained on, the codes of ``w`` on that grid (weights already on it map back exactly)."""
        if grid is not None and self.fixed_grid:
            return grid._replace(codes=kq.codes_on_grid(w, grid, keep=grid.codes))
        return self.quantize(w)

    def shipped(self, w: np.ndarray, grid: Any = None) -> np.ndarray:
        """The weights a runtime computes with for ``w`` stored in this format (on ``grid`` where given)."""
        if self.quantize is None:
            return self.round_trip(w)
        return self.dequantize(self.blocks_for(w, grid))

    def round_trip(self, w: np.ndarray) -> np.ndarray:
        """The weight a runtime computes with after storing ``w`` in this format."""
        if self.quantize is None:
            return np.asarray(w, dtype=np.float32).astype(self.numpy_dtype).astype(np.float32)
        return self.dequantize(self.quantize(w))

    def torch_round_trip(self, w: Any, clip: Any = None) -> Any:
        """Torch twin of :meth:`round_trip`, bit-identical; differentiable only through an STE wrapper."""
        if self.torch_quantize is None:
            import torch

            return w if self.numpy_dtype is np.float32 else w.to(torch.float16).float()
        return self.torch_quantize(w, clip)

    def onnx_int_form(self, runtime: str, embedding: bool = False) -> bool:
        """An ONNX file for ``runtime`` stores this format as its block codes (``MatMulNBits``, or
        ``GatherBlockQuantized`` for an ``embedding`` table), not as fp32 values. onnxruntime-genai
        files take int8 activations, which make 4- and 8-bit products fast; the plain onnxruntime
        decoder keeps fp32 activations, where only this format's ``onnx_file_format`` has a kernel
        (Q4_0), and stores a table as 8-bit codes."""
        if runtime == "onnxruntime-genai":
            return self.quantized and self.onnx_bits is not None
        if embedding:
            return self.onnx_bits == 8
        return self.quantized and self.onnx_file_format == self.name and self.onnx_bits is not None

    def unsigned_codes(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8 [rows, cols] offset to zero point 2^(bits-1), fp32 scales [rows, cols/32])."""
        blocks = self.quantize(w)
        zero = 1 << (self.onnx_bits - 1)
        return (blocks.codes.astype(np.int16) + (zero - self.code_offset)).astype(np.uint8), blocks.scales.astype(np.float32)


def _symmetric(name: str, bits: int, ftype: int, parity: dict[str, tuple[float, float]], **kw: Any) -> WeightFormat:
    """Q4_0 / Q5_0: symmetric blocks; clip search keeps them exact (blockquant.torch_symmetric)."""
    return WeightFormat(name, (16 + BLOCK * bits) / BLOCK, BLOCK, name.upper(), ftype, embedding="q8_0", parity=parity,
                        clip_search=True, quantize=partial(bq.quantize_symmetric, bits=bits),
                        dequantize=partial(bq.dequantize, offset=1 << (bits - 1)), pack=partial(bq.pack, bits=bits),
                        torch_quantize=partial(bq.torch_symmetric, bits=bits), grid=partial(bq.symmetric_grid, bits=bits),
                        code_offset=1 << (bits - 1), levels=1 << bits, **kw)


def _affine(name: str, bits: int, ftype: int) -> WeightFormat:
    """Q4_1 / Q5_1: a scale and a minimum per block. ONNX's MatMulNBits has integer zero points,
    not a minimum, so an ONNX export of these carries the exact dequantized weights in fp32."""
    return WeightFormat(name, (32 + BLOCK * bits) / BLOCK, BLOCK, name.upper(), ftype, embedding="q8_0",
                        onnx_file_format="f32", parity={"llama.cpp": (0.01, 0.94)},
                        quantize=partial(bq.quantize_affine, bits=bits), dequantize=bq.dequantize,
                        pack=partial(bq.pack, bits=bits), torch_quantize=partial(bq.torch_affine, bits=bits))


def _kquant(name: str, ftype: int) -> WeightFormat:
    """Q4_K / Q5_K / Q6_K (edgekd.kquants): 256-weight super-blocks, rows a multiple of 256 long.
    ONNX's MatMulNBits has no two-level scales nor minimums: an ONNX export carries the exact
    dequantized weights in fp32."""
    _, _, nbytes = kq.SPEC[name]
    return WeightFormat(name, nbytes * 8 / kq.QK_K, kq.QK_K, name.upper(), ftype, embedding="q8_0", onnx_file_format="f32",
                        parity={"llama.cpp": (0.01, 0.94)}, quantize=kq.QUANTIZERS[name], dequantize=kq.dequantize,
                        pack=kq.pack, torch_quantize=partial(kq.torch_reference_round_trip, kind=name), fixed_grid=True)


LLAMA_CPP_4BIT = {"llama.cpp": (0.01, 0.94)}
FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    _symmetric("q4_0", 4, 2, {**LLAMA_CPP_4BIT, "onnxruntime": (0.002, 0.99)}, onnx_file_format="q4_0", onnx_bits=4),
    _affine("q4_1", 4, 3),
    # 5-bit codes: onnxruntime's MatMulNBits holds 4- and 8-bit blocks, so ONNX gets fp32 weights
    _symmetric("q5_0", 5, 8, LLAMA_CPP_4BIT, onnx_file_format="f32"),
    _affine("q5_1", 5, 9),
    # K-quants, file types as llama.cpp names a file mostly in them (Q4_K_S, Q5_K_S, Q6_K)
    _kquant("q4_k", 14),
    _kquant("q5_k", 16),
    _kquant("q6_k", 18),
    WeightFormat("q8_0", 8.5, BLOCK, "Q8_0", 7, embedding="q8_0", onnx_file_format="f32",
                 parity={"llama.cpp": (0.01, 0.94)}, onnx_bits=8,
                 quantize=bq.quantize_q8_0, dequantize=bq.dequantize, pack=partial(bq.pack, bits=8), torch_quantize=bq.torch_q8_0),
    WeightFormat("f16", 16.0, None, "F16", 1, embedding="f16", onnx_file_format="f32",
                 parity={"llama.cpp": (0.001, 0.98)}, numpy_dtype=np.float16),
    WeightFormat("f32", 32.0, None, "F32", 0, embedding="f32", onnx_file_format="f32",
                 parity={"onnxruntime": (0.0005, 0.995)}, linear=False),
)}
# what deployment.weight_format may name (the profile schema's allowed values)
LINEAR_FORMATS: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.linear)
# the quantized formats the planner may choose between by default
PLANNER_FORMATS: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.linear and f.quantized)
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
    ``tensors`` overrides the defaults per tensor, keyed like GGUF tensor names without
    ``.weight``: ``blk.3.ffn_down`` (one block's tensor) or ``ffn_down`` (that role in every block).
    A tied output head is the embedding tensor: it takes the embedding's format.
    """

    linear: str
    embedding: str
    head: str  # an untied output head
    norm: str = NORM_FORMAT
    tensors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def uniform(cls, weight_format: str, tensors: dict[str, str] | None = None) -> FormatPlan:
        """Every block linear in ``weight_format``, embeddings and head in its embedding format,
        then the per-tensor choices of ``tensors`` (``embedding`` and ``head`` keys included)."""
        fmt = get(weight_format)
        tensors = dict(tensors or {})
        embedding = get(tensors.pop("embedding", fmt.embedding)).name
        head = get(tensors.pop("head", embedding)).name
        for name in tensors.values():
            get(name)
        return cls(linear=fmt.name, embedding=embedding, head=head, tensors=tensors)

    def format_of(self, role: str, layer: int | None = None) -> WeightFormat:
        """The format of the tensor with ``role`` in block ``layer``."""
        if role == "embedding":
            return FORMATS[self.embedding]
        if role == "head":
            return FORMATS[self.head]
        if role == "norm":
            return FORMATS[self.norm]
        name = self.tensors.get(f"blk.{layer}.{role}") if layer is not None else None
        return FORMATS[name or self.tensors.get(role) or self.linear]

    @property
    def uniform_linear(self) -> bool:
        return not self.tensors

    def to_dict(self) -> dict[str, Any]:
        return {"linear": self.linear, "embedding": self.embedding, "head": self.head, "norm": self.norm,
                "tensors": dict(self.tensors)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FormatPlan:
        return cls(d["linear"], d["embedding"], d["head"], d.get("norm", NORM_FORMAT), dict(d.get("tensors") or {}))

    @property
    def name(self) -> str:
        """The file's format as its name says it (``model-<name>.gguf``): the linear layers' default format."""
        return self.linear
