"""Model families beyond Llama through the GGUF exporter: a tiny random model of each, built from
its transformers config, written as GGUF and run by llama.cpp, must compute the torch logits."""

import copy

import numpy as np
import pytest
import torch

from edgekd import EdgekdError
from edgekd.formats import FormatPlan
from edgekd.methods.evaluate import evaluate, torch_logits_fn

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from edgekd.device import llamacpp  # noqa: E402
from edgekd.exporters.gguf import export_gguf  # noqa: E402
from edgekd.families import family_of  # noqa: E402
from edgekd.methods.qat import convert  # noqa: E402


def _randomize_norms(model, seed=0):
    """Norm weights start at 1: random ones catch a norm written to the wrong tensor or permuted."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def tiny_qwen3(vocab, tied=True, **kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32,  # Qwen3's head_dim is its own (here 2x hidden / heads)
                      max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2, **kw)
    return _randomize_norms(Qwen3ForCausalLM(cfg).eval())


def _blocks(vocab, n=3, length=24):
    return np.random.default_rng(0).integers(3, vocab, size=(n, length)).astype(np.int32)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("fmt, max_kl", [("f16", 1e-4), ("q8_0", 3e-3)])
def test_qwen3_gguf_reproduces_torch(tiny_tokenizer, tmp_path, tied, fmt, max_kl):
    from gguf import GGUFReader

    model = tiny_qwen3(len(tiny_tokenizer), tied=tied)
    family = family_of(model)
    assert family.gguf_arch == "qwen3" and family.rotary_rows == ()
    path = export_gguf(model, tiny_tokenizer, tmp_path / f"q3-{fmt}.gguf", FormatPlan.uniform(fmt))
    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.2.attn_k_norm.weight"} <= names and ("output.weight" in names) == (not tied)
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"
    ref = convert(copy.deepcopy(model), FormatPlan.uniform(fmt))
    b = _blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(ref))
    assert m.kl_to_teacher < max_kl and m.top1_agreement > 0.9, m


def test_qwen3_sliding_window_is_refused(tiny_tokenizer, tmp_path):
    model = tiny_qwen3(len(tiny_tokenizer), use_sliding_window=True, sliding_window=16)
    with pytest.raises(EdgekdError, match="sliding-window"):
        export_gguf(model, tiny_tokenizer, tmp_path / "swa.gguf", FormatPlan.uniform("f16"))
    assert not (tmp_path / "swa.gguf").exists()
