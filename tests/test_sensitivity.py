"""Measured knob costs: each format, block and width alone, as KL to the teacher; the model is left unchanged."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_llama

    model = make_tiny_llama(128, layers=3, hidden=64, intermediate=128, seed=1)
    with torch.no_grad():  # initialisation-sized weights barely move the logits: make every tensor matter
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


def test_costs_order_as_the_formats_do_and_the_model_is_untouched(tiny):
    from edgekd.methods.sensitivity import measure_sensitivity, measurements, predicted_format_kl

    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    blocks = np.random.default_rng(0).integers(0, 128, size=(4, 32))
    seen = []
    s = measure_sensitivity(tiny, blocks, ["q4_0", "q5_0", "q8_0"], (0.5,), progress=seen.append)
    assert len(seen) == measurements(tiny, ["q4_0", "q5_0", "q8_0"], (0.5,)) == 8 * 3 + 3 + 1
    assert s.tokens == 4 * 31 and set(s.formats) == {"embedding", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    for group, costs in s.formats.items():
        assert 0 <= costs["q8_0"] < costs["q5_0"] < costs["q4_0"], group  # fewer bits, more damage
    assert len(s.blocks) == 3 and all(kl > 0 for kl in s.blocks) and s.mlp_width["0.5"] > 0
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    from edgekd.formats import FormatPlan

    all4 = predicted_format_kl(s, FormatPlan.uniform("q4_0", {"embedding": "q4_0"}), tuple(r for r in s.formats if r != "embedding"))
    assert all4 == pytest.approx(sum(c["q4_0"] for c in s.formats.values()))
