import copy

import numpy as np
import pytest
import torch

from edgekd.formats import round_trip
from edgekd.quant import materialize, prepare_qat, quantized_modules


@pytest.fixture
def tiny():
    from conftest import make_tiny_llama

    return make_tiny_llama(128, layers=2, hidden=64, intermediate=128)


def test_qat_forward_uses_exact_grid_and_ste_gradients(tiny):
    ids = torch.randint(0, 128, (2, 8))
    ref = copy.deepcopy(tiny)
    materialize(ref, "q4_0")  # the shipped weights, no parametrization
    prepare_qat(tiny, "q4_0")
    out = tiny(input_ids=ids).logits
    assert torch.equal(out, ref(input_ids=ids).logits)
    out.sum().backward()
    q = tiny.model.layers[0].self_attn.q_proj
    assert q.parametrizations.weight.original.grad is not None
    assert q.parametrizations.weight.original.grad.abs().sum() > 0


def test_tied_embedding_quantized_once_and_stays_tied(tiny):
    prepare_qat(tiny, "q4_0")
    emb = tiny.model.embed_tokens.parametrizations.weight.original
    assert tiny.lm_head.parametrizations.weight.original is emb
    materialize(tiny, "q4_0")
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight
    w = tiny.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(round_trip(w, "q8_0"), w)  # Q8_0 policy for embeddings, on the grid


def test_materialized_linear_weights_are_on_the_q4_0_grid(tiny):
    prepare_qat(tiny, "q4_0")
    materialize(tiny, "q4_0")
    for mod, fmt in quantized_modules(tiny, "q4_0"):
        w = mod.weight.detach().numpy()
        assert np.array_equal(round_trip(w, fmt), w)


def test_qat_training_step_changes_master_weights(tiny):
    prepare_qat(tiny, "q4_0")
    opt = torch.optim.SGD(tiny.parameters(), lr=1.0)
    before = tiny.model.layers[0].mlp.up_proj.parametrizations.weight.original.detach().clone()
    tiny(input_ids=torch.randint(0, 128, (2, 8))).logits.logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(before, tiny.model.layers[0].mlp.up_proj.parametrizations.weight.original)
