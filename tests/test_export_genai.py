"""onnxruntime-genai export of tiny Llama models: the builder's fused graph with the plan's exact
codes, greedy tokens against torch, the bench through onnxruntime-genai, the plain fallback."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime_genai")

from edgekd.device.onnxgenai import GenaiModel, folder_of  # noqa: E402
from edgekd.exporters.onnx import _packed_codes  # noqa: E402
from edgekd.exporters.onnx_genai import export_genai  # noqa: E402
from edgekd.exporters.ship import GENAI, planned_export, torch_greedy, write_checked  # noqa: E402
from edgekd.formats import FormatPlan  # noqa: E402
from edgekd.methods.qat import convert  # noqa: E402

Q4 = FormatPlan.uniform("q4_0")
CONTEXT = 128


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    from conftest import make_tiny_llama

    # the shipped student: weights round-tripped to the plan's grids (edgekd.methods.qat.convert)
    return convert(make_tiny_llama(len(tiny_tokenizer), layers=3, seed=3), Q4)


@pytest.fixture(scope="module")
def folders(tiny, tiny_tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("genai")
    return {level: export_genai(tiny, tiny_tokenizer, d / f"acc{level}" / "model-q4_0.onnx", Q4, CONTEXT, accuracy_level=level)
            for level in (0, 4)}


def _prompts(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(3, vocab, size=(3, 12))


def test_folder_holds_what_an_app_loads_and_the_fused_graph(folders, tiny):
    import onnx

    path = folders[4]
    names = {f.name for f in path.parent.iterdir()}
    assert {"model-q4_0.onnx", "model-q4_0.onnx.data", "genai_config.json", "tokenizer.json", "edgekd.json"} <= names
    assert not any(n.name.startswith(".tmp") for n in path.parent.parent.iterdir())
    cfg = json.loads((path.parent / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"] == "model-q4_0.onnx" and cfg["search"]["max_length"] == CONTEXT
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 3 and "SkipSimplifiedLayerNormalization" in ops
    assert "MatMul" not in ops and "Gather" not in [n.op_type for n in graph.node if "embed" in n.name]
    # every linear layer and the head: packed Q/K/V and gate/up (2 per block + o and down) + the head
    assert ops.count("MatMulNBits") == 3 * 4 + 1 and ops.count("GatherBlockQuantized") == 1
    assert all(a.i == 4 for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level")


def test_codes_are_the_plans_own_never_requantized(folders, tiny):
    """The packed Q/K/V product holds exactly the Q4_0 codes and scales of q, k and v, in order;
    the head reads the tied table's Q8_0 codes."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(folders[4]))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "layers.1/attn/qkv" in n.name)
    attn = tiny.model.layers[1].self_attn
    parts = [_packed_codes(m.weight.detach().float().numpy(), Q4.format_of("attn_q")) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    np.testing.assert_array_equal(inits[node.input[1]], np.concatenate([c for c, _ in parts]))
    np.testing.assert_array_equal(inits[node.input[2]], np.concatenate([s for _, s in parts]))
    head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1] == "embedding.qweight")
    codes, scales = _packed_codes(tiny.model.embed_tokens.weight.detach().float().numpy(), Q4.format_of("embedding"))
    np.testing.assert_array_equal(inits["embedding.qweight"], codes)
    assert dict((a.name, a.i) for a in head.attribute)["bits"] == 8


def test_fp32_activations_reproduce_torch_and_its_greedy_tokens(folders, tiny, tiny_tokenizer):
    """With fp32 activations (accuracy_level 0) the file is the torch model up to float rounding:
    logits of every position through the KV cache, and onnxruntime-genai's own greedy search."""
    model = GenaiModel(folders[0].parent, threads=1)
    prompts = _prompts(len(tiny_tokenizer))
    with torch.no_grad():
        ref = tiny(torch.from_numpy(prompts)).logits.numpy()
    assert np.abs(model.logits(prompts) - ref).max() < 1e-4
    for p in prompts:
        assert model.greedy(p, 10) == torch_greedy(tiny, tiny_tokenizer, p, 10)


def test_shipped_setting_passes_parity_with_greedy_checked_at_decided_choices(tiny, tiny_tokenizer, tmp_path):
    """int8 activations (accuracy_level 4, what ships): within the llama.cpp-level limits, every
    decided greedy choice the same, and the report says how many sequences were identical."""
    blocks = np.random.default_rng(2).integers(3, len(tiny_tokenizer), size=(4, 48))
    export = planned_export("onnx", Q4, GENAI)
    assert export.file_name == "model-q4_0-genai/model-q4_0.onnx"
    path, result = write_checked(export, tiny, tiny_tokenizer, Q4, tmp_path, blocks, threads=1, context_length=CONTEXT)
    assert result.runtime == "onnxruntime-genai" and result.passed and result.greedy_match
    assert result.kl < 0.01 and "decided choices" in result.greedy_detail and folder_of(path) == path.parent


def test_bench_runs_the_folder_through_onnxruntime_genai(folders):
    import edgekd

    r = edgekd.bench(folders[4].parent, "phone", threads=1, repeats=1, prompt_tokens=16, gen_tokens=8, isolated=False,
                     overrides=["deployment.context_length=64"])
    assert r.runtime.startswith("onnxruntime-genai") and r.tg_tokens_per_s.median > 0
    assert r.kv_cache_mb == pytest.approx(2 * 3 * 64 * 2 * 16 * 4 / 1e6)  # K+V, 3 blocks, 2 KV heads of 16, fp32
    assert r.model_facts["params"] > 0 and r.model.endswith("model-q4_0.onnx")


def test_plain_onnxruntime_runs_the_same_file(folders, tiny, tiny_tokenizer):
    """Without onnxruntime-genai the folder's decoder still runs in onnxruntime (positions come
    from the mask inside GroupQueryAttention)."""
    from edgekd.device.onnxrt import Decoder

    prompts = _prompts(len(tiny_tokenizer))
    with torch.no_grad():
        ref = tiny(torch.from_numpy(prompts)).logits.numpy()
    dec = Decoder(folders[0], threads=1)
    assert np.abs(dec.logits(prompts)[:, -1] - ref[:, -1]).max() < 1e-4


def test_unsupported_model_falls_back_to_the_plain_decoder(tiny, tiny_tokenizer, tmp_path, monkeypatch):
    import edgekd.exporters.onnx_genai as genai

    monkeypatch.setattr(genai, "unsupported_reason", lambda model: "onnxruntime-genai's model builder does not build X")
    blocks = np.random.default_rng(2).integers(3, len(tiny_tokenizer), size=(2, 40))
    path, result = write_checked(planned_export("onnx", Q4, GENAI), tiny, tiny_tokenizer, Q4, tmp_path, blocks, threads=1)
    assert result.runtime == "onnxruntime" and result.passed and "does not build X" in result.note
    assert path.is_file() and folder_of(path) is None  # no genai_config.json: edgekd bench uses onnxruntime


def test_planner_predicts_the_folder_size(folders, tiny):
    """The size the planner checks max_model_mb against is the file edgekd bench measures."""
    from edgekd.device.costmodel import ArchShape, model_bytes
    from edgekd.device.measure import model_file_mb

    predicted = model_bytes(ArchShape.from_config(tiny.config), Q4, "onnxruntime-genai") / 1e6
    assert predicted == pytest.approx(model_file_mb(folders[4]), rel=0.1)


def test_mixed_plan_keeps_every_part_in_its_own_int_form(tiny_tokenizer, tmp_path):
    """attn_v and ffn_up at Q8_0 beside Q4_0: Q/K/V and gate/up stay separate products (a packed one
    would have to hold one format), 4- and 8-bit MatMulNBits, exact with fp32 activations."""
    import onnx
    from conftest import make_tiny_llama

    plan = FormatPlan.uniform("q4_0", {"attn_v": "q8_0", "ffn_up": "q8_0"})
    model = convert(make_tiny_llama(len(tiny_tokenizer), layers=2, seed=4), plan)
    path = export_genai(model, tiny_tokenizer, tmp_path / "f" / "model.onnx", plan, CONTEXT, accuracy_level=0)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * 7 + 1 and {dict((a.name, a.i) for a in n.attribute)["bits"] for n in nodes} == {4, 8}
    ids = _prompts(len(tiny_tokenizer))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(GenaiModel(path.parent, threads=1).logits(ids) - ref).max() < 1e-4


def _mistral(vocab):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            max_position_embeddings=256, tie_word_embeddings=True)).eval()


def _qwen2(vocab):  # q/k/v biases
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True)).eval()


def _family(name, vocab):
    import test_families as tf

    return {"qwen3": lambda: tf.tiny_qwen3(vocab), "llama3-rope": lambda: tf.tiny_llama_rope(vocab, tf.LLAMA3_ROPE),
            "mistral": lambda: _mistral(vocab), "qwen2": lambda: _qwen2(vocab), "smollm3": lambda: tf.tiny_smollm3(vocab),
            "gemma3": lambda: tf.tiny_gemma3(vocab)}[name]()


@pytest.mark.parametrize("name", ["qwen3", "llama3-rope", "mistral", "qwen2"])
def test_families_the_builder_takes_reproduce_torch(name, tiny_tokenizer, tmp_path):
    model = convert(_family(name, len(tiny_tokenizer)), Q4)
    path = export_genai(model, tiny_tokenizer, tmp_path / "f" / "model.onnx", Q4, CONTEXT, accuracy_level=0)
    ids = _prompts(len(tiny_tokenizer))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    runtime = GenaiModel(path.parent, threads=1)
    assert np.abs(runtime.logits(ids) - ref).max() < 1e-4
    assert runtime.greedy(ids[0], 8) == torch_greedy(model, tiny_tokenizer, ids[0], 8)


@pytest.mark.parametrize("name", ["smollm3", "gemma3"])
def test_families_the_builder_fails_on_ship_the_plain_decoder_with_the_reason(name, tiny_tokenizer, tmp_path):
    model = convert(_family(name, len(tiny_tokenizer)), Q4)
    blocks = np.random.default_rng(2).integers(3, len(tiny_tokenizer), size=(2, 40))
    path, result = write_checked(planned_export("onnx", Q4, GENAI), model, tiny_tokenizer, Q4, tmp_path, blocks, threads=1)
    assert result.runtime == "onnxruntime" and result.passed and "model builder" in result.note


def test_untied_head_and_an_embedding_without_int_form(tiny_tokenizer, tmp_path):
    """An untied model: the head in its own Q8_0 codes, an f16 embedding table stored as the fp32
    values f16 ships (GatherBlockQuantized holds only block codes)."""
    import onnx
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    plan = FormatPlan.uniform("q4_0", {"embedding": "f16", "head": "q8_0"})
    model = convert(LlamaForCausalLM(cfg).eval(), plan)
    path = export_genai(model, tiny_tokenizer, tmp_path / "f" / "model.onnx", plan, CONTEXT, accuracy_level=0)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "GatherBlockQuantized" not in ops and ops.count("MatMulNBits") == 2 * 4 + 1
    ids = _prompts(len(tiny_tokenizer))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(GenaiModel(path.parent, threads=1).logits(ids) - ref).max() < 1e-4


def test_bench_without_onnxruntime_genai_runs_the_decoder_in_onnxruntime(folders, monkeypatch):
    import edgekd
    import edgekd.device.onnxgenai as og_side

    monkeypatch.setattr(og_side, "available", lambda: False)
    r = edgekd.bench(folders[4].parent, "phone", threads=1, repeats=1, prompt_tokens=16, gen_tokens=8, isolated=False,
                     overrides=["deployment.context_length=64"], projection=False)
    assert r.runtime.startswith("onnxruntime ") and "genai" not in r.runtime and r.tg_tokens_per_s.median > 0
