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


def _randomize_norms(model, seed=0, center=1.0):
    """Norm weights start at 1 (Gemma's at 0, its factor being 1 + weight): random ones catch a
    norm written to the wrong tensor, permuted or without its offset."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(center + 0.3 * torch.randn(p.shape, generator=g))
    return model


def tiny_qwen3(vocab, tied=True, hidden=64, **kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=hidden // 2,  # Qwen3's head_dim is its own (here 2x hidden / heads)
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


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def tiny_llama_rope(vocab, rope):
    """A tiny Llama with the given rope parameters and sharp attention, so that where a position's
    rotation is wrong the logits say so."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, rope_parameters=rope)
    model = _randomize_norms(LlamaForCausalLM(cfg).eval())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def test_llama3_rope_scaling_is_written_as_rope_freqs(tiny_tokenizer, tmp_path):
    """Llama 3.x's rope scaling changes the low frequencies; the file carries llama.cpp's
    rope_freqs divisors, and llama.cpp then computes what torch does (a model whose frequencies
    differ this much from the default rope's would not)."""
    from gguf import GGUFReader

    model, plain = tiny_llama_rope(len(tiny_tokenizer), LLAMA3_ROPE), tiny_llama_rope(len(tiny_tokenizer), {"rope_type": "default", "rope_theta": 100.0})
    path = export_gguf(model, tiny_tokenizer, tmp_path / "l3.gguf", FormatPlan.uniform("f16"))
    freqs = next(t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32" and int(freqs.shape[0]) == 16 // 2
    values = np.array(freqs.data)
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(8.0)  # high frequencies kept, low divided by factor
    b = _blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(model))
    assert m.kl_to_teacher < 1e-4 and m.top1_agreement > 0.95, m
    assert evaluate(torch_logits_fn(plain), b, torch_logits_fn(model)).kl_to_teacher > 10 * 1e-4  # the test can tell


def test_rope_scaling_a_family_cannot_carry_is_refused(tiny_tokenizer, tmp_path):
    model = tiny_qwen3(len(tiny_tokenizer), rope_parameters={"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 32})
    with pytest.raises(EdgekdError, match="does not write rope scaling 'llama3'"):
        export_gguf(model, tiny_tokenizer, tmp_path / "q3-l3.gguf", FormatPlan.uniform("f16"))


def tiny_smollm3(vocab, layers=8):
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    cfg = SmolLM3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                        eos_token_id=2, pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    model = _randomize_norms(SmolLM3ForCausalLM(cfg).eval())
    with torch.no_grad():  # sharp attention: a block roped by mistake changes the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def test_smollm3_nope_blocks_reach_llama_cpp(tiny_tokenizer, tmp_path):
    model = tiny_smollm3(len(tiny_tokenizer))
    assert model.config.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    path = export_gguf(model, tiny_tokenizer, tmp_path / "s3.gguf", FormatPlan.uniform("f16"))
    b = _blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(model))
    assert m.kl_to_teacher < 1e-4 and m.top1_agreement > 0.95, m
    roped = copy.deepcopy(model)
    for layer in roped.model.layers:
        layer.self_attn.use_rope = True
    assert evaluate(torch_logits_fn(roped), b, torch_logits_fn(model)).kl_to_teacher > 1e-3  # the test can tell


def test_a_depth_pruned_smollm3_keeps_its_blocks_nope_and_gguf_refuses_a_pattern_llama_cpp_cannot_hold(tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgekd.methods.prune import make_student

    model = tiny_smollm3(len(tiny_tokenizer))
    student = make_student(model, [0, 1, 3, 4, 5, 6, 7])  # block 3 (NoPE) moves to index 2
    assert student.config.no_rope_layers == [1, 1, 0, 1, 1, 1, 0]
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    b = _blocks(model.config.vocab_size)
    assert evaluate(torch_logits_fn(reloaded), b, torch_logits_fn(student)).kl_to_teacher < 1e-10
    with pytest.raises(EdgekdError, match=r"every 4th block; this model's blocks without it are \[2, 6\]"):
        export_gguf(student, tiny_tokenizer, tmp_path / "pruned.gguf", FormatPlan.uniform("f16"))
    ok = make_student(model, [0, 1, 2, 3])  # a prefix keeps llama.cpp's pattern
    path = export_gguf(ok, tiny_tokenizer, tmp_path / "prefix.gguf", FormatPlan.uniform("f16"))
    assert evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(ok)).kl_to_teacher < 1e-4


def test_a_qwen3_teacher_through_the_whole_chain(tmp_path, tiny_tokenizer, small_corpus_file, tiny_profile_overrides):
    """prune -> distill (logit, hidden, attention) -> QAT -> GGUF and int4 ONNX, each checked in its runtime."""
    import edgekd

    teacher_dir = tmp_path / "qwen3-teacher"
    model = tiny_qwen3(len(tiny_tokenizer))
    model.save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    report = edgekd.compress(teacher=teacher_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path, run_name="q3",
                             quiet=True, overrides=[*tiny_profile_overrides, "compression.prune.keep_layers=2",
                                                    "deployment.formats=[gguf, onnx]"])
    parity = report.stage("export").metrics["parity"]
    assert [p["runtime"] for p in parity] == ["llama.cpp", "onnxruntime-genai"] and all(p["passed"] for p in parity)
    assert parity[1]["greedy_match"] is True
    assert report.stage("prune").metrics["kept_layers"] == 2 and report.teacher["architecture"] == "qwen3"


def test_a_smollm3_student_llama_cpp_cannot_hold_is_refused_before_training(tmp_path, tiny_tokenizer, small_corpus_file,
                                                                             tiny_profile_overrides):
    import edgekd

    teacher_dir = tmp_path / "smollm3-teacher"
    tiny_smollm3(len(tiny_tokenizer)).save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    with pytest.raises(EdgekdError, match="the pruned student cannot be written as GGUF") as exc:
        edgekd.compress(teacher=teacher_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path, run_name="s3",
                        quiet=True, overrides=[*tiny_profile_overrides, "compression.prune.keep_layers=5"])
    assert "deployment.formats: [onnx]" in exc.value.render()
    assert not (tmp_path / "s3" / "distill").exists() and not (tmp_path / "s3" / "prune" / "plan.json").exists()


@pytest.fixture(scope="module")
def phi3_tokenizer(tiny_tokenizer):
    """llama.cpp's phi3 vocabulary needs <|endoftext|> (Phi-3's and Phi-4-mini's tokenizers have it)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    return tok


def tiny_phi3(vocab, rope=None, layers=3, hidden=64):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=4096, original_max_position_embeddings=512, sliding_window=None,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                     rope_parameters=rope or {"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5})
    model = _randomize_norms(Phi3ForCausalLM(cfg).eval())
    with torch.no_grad():  # sharp attention: a wrongly rotated dimension changes the logits
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[: hidden + hidden // 2].mul_(8)  # q and k rows
    return model


@pytest.mark.parametrize("longrope", [False, True])
def test_phi3_fused_projections_and_partial_rotary_reach_llama_cpp(phi3_tokenizer, tmp_path, longrope):
    tiny_tokenizer = phi3_tokenizer
    from gguf import GGUFReader

    rope = None
    # short factors apply within the original context: transformers decides by the sequence length (24
    # tokens here), llama.cpp by its context size (64, padded to 256); both under the original 512
    if longrope:
        rope = {"rope_type": "longrope", "rope_theta": 100.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 512,
                "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}
    model = tiny_phi3(len(tiny_tokenizer), rope)
    path = export_gguf(model, tiny_tokenizer, tmp_path / "phi3.gguf", FormatPlan.uniform("f16"))
    reader = GGUFReader(str(path))
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == [64, 64 + 2 * 32] and shapes["blk.0.ffn_up.weight"] == [64, 2 * 128]
    assert "blk.0.ffn_gate.weight" not in shapes and reader.fields["phi3.rope.dimension_count"].parts[-1][0] == 8
    assert ("rope_factors_short.weight" in shapes) == longrope
    b = _blocks(model.config.vocab_size)
    m = evaluate(llamacpp.logits_fn(path, 64, threads=1), b, torch_logits_fn(model))
    assert m.kl_to_teacher < 1e-4 and m.top1_agreement > 0.95, m
    if longrope:  # the factors matter here: without them the rotation differs
        plain = tiny_phi3(len(tiny_tokenizer))
        assert evaluate(torch_logits_fn(plain), b, torch_logits_fn(model)).kl_to_teacher > 1e-3


def test_phi3_width_pruning_slices_both_halves_of_the_fused_mlp(phi3_tokenizer, tmp_path):
    tiny_tokenizer = phi3_tokenizer
    from edgekd.methods.prune import apply_mlp_channels

    model = tiny_phi3(len(tiny_tokenizer))
    keep = list(range(0, 128, 2))
    pruned = copy.deepcopy(model)
    assert apply_mlp_channels(pruned, [keep] * 3) == 64
    mlp, ref = pruned.model.layers[1].mlp, model.model.layers[1].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():  # the pruned MLP is the full one with the other channels' activations zeroed
        gate, up = ref.gate_up_proj(x).chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        mask = torch.zeros(128)
        mask[keep] = 1
        assert torch.allclose(mlp(x), ref.down_proj(act * mask), atol=1e-6)
    path = export_gguf(pruned, tiny_tokenizer, tmp_path / "pruned.gguf", FormatPlan.uniform("f16"))
    b = _blocks(model.config.vocab_size)
    assert evaluate(llamacpp.logits_fn(path, 64, threads=1), b, torch_logits_fn(pruned)).kl_to_teacher < 1e-4


def test_phi3_without_the_token_llama_cpp_needs_is_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(EdgekdError, match=r"no <\|endoftext\|> token"):
        export_gguf(tiny_phi3(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "p.gguf", FormatPlan.uniform("f16"))
    assert not (tmp_path / "p.gguf").exists()


def test_a_phi3_teacher_through_the_whole_chain(tmp_path, phi3_tokenizer, small_corpus_file, tiny_profile_overrides):
    """Fused projections through width pruning, distillation, QAT, the planner's cost model, GGUF and ONNX."""
    import edgekd
    from edgekd.device.costmodel import ArchShape

    teacher_dir = tmp_path / "phi3-teacher"
    model = tiny_phi3(len(phi3_tokenizer), layers=4)
    assert set(ArchShape.from_config(model.config).role_params()) == set(family_of(model).roles())
    model.save_pretrained(teacher_dir)
    phi3_tokenizer.save_pretrained(teacher_dir)
    overrides = [o for o in tiny_profile_overrides if "mlp_keep_fraction" not in o]
    report = edgekd.compress(teacher=teacher_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path, run_name="phi3",
                             quiet=True, overrides=[*overrides, "compression.prune.mlp_keep_fraction=0.5",
                                                    "deployment.formats=[gguf, onnx]"])
    parity = report.stage("export").metrics["parity"]
    assert [p["runtime"] for p in parity] == ["llama.cpp", "onnxruntime"] and all(p["passed"] for p in parity)
    assert "model builder" in parity[1]["note"]  # the plain decoder, with onnxruntime-genai's reason
    assert parity[1]["greedy_match"] is True and report.stage("prune").metrics["student"]["intermediate_size"] == 64


def test_a_sentencepiece_style_bpe_tokenizer_is_refused_not_written_as_gpt2(tmp_path):
    """Gemma's and Phi-3-mini's tokenizers are BPE in tokenizer.json but not byte-level: llama.cpp's
    gpt2 vocabulary would tokenize them wrongly, so the writer refuses (copy the GGUF's instead)."""
    from tiny_models import corpus_text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([corpus_text(5)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                                  show_progress=False))
    spm_like = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = tiny_qwen3(len(spm_like))
    with pytest.raises(EdgekdError, match="tokenizer.model is not beside it"):
        export_gguf(model, spm_like, tmp_path / "spm.gguf", FormatPlan.uniform("f16"))
    assert not (tmp_path / "spm.gguf").exists()


# ------------------------------------------------------------------ Gemma 3

GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}


def tiny_gemma3(vocab, layers=4, hidden=64, layer_types=None, **kw):
    """Gemma 3's features switched on: a 6-token window (the tests' sequences are longer), local and
    global blocks interleaved with two rope bases, linear rope scaling on the global ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    args = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=hidden // 2, query_pre_attn_scalar=hidden // 2, sliding_window=6,
                layer_types=layer_types or ["sliding_attention", "full_attention"] * (layers // 2),
                rope_parameters=copy.deepcopy(GEMMA3_ROPE), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2)
    return _randomize_norms(Gemma3ForCausalLM(Gemma3TextConfig(**{**args, **kw})).eval(), center=0.0)


@pytest.mark.parametrize("fmt, max_kl", [("f16", 1e-4), ("q8_0", 3e-3)])
def test_gemma3_gguf_reproduces_torch(tiny_tokenizer, tmp_path, fmt, max_kl):
    from gguf import GGUFReader

    model = tiny_gemma3(len(tiny_tokenizer))
    path = export_gguf(model, tiny_tokenizer, tmp_path / f"g3-{fmt}.gguf", FormatPlan.uniform(fmt))
    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("gemma3.")}
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]
    assert fields["gemma3.attention.sliding_window"] == 6 and fields["gemma3.rope.freq_base_swa"] == 1e4
    assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 2.0
    tensors = {t.name: t for t in reader.tensors}
    norm = model.model.layers[1].post_feedforward_layernorm.weight.detach().numpy()
    assert np.allclose(tensors["blk.1.post_ffw_norm.weight"].data, 1 + norm)  # the file holds the factor, 1 + weight
    assert {"blk.0.post_attention_norm.weight", "blk.3.attn_q_norm.weight", "blk.2.ffn_norm.weight"} <= set(tensors)
    ref = convert(copy.deepcopy(model), FormatPlan.uniform(fmt))
    b = _blocks(model.config.vocab_size, length=32)
    runtime = llamacpp.logits_fn(path, b.shape[1], threads=1)
    m = evaluate(runtime, b, torch_logits_fn(ref))
    assert m.kl_to_teacher < max_kl and m.top1_agreement > 0.9, m
    # the test can tell: the same weights attending past the window compute something else
    wide = copy.deepcopy(ref)
    wide.config.layer_types = ["full_attention"] * 4
    assert evaluate(runtime, b, torch_logits_fn(wide)).kl_to_teacher > 100 * max(m.kl_to_teacher, 1e-6)


def test_a_depth_pruned_gemma3_keeps_each_blocks_window_in_llama_cpp(tiny_tokenizer, tmp_path):
    """The file lists which blocks slide, so any subset of blocks is a model llama.cpp computes."""
    from edgekd.methods.prune import make_student

    student = make_student(tiny_gemma3(len(tiny_tokenizer), layers=6), [1, 2, 3, 5])
    assert student.config.layer_types == ["full_attention", "sliding_attention", "full_attention", "full_attention"]
    path = export_gguf(student, tiny_tokenizer, tmp_path / "pruned.gguf", FormatPlan.uniform("f16"))
    b = _blocks(student.config.vocab_size, length=32)
    assert evaluate(llamacpp.logits_fn(path, b.shape[1], threads=1), b, torch_logits_fn(student)).kl_to_teacher < 1e-4


@pytest.mark.parametrize("change, why", [
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar"),
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"rope_parameters": {**GEMMA3_ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "without rope scaling"),
])
def test_gemma3_configs_llama_cpp_computes_differently_are_refused(tiny_tokenizer, tmp_path, change, why):
    with pytest.raises(EdgekdError, match=why):
        export_gguf(tiny_gemma3(len(tiny_tokenizer), **change), tiny_tokenizer, tmp_path / "g.gguf", FormatPlan.uniform("f16"))
    assert not (tmp_path / "g.gguf").exists()


def test_gemma3_onnx_decodes_past_the_window_with_its_kv_cache(tiny_tokenizer, tmp_path):
    """Sliding-window blocks keep full-length caches in the ONNX interface and mask by position."""
    from edgekd.device.onnxrt import Decoder
    from edgekd.exporters.onnx import export_onnx

    model = tiny_gemma3(len(tiny_tokenizer))
    b = _blocks(model.config.vocab_size, n=2, length=20)
    with torch.no_grad():
        ref = model(torch.tensor(b, dtype=torch.long)).logits.numpy()
    dec = Decoder(export_onnx(model, tmp_path / "g3.onnx"))
    logits, past = dec.step(b[:, :8], dec.empty_past(2), 0)
    steps = [logits]
    for t in range(8, b.shape[1]):
        logits, past = dec.step(b[:, t:t + 1], past, t)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - ref).max() < 1e-4


def test_a_gemma3_teacher_through_the_whole_chain(tmp_path, tiny_tokenizer, small_corpus_file, tiny_profile_overrides):
    import edgekd

    teacher_dir = tmp_path / "gemma3-teacher"
    tiny_gemma3(len(tiny_tokenizer)).save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    report = edgekd.compress(teacher=teacher_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path, run_name="g3",
                             quiet=True, overrides=[*tiny_profile_overrides, "deployment.formats=[gguf, onnx]"])
    parity = report.stage("export").metrics["parity"]
    assert [p["runtime"] for p in parity] == ["llama.cpp", "onnxruntime"] and all(p["passed"] for p in parity)
    assert "model builder" in parity[1]["note"]  # the plain decoder, with onnxruntime-genai's reason
    assert parity[1]["greedy_match"] is True and report.teacher["architecture"] == "gemma3_text"


def test_the_text_decoder_of_a_gemma3_image_text_checkpoint_loads(tmp_path, tiny_tokenizer):
    """Gemma 3 4B+ ship as image-text checkpoints: edgekd reads their text decoder alone."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from edgekd.methods.models import load_causal_lm, resolve_model_source

    text = tiny_gemma3(len(tiny_tokenizer)).config.to_dict()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                patch_size=14)
    torch.manual_seed(0)
    full = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                                       image_token_index=380, boi_token_index=381, eoi_token_index=382)).eval()
    full.save_pretrained(tmp_path / "g3-mm")
    tiny_tokenizer.save_pretrained(tmp_path / "g3-mm")
    loaded = load_causal_lm(resolve_model_source(tmp_path / "g3-mm"))
    assert loaded.info["architecture"] == "gemma3_text" and family_of(loaded.model).gguf_arch == "gemma3"
    ids = torch.tensor(_blocks(370, n=1, length=16), dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, full(input_ids=ids).logits)


# ------------------------------------------------------------------ GGUF teachers in K-quants

@pytest.mark.parametrize("build", ["llama", "qwen3", "phi3", "phi3-longrope", "gemma3"])
def test_a_kquant_gguf_teacher_of_each_family_loads_dequantized(tmp_path, tiny_tokenizer, phi3_tokenizer, monkeypatch, build):
    """Q4_K_M-style files (the form most GGUFs are shared in) load as the weights llama.cpp reads:
    transformers' dequantization of every tensor equals edgekd's grid round trip."""
    from tiny_models import make_tiny_llama

    from edgekd.methods.models import load_causal_lm, resolve_model_source

    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    tok = phi3_tokenizer if build.startswith("phi3") else tiny_tokenizer
    longrope = {"rope_type": "longrope", "rope_theta": 100.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 8,
                "short_factor": [1.0 + i / 8 for i in range(16)], "long_factor": [2.0 + i for i in range(16)]}  # 16 > 8: long factors
    model = {"llama": lambda: make_tiny_llama(len(tok), hidden=256, intermediate=512), "qwen3": lambda: tiny_qwen3(len(tok), hidden=256),
             "phi3": lambda: tiny_phi3(len(tok), hidden=256), "phi3-longrope": lambda: tiny_phi3(len(tok), longrope, hidden=256),
             "gemma3": lambda: tiny_gemma3(len(tok), hidden=256)}[build]()
    plan = FormatPlan.uniform("q4_k", {"ffn_down": "q6_k", "attn_v": "q6_k", "embedding": "q6_k"})
    path = export_gguf(model, tok, tmp_path / f"{build}-q4_k_m.gguf", plan)
    loaded = load_causal_lm(resolve_model_source(path)).model
    ref = convert(copy.deepcopy(model), plan)
    ids = torch.tensor(_blocks(model.config.vocab_size, n=2, length=16), dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-4)


@pytest.fixture(scope="module")
def gemma_like_tokenizer(tmp_path_factory):
    """A SentencePiece BPE model trained as Gemma's is (byte fallback, digits split, no dummy prefix,
    <pad> <eos> <bos> <unk> first, chat markers as user-defined pieces) and the Hugging Face
    tokenizer transformers converts from it, in one directory as a Gemma checkpoint has them."""
    import io
    import json

    import sentencepiece as spm
    from tiny_models import corpus_text
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("gemma-tok")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_text(20).splitlines()), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    AutoTokenizer.from_pretrained(d).save_pretrained(d)  # tokenizer.json beside tokenizer.model, as on the Hub
    return AutoTokenizer.from_pretrained(d), spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_a_sentencepiece_tokenizer_becomes_llama_cpp_s_own_vocabulary(gemma_like_tokenizer, tmp_path):
    """Gemma's tokenizer written from its tokenizer.model: llama.cpp then splits text exactly as
    SentencePiece and transformers do, adds the BOS Gemma needs, and carries the chat template."""
    import llama_cpp

    tokenizer, sp = gemma_like_tokenizer
    path = export_gguf(tiny_gemma3(len(tokenizer)), tokenizer, tmp_path / "g3.gguf", FormatPlan.uniform("f16"))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    texts = ["Hello world, the  quick 123 brown fox", "def f(x):\n    return x**2  # café ☕ 東京",
             " leading space and trailing ", "<start_of_turn>user\nhi<end_of_turn>"]
    for text in texts:
        want = sp.encode(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    assert llm.tokenize(b"hi", add_bos=True)[0] == sp.bos_id() == llm.token_bos()
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "true" and "bos_token" in llm.metadata["tokenizer.chat_template"]


def test_the_cost_model_counts_the_kv_cells_llama_cpp_allocates_for_sliding_window_blocks(tiny_tokenizer, tmp_path, capfd):
    import llama_cpp

    from edgekd.device.costmodel import ArchShape

    model = tiny_gemma3(len(tiny_tokenizer))
    path = export_gguf(model, tiny_tokenizer, tmp_path / "g3.gguf", FormatPlan.uniform("f16"))
    assert llamacpp.load(path, n_ctx=4096, threads=1).context_params.swa_full is False
    llama_cpp.Llama(str(path), n_ctx=4096, n_batch=512, n_ubatch=512, swa_full=False, verbose=True)
    log = capfd.readouterr().err
    cells = {kind: int(log.split(f"creating {kind} KV cache, size = ")[1].split()[0]) for kind in ("non-SWA", "    SWA")}
    shape = ArchShape.from_config(model.config)
    assert (shape.sliding_layers, shape.sliding_window) == (2, 6)
    facts = shape.facts(FormatPlan.uniform("f16"))
    assert facts.cached_positions(4096) == 2 * cells["non-SWA"] + 2 * cells["    SWA"] == 2 * 4096 + 2 * 768


# ------------------------------------------------------------------ the sampler's KV cache, every family


@pytest.mark.parametrize("build", ["qwen3", "smollm3", "phi3", "gemma3"])
def test_the_sampler_decodes_every_family_as_full_forward_passes(tiny_tokenizer, build):
    """edgekd's in-place KV cache (edgekd.methods.kv_cache) under each family's attention: Qwen3's
    q/k norms, SmolLM3's unroped blocks, Phi-3's partial rotary, Gemma 3's 6-token window decoded
    past its end; and a batch padded on the left, each row as sampled alone."""
    from edgekd.methods import generate as gen
    from edgekd.methods.sampling import torch_continue

    vocab = len(tiny_tokenizer) + 1  # phi3 needs room for its <|endoftext|>
    model = {"qwen3": tiny_qwen3, "smollm3": tiny_smollm3, "phi3": tiny_phi3, "gemma3": tiny_gemma3}[build](vocab)
    prompts = np.array([[5, 9, 30, 7], [11, 12, 13, 14]])
    cached = torch_continue(model, prompts, 12, np.random.default_rng(0), temperature=0.0)
    seq = torch.from_numpy(prompts)
    with torch.no_grad():
        for _ in range(12):  # greedy by full forward passes, no cache
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert np.array_equal(cached, seq.numpy())
    rows = [[5, 9, 30, 7], [11, 12], [40, 41, 42, 43, 44, 45]]
    settings = gen.Generation(tokens=64, prompt_tokens=4, new_tokens=10, temperature=0.0, top_p=1.0, engine="torch", batch_size=3, seed=0)
    for p, row in zip(rows, gen._engine(settings, model, None)(rows, np.random.default_rng(0), ())):
        assert row == torch_continue(model, np.array([p]), 10, np.random.default_rng(0), temperature=0.0)[0].tolist()


@pytest.mark.parametrize("build", ["qwen3", "smollm3", "phi3", "gemma3"])
def test_the_planners_block_skips_replay_every_family_exactly(tiny_tokenizer, build):
    """The sensitivity stage's skipped blocks, measured from the teacher's recorded block outputs
    (edgekd.methods.sensitivity.replayed), cost what a full pass with the block skipped costs, under
    each family's layers: SmolLM3's unroped blocks, Phi-3's partial rotary, Gemma 3's window and its
    alternating layer types."""
    from conftest import skip_costs_by_full_passes

    from edgekd.methods.sensitivity import measure_sensitivity

    vocab = len(tiny_tokenizer) + 1
    model = {"qwen3": tiny_qwen3, "smollm3": tiny_smollm3, "phi3": tiny_phi3, "gemma3": tiny_gemma3}[build](vocab)
    blocks = _blocks(vocab, n=5, length=16)
    full = skip_costs_by_full_passes(model, blocks)
    assert measure_sensitivity(model, blocks, []).blocks == full and all(kl > 0 for kl in full)
