"""The weight-format registry: every quantized format's bytes equal gguf.quants (llama.cpp's
reference), numpy == torch, re-quantizing is a fixed point, and the plan that assigns formats."""

import numpy as np
import pytest
import torch

from edgekd import EdgekdError
from edgekd.formats import FORMATS, LINEAR_FORMATS, FormatPlan, get

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

QUANTIZED = [n for n, f in FORMATS.items() if f.quantized]
# gguf.quants quantizes the 32-weight types; the K-quants are checked against llama.cpp's own
# quantizer in tests/test_kquants.py
BLOCK32 = [n for n in QUANTIZED if not FORMATS[n].fixed_grid]


def weights(seed, shape=(48, 256), scale=0.05):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, scale, size=shape).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = 3.0  # an outlier
    w[2, 40] = -3.0
    w[3, :32] = np.float32(1e-8)  # a tiny block
    w[4, 64:96] = 0.02  # a constant block (max == min)
    w[5, 96:128] = -np.abs(w[5, 96:128])  # an all-negative block
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", BLOCK32)
def test_bytes_and_values_equal_llama_cpps_reference(name, seed):
    fmt, w = FORMATS[name], weights(seed)
    qtype = GGMLQuantizationType[fmt.gguf_type]
    ours = fmt.pack(fmt.quantize(w))
    ref = quantize(w, qtype)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    assert np.array_equal(fmt.round_trip(w), dequantize(ref, qtype))
    assert ours.size == fmt.tensor_bytes(w.size)  # bits per weight as stored


@pytest.mark.parametrize("name", list(FORMATS))
def test_torch_fake_quant_is_bit_identical_to_numpy(name):
    fmt, w = FORMATS[name], weights(3)
    assert np.array_equal(fmt.torch_round_trip(torch.from_numpy(w)).numpy(), fmt.round_trip(w))


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if not f.fixed_grid])
def test_requantizing_a_round_tripped_weight_is_a_fixed_point(name):
    """Export re-quantizes QAT master weights; on weights already on the grid nothing changes
    (K-quants export on the grid QAT trained on instead: tests/test_kquants.py)."""
    fmt = FORMATS[name]
    for seed in (4, 5):
        w = fmt.round_trip(weights(seed))
        assert np.array_equal(fmt.round_trip(w), w)
        if fmt.quantized:  # and the same bytes, for blocks whose scale is not zero or below fp16's range
            normal = weights(seed)[8:]
            assert np.array_equal(fmt.pack(fmt.quantize(fmt.round_trip(normal))), fmt.pack(fmt.quantize(normal)))


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.clip_search])
def test_clipped_blocks_are_a_fixed_point_too(name):
    """Clip search shrinks a block's scale; the reference still reproduces the clipped block exactly."""
    fmt, w = FORMATS[name], weights(6)
    clip = torch.from_numpy(np.random.default_rng(0).uniform(0.6, 1.0, size=(w.shape[0], w.shape[1] // 32, 1)).astype(np.float32))
    clipped = fmt.torch_round_trip(torch.from_numpy(w), clip).numpy()
    assert np.array_equal(fmt.round_trip(clipped), clipped) and not np.array_equal(clipped, fmt.round_trip(w))


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
        # ONNX holds a format itself only where MatMulNBits has its bit width and no minimum
        assert fmt.onnx_file_format in (name, "f32") and (fmt.onnx_file_format != name or not fmt.quantized or fmt.onnx_bits)
    assert LINEAR_FORMATS == ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q8_0", "f16")


def test_format_plan_and_unknown_names():
    plan = FormatPlan.uniform("q4_0")
    assert plan.format_of("attn_q", 3).name == "q4_0" and plan.format_of("embedding").name == "q8_0"
    assert plan.format_of("head").name == "q8_0" and plan.format_of("norm").name == "f32" and plan.name == "q4_0"
    assert FormatPlan.uniform("f16").format_of("embedding").name == "f16"
    with pytest.raises(EdgekdError, match="unknown weight format 'q3'"):
        get("q3")


def test_bad_shape():
    with pytest.raises(ValueError, match="multiple of 32"):
        FORMATS["q4_0"].quantize(np.zeros((4, 30), np.float32))
