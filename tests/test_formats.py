"""The weight-format registry: reference quantizers bit-exact with gguf.quants (llama.cpp's
reference), numpy == torch for every format, and the plan that assigns formats to tensors."""

import numpy as np
import pytest
import torch

from edgekd import EdgekdError
from edgekd.formats import (
    FORMATS,
    LINEAR_FORMATS,
    FormatPlan,
    dequantize_q4_0,
    dequantize_q8_0,
    get,
    pack_q4_0,
    pack_q8_0,
    quantize_q4_0,
    quantize_q8_0,
)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402


def weights(seed, shape=(48, 256), scale=0.05):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, scale, size=shape).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 3.0  # an outlier
    w[2, 40] = -3.0
    w[3, :32] = np.float32(1e-8)  # a tiny block
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_0_bytes_equal_gguf(seed):
    w = weights(seed)
    ours = pack_q4_0(*quantize_q4_0(w))
    ref = quantize(w, GGMLQuantizationType.Q4_0)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    assert np.array_equal(dequantize_q4_0(*quantize_q4_0(w)), dequantize(ref, GGMLQuantizationType.Q4_0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q8_0_bytes_equal_gguf(seed):
    w = weights(seed)
    ours = pack_q8_0(*quantize_q8_0(w))
    ref = quantize(w, GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, ref)
    assert np.array_equal(dequantize_q8_0(*quantize_q8_0(w)), dequantize(ref, GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("name", list(FORMATS))
def test_torch_fake_quant_is_bit_identical_to_numpy(name):
    fmt, w = FORMATS[name], weights(3)
    assert np.array_equal(fmt.torch_round_trip(torch.from_numpy(w)).numpy(), fmt.round_trip(w))


@pytest.mark.parametrize("name", list(FORMATS))
def test_requantizing_a_round_tripped_weight_is_a_fixed_point(name):
    """Export re-quantizes QAT master weights; on weights already on the grid nothing changes."""
    fmt = FORMATS[name]
    w = fmt.round_trip(weights(4))
    assert np.array_equal(fmt.round_trip(w), w)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.quantized])
def test_quantized_formats_pack_to_their_gguf_type_and_size(name):
    """Each entry's packer writes exactly llama.cpp's bytes for its GGUF type, at its bits per weight."""
    fmt, w = FORMATS[name], weights(6)
    packed = fmt.pack(*fmt.quantize(w))
    assert np.array_equal(packed, quantize(w, GGMLQuantizationType[fmt.gguf_type]))
    assert packed.size == fmt.tensor_bytes(w.size)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.onnx_bits])
def test_unsigned_codes_dequantize_with_the_default_zero_point(name):
    fmt, w = FORMATS[name], weights(7)
    codes, scales = fmt.unsigned_codes(w)
    zero = 1 << (fmt.onnx_bits - 1)
    values = (codes.astype(np.float32) - zero).reshape(w.shape[0], -1, fmt.block) * scales[..., None]
    assert codes.max() < 2 ** fmt.onnx_bits and np.array_equal(values.reshape(w.shape), fmt.round_trip(w))


def test_registry_entries_are_complete():
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.embedding in FORMATS and fmt.onnx_file_format in FORMATS and fmt.parity
        assert (fmt.quantize is None) == (fmt.pack is None) == (fmt.torch_quantize is None)
        assert not fmt.clip_search or fmt.grid is not None
    assert LINEAR_FORMATS == ("q4_0", "q8_0", "f16")


def test_format_plan_and_unknown_names():
    plan = FormatPlan.uniform("q4_0")
    assert plan.format_of("attn_q", 3).name == "q4_0" and plan.format_of("embedding").name == "q8_0"
    assert plan.format_of("head").name == "q8_0" and plan.format_of("norm").name == "f32" and plan.name == "q4_0"
    assert FormatPlan.uniform("f16").format_of("embedding").name == "f16"
    with pytest.raises(EdgekdError, match="unknown weight format 'q3'"):
        get("q3")


def test_q4_0_grid():
    s, q = quantize_q4_0(weights(5))
    assert q.min() >= 0 and q.max() <= 15 and s.dtype == np.float16


def test_bad_shape():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4_0(np.zeros((4, 30), np.float32))
