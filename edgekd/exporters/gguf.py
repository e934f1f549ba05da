"""Write a Llama-family transformers model as a GGUF file that llama.cpp loads.

Weights are quantized with the reference quantizers of :mod:`edgekd.formats` (the ones QAT
trained against), so a QAT model exports with no error beyond what it already computed.
The only module that writes GGUF (through the ``gguf`` package).

llama.cpp's LLAMA graph applies rotary embeddings to interleaved pairs, Hugging Face to the
two halves of each head; the Q and K rows are permuted accordingly (as llama.cpp's own
convert_hf_to_gguf.py does). A row permutation does not change which weights share a
quantization block (blocks run along a row), so it commutes with quantization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError
from ..fileio import atomic_path
from ..formats import EMBEDDING_FORMAT, QUANTIZERS
from ..versions import edgekd_version

GGUF_FORMATS = ("f16", "q8_0", "q4_0")
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama_ftype
# known llama.cpp pre-tokenizer names, by (model_type, vocab size)
PRE_TOKENIZERS = {("llama", 49152): "smollm", ("llama", 128256): "llama-bpe", ("qwen2", None): "qwen2"}


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(name: str, w: np.ndarray, fmt: str) -> tuple[str, np.ndarray, Any]:
    from gguf import GGMLQuantizationType as T

    w = np.ascontiguousarray(w, dtype=np.float32)
    if fmt == "f32" or w.ndim == 1:
        return name, w, None
    if fmt == "f16":
        return name, w.astype(np.float16), None
    quantize, _, pack = QUANTIZERS[fmt]
    return name, pack(*quantize(w)), {"q4_0": T.Q4_0, "q8_0": T.Q8_0}[fmt]


def _copy_tokenizer_fields(writer: Any, source_gguf: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _tokenizer_fields_from_hf(writer: Any, tokenizer: Any, model_type: str, vocab_size: int) -> str:
    """Build llama.cpp's BPE ("gpt2") tokenizer metadata from a fast tokenizer's tokenizer.json."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if not state or state.get("model", {}).get("type") != "BPE":
        raise EdgekdError(
            "only byte-level BPE tokenizers can be written to GGUF by edgekd",
            fix="load the teacher from its GGUF file (its tokenizer is copied as is), or use a BPE tokenizer",
        )
    vocab = state["model"]["vocab"]
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    n = max(vocab_size, max(list(vocab.values()) + list(added) + [0]) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # unused
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, 1  # normal
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t.get("special") else 4  # control / user-defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    pre = PRE_TOKENIZERS.get((model_type, vocab_size)) or PRE_TOKENIZERS.get((model_type, None)) or "gpt-2"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return pre


def export_gguf(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    weight_format: str,
    source_gguf: str | Path | None = None,
    source_name: str = "",
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` as GGUF with linear weights in ``weight_format`` (embeddings per the policy)."""
    import gguf

    if weight_format not in GGUF_FORMATS:
        raise EdgekdError(f"GGUF export of {weight_format!r} is not supported", fix=f"choose one of {GGUF_FORMATS}")
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise EdgekdError(f"GGUF export supports Llama and Mistral models, not {cfg.model_type!r}",
                          fix="export this model to ONNX (formats: [onnx])")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise EdgekdError(f"GGUF export does not write rope scaling ({rope.get('rope_type')!r})", fix="export to ONNX instead")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    emb_fmt = EMBEDDING_FORMAT[weight_format]
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    tensors = [_tensor("token_embd.weight", state["model.embed_tokens.weight"], emb_fmt),
               _tensor("output_norm.weight", state["model.norm.weight"], "f32")]
    if not tied:
        tensors.append(_tensor("output.weight", state["lm_head.weight"], emb_fmt))
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.append(_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], "f32"))
        tensors.append(_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], "f32"))
        for hf, gg in names.items():
            w = state[p + hf + ".weight"]
            if hf == "self_attn.q_proj":
                w = _permute_rotary(w, heads)
            elif hf == "self_attn.k_proj":
                w = _permute_rotary(w, kv_heads)
            tensors.append(_tensor(f"blk.{i}.{gg}.weight", w, weight_format))

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(f"{source_name or cfg.model_type} (edgekd {weight_format})")
        writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(FILE_TYPE[weight_format])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("general.quantized_by", f"edgekd {edgekd_version()}")
        writer.add_string("edgekd.version", edgekd_version())
        writer.add_string("edgekd.source_model", source_name)
        writer.add_string("edgekd.weight_format", weight_format)
        for k, v in (extra_metadata or {}).items():
            writer.add_string(f"edgekd.{k}", str(v))
        if source_gguf is not None:
            _copy_tokenizer_fields(writer, Path(source_gguf))
        else:
            _tokenizer_fields_from_hf(writer, tokenizer, cfg.model_type, cfg.vocab_size)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def quantize_with_llamacpp(f16_path: str | Path, out_path: str | Path, ftype: str = "q4_k_m", threads: int = 2) -> Path:
    """llama.cpp's own quantizer (for K-quant PTQ baselines), from an F16 GGUF."""
    import llama_cpp

    ftypes = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
              "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[ftype]
    params.nthread = threads
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EdgekdError(f"llama.cpp failed to quantize {f16_path} to {ftype} (code {rc})", fix="check the F16 file")
    return out_path
