"""Reference quantizers: bit-exact with gguf.quants (llama.cpp's reference), numpy == torch."""

import numpy as np
import pytest
import torch

from edgekd.formats import (
    dequantize_q4_0,
    dequantize_q8_0,
    pack_q4_0,
    pack_q8_0,
    quantize_q4_0,
    quantize_q8_0,
    round_trip,
    torch_round_trip,
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


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "f16"])
def test_torch_fake_quant_is_bit_identical_to_numpy(fmt):
    w = weights(3)
    assert np.array_equal(torch_round_trip(torch.from_numpy(w), fmt).numpy(), round_trip(w, fmt))


def test_requantizing_a_dequantized_q4_0_weight_is_a_fixed_point():
    """Export re-quantizes QAT master weights; on weights already on the grid nothing changes."""
    w = round_trip(weights(4), "q4_0")
    assert np.array_equal(round_trip(w, "q4_0"), w)


def test_q4_0_grid():
    s, q = quantize_q4_0(weights(5))
    assert q.min() >= 0 and q.max() <= 15 and s.dtype == np.float16


def test_bad_shape():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q4_0(np.zeros((4, 30), np.float32))
