"""Write a transformers model as a GGUF file that llama.cpp loads.

Every tensor is stored in the format its :class:`~edgekd.formats.FormatPlan` names, through the
reference quantizers of :mod:`edgekd.formats` (the ones QAT trained against), so a QAT model
exports with no error beyond what it already computed. Tensor names, metadata keys and the
rotary permutation come from the architecture description (:mod:`edgekd.families`). The only
module that writes GGUF (through the ``gguf`` package).

llama.cpp's LLAMA graph applies rotary embeddings to interleaved pairs, Hugging Face to the
two halves of each head; the Q and K rows are permuted accordingly (as llama.cpp's own
convert_hf_to_gguf.py does). A row permutation does not change which weights share a
quantization block (blocks run along a row), so it commutes with quantization.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import kquants as kq
from ..errors import EdgekdError
from ..families import family_of, rope_parameters
from ..fileio import atomic_path
from ..formats import FormatPlan, WeightFormat
from ..versions import edgekd_version


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(name: str, w: np.ndarray, fmt: WeightFormat, grid: Any = None) -> tuple[str, np.ndarray, Any]:
    """One GGUF tensor: ``w`` in ``fmt`` (K-quants: on the ``grid`` QAT trained on, where given)."""
    from gguf import GGMLQuantizationType

    w = np.ascontiguousarray(w, dtype=np.float32)
    if not fmt.quantized or w.ndim == 1:
        return name, (w if w.ndim == 1 else w.astype(fmt.numpy_dtype)), None
    return name, fmt.pack(fmt.blocks_for(w, grid)), GGMLQuantizationType[fmt.gguf_type]


def rope_freqs(config: Any) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3 rope scaling, else None: per rotary pair the
    divisor of its frequency, ``inv_freq_default / inv_freq_llama3`` (ggml_rope_ext divides theta
    by it; convert_hf_to_gguf.py writes the same values from the same formula), from transformers'
    own llama3 frequencies so the file rotates exactly as the torch model does."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(rope["rope_theta"])
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.float()).numpy().astype(np.float32)


def longrope(config: Any) -> tuple[dict[str, float | int], list[tuple[str, np.ndarray]]] | None:
    """Phi-3's LongRoPE for llama.cpp: ``rope.scaling.attn_factor`` (transformers' own
    attention factor, which scales cos and sin), ``rope.scaling.original_context_length``, and the
    long and short per-pair factors as ``rope_factors_long`` / ``rope_factors_short`` (F32). Both
    runtimes pick the long factors past the original context: llama.cpp by the context size it is
    given, transformers by the sequence length."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "longrope":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, attn_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    keys = {"rope.scaling.attn_factor": float(attn_factor),
            "rope.scaling.original_context_length": int(rope.get("original_max_position_embeddings")
                                                        or config.original_max_position_embeddings)}
    return keys, [("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32)),
                  ("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))]


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


def _sentencepiece_file(tokenizer: Any) -> Path | None:
    """The SentencePiece model (``tokenizer.model``) a tokenizer was built from, where it is on disk."""
    for candidate in (getattr(tokenizer, "vocab_file", None),
                      Path(getattr(tokenizer, "name_or_path", "") or ".") / "tokenizer.model"):
        if candidate and Path(candidate).is_file() and Path(candidate).name.endswith(".model"):
            return Path(candidate)
    return None


def _tokenizer_fields_from_sentencepiece(writer: Any, model_file: Path, tokenizer: Any, vocab_size: int) -> None:
    """llama.cpp's SentencePiece ("llama") vocabulary from ``tokenizer.model``, as its own
    converter builds it (``_create_vocab_sentencepiece``): every piece with its score and type,
    the tokenizer's added tokens as control (special) or user-defined, ``[PADi]`` up to the
    model's vocabulary size; the special ids, add-BOS flag and chat template through gguf-py's
    SpecialVocab, which reads them from the tokenizer's files."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise EdgekdError("writing a SentencePiece vocabulary to GGUF needs the sentencepiece package",
                          fix="pip install sentencepiece (or: pip install 'edgekd[export]')") from None
    T = gguf.TokenType
    sp = SentencePieceProcessor(model_file=str(model_file))
    n = max(vocab_size, sp.vocab_size())
    tokens, scores, types = [f"[PAD{i}]" for i in range(n)], [-1000.0] * n, [T.UNUSED] * n
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
                    else T.BYTE if sp.is_byte(i) else T.NORMAL)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < n:
            tokens[i], scores[i] = added.content, -1000.0
            types[i] = T.CONTROL if added.special else T.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # the model's own normalizer: whether it prepends a space ("▁") to the text
    writer.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))
    gguf.SpecialVocab(model_file.parent, n_vocab=n).add_to_gguf(writer, quiet=True)


def _tokenizer_fields_from_hf(writer: Any, tokenizer: Any, pre: str, vocab_size: int, required: tuple[str, ...] = ()) -> None:
    """Build llama.cpp's tokenizer metadata: a byte-level BPE ("gpt2") vocabulary from the fast
    tokenizer's tokenizer.json, or a SentencePiece one from its ``tokenizer.model``."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    # llama.cpp's "gpt2" vocabulary is byte-level BPE; a SentencePiece-style BPE (Gemma, Phi-3-mini:
    # Metaspace, byte fallback) is BPE in tokenizer.json too, and written as gpt2 it would tokenize wrongly
    byte_level = state and "ByteLevel" in json.dumps([state.get("pre_tokenizer"), state.get("decoder")])
    spm_file = None if byte_level else _sentencepiece_file(tokenizer)
    if spm_file is not None:
        _tokenizer_fields_from_sentencepiece(writer, spm_file, tokenizer, vocab_size)
        return
    if not state or state.get("model", {}).get("type") != "BPE" or not byte_level:
        raise EdgekdError(
            "this tokenizer is SentencePiece-style but its tokenizer.model is not beside it, and only byte-level BPE "
            "tokenizers can be written to GGUF from tokenizer.json alone",
            fix="keep the model's tokenizer.model in its directory, or load the teacher from its GGUF file (its tokenizer is copied as is)",
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
    missing = [t for t in required if t not in tokens]
    if missing:
        raise EdgekdError(f"the tokenizer has no {', '.join(missing)} token, which llama.cpp requires of this architecture",
                          fix="use the model's own tokenizer, or add the token to it")
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
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


def export_gguf(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    plan: FormatPlan,
    source_gguf: str | Path | None = None,
    source_name: str = "",
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` as GGUF with every tensor in the format ``plan`` gives it."""
    import gguf

    cfg = model.config
    family = family_of(model)
    refusal = family.unsupported_gguf_config(cfg)
    if refusal:
        raise EdgekdError(refusal, fix="export this model to ONNX (formats: [onnx])")
    linear = plan.format_of("linear")
    if not linear.linear:
        raise EdgekdError(f"GGUF export of {linear.name!r} linear layers is not supported", fix="choose a profile weight format")
    from ..methods.qat import grids

    fixed = grids(model)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tensors = []
    for key, name, role, layer in family.gguf_tensors(cfg):
        w, grid = state[key], fixed.get(key)
        if role == "norm" and family.gguf_norm_offset:  # Gemma: the file holds the factor, 1 + weight
            w = w + np.float32(family.gguf_norm_offset)
        heads = family.rotary_heads(role, cfg)
        if heads is not None:  # llama.cpp's rotary row order; a grid's rows move with their weights
            w = _permute_rotary(w, heads)
            if grid is not None:
                grid = kq.map_rows(grid, partial(_permute_rotary, n_head=heads))
        tensors.append(_tensor(name, w, plan.format_of(role, layer), grid))
    freqs = rope_freqs(cfg)
    if freqs is not None:  # one global tensor, never quantized, not permuted (it is indexed by rotary pair)
        tensors.insert(0, ("rope_freqs.weight", freqs, None))
    hparams = family.gguf_hparams(cfg)
    long = longrope(cfg)
    if long is not None:
        hparams.update(long[0])
        tensors[:0] = [(name, data, None) for name, data in long[1]]

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), family.gguf_arch)
        writer.add_name(f"{source_name or cfg.model_type} (edgekd {plan.name})")
        for key, value in hparams.items():
            add = (writer.add_array if isinstance(value, list) else writer.add_string if isinstance(value, str)
                   else writer.add_float32 if isinstance(value, float) else writer.add_uint32)
            add(f"{family.gguf_arch}.{key}", value)
        writer.add_file_type(linear.gguf_file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("general.quantized_by", f"edgekd {edgekd_version()}")
        writer.add_string("edgekd.version", edgekd_version())
        writer.add_string("edgekd.source_model", source_name)
        writer.add_string("edgekd.weight_format", plan.name)
        for k, v in (extra_metadata or {}).items():
            writer.add_string(f"edgekd.{k}", str(v))
        if source_gguf is not None:
            _copy_tokenizer_fields(writer, Path(source_gguf))
        else:
            _tokenizer_fields_from_hf(writer, tokenizer, family.pre_tokenizer(cfg.vocab_size), cfg.vocab_size,
                                      family.gguf_required_tokens)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
