"""K-quants (Q4_K, Q5_K, Q6_K): bytes equal to what llama.cpp's own quantizer writes, the fixed
grid QAT trains on, and a QAT-trained K-quant tensor exported exactly as the torch model holds it."""

import copy

import numpy as np
import pytest
import torch

from edgekd import EdgekdError
from edgekd import kquants as kq
from edgekd.formats import FORMATS, FormatPlan

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from gguf import GGMLQuantizationType, GGUFReader  # noqa: E402

from edgekd.device import llamacpp  # noqa: E402
from edgekd.exporters.gguf import _permute_rotary, export_gguf  # noqa: E402
from edgekd.methods.evaluate import evaluate, torch_logits_fn  # noqa: E402
from edgekd.methods.qat import GRIDS_FILE, convert, grids, prepare, quantized_tensors  # noqa: E402

KINDS = {"q4_k": 14, "q5_k": 16, "q6_k": 18}  # llama_ftype of a file mostly in that type


@pytest.fixture(scope="module")
def wide_model(tiny_tokenizer):
    """A tiny Llama whose rows are 256 and 512 long (K-quants need multiples of 256), with
    weights spread over magnitudes like trained ones: scaled rows, zero runs, an outlier."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(len(tiny_tokenizer), layers=2, hidden=256, intermediate=512)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(torch.exp(torch.randn(p.shape[0], 1, generator=g) * 0.7))
                p[0, :40] = 0
                p[1, 7] = 0.5
    return model


@pytest.fixture(scope="module")
def f16_file(wide_model, tiny_tokenizer, tmp_path_factory):
    return export_gguf(wide_model, tiny_tokenizer, tmp_path_factory.mktemp("kq") / "m-f16.gguf", FormatPlan.uniform("f16"))


def _matrices(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors if len(t.shape) == 2}


@pytest.mark.parametrize("arm", ["reference", "reference, 3 threads", "llama.cpp's quantizer"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bytes_equal_llama_model_quantize(kind, arm, f16_file, tmp_path, monkeypatch):
    """llama.cpp quantizes the F16 file (every tensor in one type: ``pure``); given the same weights,
    our numpy reference writes the same bytes for every super-block of every tensor, in one call or
    with its scale searches split by rows into chunks of 97 sub-blocks over 3 threads (however few
    cores run the test), and so does the quantizer the formats use (``kq.quantize``: llama.cpp's
    ``ggml_quantize_chunk`` called on row ranges over 3 threads)."""
    from edgekd.device import llamacpp as native

    split, called = kq._in_row_chunks, []
    if arm == "reference, 3 threads":
        monkeypatch.setattr(kq, "_in_row_chunks", lambda search, *a: split(search, *a, workers=3, chunk_rows=97, min_rows=1))
    if arm == "llama.cpp's quantizer":
        assert FORMATS[kind].quantize.func is kq.quantize
        through = native.ggml_quantize
        monkeypatch.setattr(native, "ggml_quantize", lambda *a: called.append(1) or through(*a[:-1], 3))
    quantize = FORMATS[kind].quantize if arm == "llama.cpp's quantizer" else kq.REFERENCES[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = KINDS[kind], True, 1
    out = tmp_path / f"m-{kind}.gguf"
    assert llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out).encode(), params) == 0
    source = _matrices(f16_file)
    compared = 0
    for name, t in _matrices(out).items():
        assert t.tensor_type == GGMLQuantizationType[kind.upper()], name
        w = np.array(source[name].data).astype(np.float32).reshape(-1, int(source[name].shape[0]))
        ours = FORMATS[kind].pack(quantize(w))
        assert np.array_equal(ours, np.array(t.data).reshape(ours.shape)), name
        compared += 1
    assert compared == 2 * 7 + 1  # every linear layer and the (tied) embedding
    assert len(called) == (compared if arm == "llama.cpp's quantizer" else 0)  # the arm ran the quantizer it names


def test_without_llama_cpps_library_the_formats_quantize_with_the_numpy_reference(wide_model, monkeypatch):
    from edgekd.device import llamacpp as native

    w = wide_model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    with_library = {kind: kq.pack(kq.quantize(kind, w)) for kind in KINDS}
    monkeypatch.setitem(native._GGML, "lib", None)  # as where llama-cpp-python is not installed
    assert native.ggml_quantize("q4_k", w, 144 * w.shape[1] // 256, 1) is None
    for kind in KINDS:
        assert np.array_equal(kq.pack(FORMATS[kind].quantize(w)), with_library[kind])
        assert np.array_equal(kq.pack(kq.REFERENCES[kind](w)), with_library[kind])


@pytest.mark.parametrize("kind", list(KINDS))
def test_dequantize_unpack_and_torch_twin(kind, wide_model):
    w = wide_model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    blocks = FORMATS[kind].quantize(w)
    raw = kq.pack(blocks)
    assert raw.size == FORMATS[kind].tensor_bytes(w.size)
    assert np.array_equal(kq.dequantize(blocks), gguf.quants.dequantize(raw, GGMLQuantizationType[kind.upper()]).reshape(w.shape))
    assert all(np.array_equal(a, b) for a, b in zip(kq.unpack(kind, raw, w.shape)[1:], blocks[1:]) if a is not None)
    # QAT's torch round trip onto the fixed grid is the numpy one, bit for bit, for weights off the grid too
    moved = w + np.random.default_rng(0).normal(0, 1e-3, w.shape).astype(np.float32)
    step, mn = kq.torch_grids(blocks)
    ours = kq.torch_grid_round_trip(torch.from_numpy(moved), step, mn, kq.SPEC[kind][0]).numpy()
    assert np.array_equal(ours, kq.grid_values(moved, blocks))
    # and what is on the grid stays there: the export's codes are the trained ones
    on_grid = kq.grid_values(moved, blocks)
    assert np.array_equal(kq.grid_values(on_grid, blocks), on_grid)
    assert np.array_equal(FORMATS[kind].blocks_for(on_grid, blocks).codes, FORMATS[kind].blocks_for(moved, blocks).codes)


def test_qat_trained_kquant_tensors_ship_exactly(wide_model, tiny_tokenizer, tmp_path):
    """Train a few steps on the fixed grids, convert, export: every K-quant tensor in the GGUF
    dequantizes to exactly the torch model's weights, and llama.cpp reproduces its logits."""
    model = copy.deepcopy(wide_model)
    plan = FormatPlan.uniform("q4_0", {"ffn_down": "q4_k", "attn_v": "q6_k", "attn_k": "q5_k", "blk.1.ffn_up": "q5_k"})
    prepare(model, plan)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "original" in n], lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    convert(model, plan)
    fixed = grids(model)
    assert sorted(k.split(".")[-3] + "." + k.split(".")[-2] for k in fixed) == sorted(
        ["mlp.down_proj"] * 2 + ["self_attn.v_proj"] * 2 + ["self_attn.k_proj"] * 2 + ["mlp.up_proj"])
    path = export_gguf(model, tiny_tokenizer, tmp_path / "mixed-k.gguf", plan)
    tensors = _matrices(path)
    for layer in range(2):
        for gguf_name, mod, kind in ((f"blk.{layer}.ffn_down.weight", model.model.layers[layer].mlp.down_proj, "q4_k"),
                                     (f"blk.{layer}.attn_v.weight", model.model.layers[layer].self_attn.v_proj, "q6_k")):
            t = tensors[gguf_name]
            assert t.tensor_type == GGMLQuantizationType[kind.upper()]
            w = mod.weight.detach().numpy()
            assert np.array_equal(kq.dequantize(kq.unpack(kind, np.array(t.data), w.shape)), w), gguf_name
        # attn_k's rows are permuted into llama.cpp's rotary order, its grid with them
        k = model.model.layers[layer].self_attn.k_proj.weight.detach().numpy()
        stored = kq.dequantize(kq.unpack("q5_k", np.array(tensors[f"blk.{layer}.attn_k.weight"].data), k.shape))
        assert np.array_equal(stored, _permute_rotary(k, model.config.num_key_value_heads))
    assert tensors["blk.1.ffn_up.weight"].tensor_type == GGMLQuantizationType.Q5_K
    b = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(3, 24)).astype(np.int32)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(model))
    assert m.kl_to_teacher < 2e-2 and m.top1_agreement > 0.9
    kq.save_grids(tmp_path / GRIDS_FILE, fixed)
    loaded = kq.load_grids(tmp_path / GRIDS_FILE)
    assert loaded.keys() == fixed.keys() and all(np.array_equal(loaded[k].codes, fixed[k].codes) for k in fixed)


def test_a_kquant_on_rows_it_cannot_hold_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # rows 64 and 128 long
    with pytest.raises(EdgekdError, match="blk.0.ffn_down cannot be stored as q4_k: its rows are 128 weights long"):
        quantized_tensors(model, FormatPlan.uniform("q4_0", {"ffn_down": "q4_k"}))


def test_onnx_export_of_a_kquant_plan_holds_the_grid_weights(wide_model, tmp_path):
    """ONNX has no K-quant operator: the file carries the grid's exact weights in fp32, and
    onnxruntime computes what the torch model does."""
    pytest.importorskip("onnxruntime")
    from edgekd.device.onnxrt import Decoder
    from edgekd.exporters.onnx import export_onnx

    model = copy.deepcopy(wide_model)
    plan = FormatPlan.uniform("q4_0", {"ffn_down": "q4_k", "attn_v": "q6_k"})
    convert(model, plan)
    path = export_onnx(model, tmp_path / "k.onnx", plan)
    b = np.random.default_rng(1).integers(3, model.config.vocab_size, size=(2, 16)).astype(np.int32)
    m = evaluate(Decoder(path, 1).logits, b, torch_logits_fn(model))
    assert m.kl_to_teacher < 1e-5 and m.top1_agreement == 1.0


@pytest.mark.parametrize("kind", ["q4_k", "q5_k"])
def test_a_tied_kquant_embedding_is_quantized_once_and_its_grid_matches_the_weights(wide_model, kind):
    """Without QAT, convert() meets the tied embedding twice (embedding and head); quantizing the
    already-rounded weights again need not reproduce them, so the grid must come from one pass."""
    model = copy.deepcopy(wide_model)
    convert(model, FormatPlan.uniform("q4_0", {"embedding": kind}))
    fixed = grids(model)
    emb = model.model.embed_tokens.weight.detach().numpy()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert fixed["model.embed_tokens.weight"] is fixed["lm_head.weight"]
    assert np.array_equal(kq.dequantize(fixed["model.embed_tokens.weight"]), emb)
