"""ONNX export of tiny Llama models: onnxruntime reproduces torch, greedy decoding with the KV cache matches."""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from edgekd.device.onnxrt import Decoder  # noqa: E402
from edgekd.exporters.onnx import export_onnx  # noqa: E402
from edgekd.formats import FormatPlan  # noqa: E402
from edgekd.methods.evaluate import evaluate, torch_logits_fn  # noqa: E402
from edgekd.methods.qat import convert  # noqa: E402

Q4 = FormatPlan.uniform("q4_0")


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_llama

    return make_tiny_llama(320, layers=3, seed=3)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {"f32": export_onnx(tiny, d / "model-f32.onnx"), "q4_0": export_onnx(tiny, d / "model-q4_0.onnx", Q4), "model": tiny}


def torch_greedy(model, prompt, n):
    ids = torch.from_numpy(prompt[None].astype(np.int64))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_files_and_interface(exported):
    f32, q4 = exported["f32"], exported["q4_0"]
    assert (f32.parent / "model-f32.onnx.data").exists()  # external data for fp32 weights
    dec = Decoder(q4)
    names = [i.name for i in dec.session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.2.value" in names and "present.0.key" in dec.output_names
    import onnx

    ops = {n.op_type for n in onnx.load(str(q4)).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Gather" not in ops
    # the facts edgekd bench's projection reads through onnxruntime alone
    facts = dec.model_facts(1e6)
    assert facts["params"] == sum(p.numel() for p in exported["model"].parameters())
    assert (facts["layers"], facts["heads"], facts["kv_heads"], facts["head_dim"]) == (3, 4, 2, 16)


@pytest.mark.parametrize("fmt", ["f32", "q4_0"])
def test_onnxruntime_matches_torch_and_greedy_tokens_agree(tiny, exported, fmt):
    ref = convert(copy.deepcopy(tiny), Q4) if fmt == "q4_0" else tiny
    blocks = np.random.default_rng(1).integers(3, 320, size=(3, 20)).astype(np.int32)
    dec = Decoder(exported[fmt])
    m = evaluate(dec.logits, blocks, torch_logits_fn(ref))
    assert m.kl_to_teacher < 1e-6 and m.top1_agreement == 1.0
    prompt = blocks[0, :7]
    assert dec.greedy(prompt, 12) == torch_greedy(ref, prompt, 12)


def test_int4_onnx_file_is_small(exported):
    f32_bytes = sum(p.stat().st_size for p in exported["f32"].parent.glob("model-f32.onnx*"))
    assert exported["q4_0"].stat().st_size < 0.4 * f32_bytes


def test_pruned_student_exports(tiny, tmp_path):
    from edgekd.methods.prune import apply_mlp_channels, make_student

    student = make_student(tiny, [0, 2])
    apply_mlp_channels(student, [list(range(64))] * 2)
    path = export_onnx(student, tmp_path / "s.onnx", Q4)
    blocks = np.random.default_rng(2).integers(3, 320, size=(2, 12)).astype(np.int32)
    m = evaluate(Decoder(path).logits, blocks, torch_logits_fn(convert(copy.deepcopy(student), Q4)))
    assert m.kl_to_teacher < 1e-6


def test_formats_onnx_cannot_hold_stay_exact_fp32_tensors(tiny, tmp_path):
    """A mixed plan: int4 MatMulNBits where the format is Q4_0, fp32 initializers holding the exact
    weights where ONNX has no kernel for the format (5-bit, or a per-block minimum)."""
    import onnx

    plan = FormatPlan.uniform("q4_0", {"ffn_down": "q5_0", "attn_q": "q4_1", "embedding": "q4_0"})
    path = export_onnx(tiny, tmp_path / "mixed.onnx", plan)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == 3 * 5 and "GatherBlockQuantized" not in ops  # 5 of 7 linears per block
    blocks = np.random.default_rng(4).integers(3, 320, size=(2, 12)).astype(np.int32)
    m = evaluate(Decoder(path).logits, blocks, torch_logits_fn(convert(copy.deepcopy(tiny), plan)))
    assert m.kl_to_teacher < 1e-6
