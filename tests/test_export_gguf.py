"""GGUF export of tiny Llama models: llama.cpp loads the file and reproduces the torch logits."""

import copy

import numpy as np
import pytest

from edgekd.formats import FormatPlan
from edgekd.methods.evaluate import evaluate, torch_logits_fn

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from edgekd.device import llamacpp  # noqa: E402
from edgekd.exporters.gguf import export_gguf  # noqa: E402
from edgekd.methods.qat import convert  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def shipped(model, fmt):
    return convert(copy.deepcopy(model), FormatPlan.uniform(fmt))


def blocks(vocab, n=3, length=24, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=(n, length)).astype(np.int32)


@pytest.mark.parametrize("fmt, max_kl", [("f16", 1e-4), ("q8_0", 2e-3), ("q4_0", 2e-2)])
def test_llamacpp_reproduces_the_shipped_torch_model(model_and_tok, tmp_path, fmt, max_kl):
    model, tok = model_and_tok
    path = export_gguf(model, tok, tmp_path / f"m-{fmt}.gguf", FormatPlan.uniform(fmt), source_name="tiny")
    ref = shipped(model, fmt)
    b = blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(ref))
    # llama.cpp quantizes activations to 8 bits inside Q4/Q8 matmuls: a small floor, not zero
    assert m.kl_to_teacher < max_kl, m
    assert m.top1_agreement > 0.9


def test_metadata_and_tensor_types(model_and_tok, tmp_path):
    from gguf import GGUFReader

    model, tok = model_and_tok
    path = export_gguf(model, tok, tmp_path / "m.gguf", FormatPlan.uniform("q4_0"), source_name="tiny-src")
    r = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied
    assert r.fields["edgekd.source_model"].contents() == "tiny-src"
    assert r.fields["edgekd.version"].contents()
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_pruned_model_exports(model_and_tok, tmp_path):
    from edgekd.methods.prune import apply_mlp_channels, make_student

    model, tok = model_and_tok
    student = make_student(model, [0, 3])
    apply_mlp_channels(student, [list(range(0, 128, 2))] * 2)  # intermediate 64
    path = export_gguf(student, tok, tmp_path / "s.gguf", FormatPlan.uniform("q8_0"))
    b = blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(shipped(student, "q8_0")))
    assert m.kl_to_teacher < 2e-3 and llamacpp.load(path, 64, 1).metadata["llama.block_count"] == "2"


def test_mixed_format_plan_writes_mixed_tensor_types_that_llama_cpp_reproduces(model_and_tok, tmp_path):
    """One file, many formats (as llama.cpp's own Q4_K_M is): each tensor in the type its plan
    names, loaded by llama.cpp and computing the torch model's weights at llama.cpp's floor."""
    from gguf import GGUFReader

    model, tok = model_and_tok
    plan = FormatPlan.uniform("q4_0", {"embedding": "q4_0", "ffn_down": "q5_0", "attn_q": "q4_1", "blk.1.attn_v": "q8_0",
                                       "ffn_up": "q5_1"})
    path = export_gguf(model, tok, tmp_path / "mixed.gguf", plan)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.ffn_down.weight"] == "Q5_0"
    assert types["blk.2.attn_q.weight"] == "Q4_1" and types["blk.1.attn_v.weight"] == "Q8_0" and types["blk.2.attn_v.weight"] == "Q4_0"
    assert types["blk.3.ffn_up.weight"] == "Q5_1" and types["blk.3.ffn_gate.weight"] == "Q4_0"
    ref = convert(copy.deepcopy(model), plan)
    b = blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(ref))
    assert m.kl_to_teacher < 2e-2 and m.top1_agreement > 0.9
