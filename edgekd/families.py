"""The architecture description: per model family, where everything is and what it is called.

Everything edgekd knows about a model's layout lives here (as gguf-py keeps it in one
``tensor_mapping.py``): the decoder-layer stack, the quantizable linear layers and their roles,
the norms, the Hugging Face -> GGUF tensor names and metadata keys, how rotary embeddings must
be permuted for llama.cpp, the taps distillation reads, and what pruning may remove. QAT,
pruning, distillation and both exporters ask a :class:`Family`; none of them names a module.
A new family is one entry in :data:`FAMILIES`.

A *role* names a tensor independently of the family: the GGUF base name (``attn_q``,
``ffn_down``, ...) for a block's linear layers and norms, ``embedding``, ``head``, ``norm``
for the others. Weight-format plans (edgekd.formats.FormatPlan) are written in roles.

Torch-free: modules are reached by dotted path on whatever object is passed in.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import EdgekdError

# (path inside a decoder block, role)
LLAMA_LINEARS = (
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
)
LLAMA_NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))


@dataclass(frozen=True)
class MlpChannels:
    """What width pruning of the MLP slices (Minitron): the intermediate channels are rows of
    ``rows`` and columns of ``cols``; ``size_attr`` is the block attribute recording the width."""

    rows: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    cols: str = "mlp.down_proj"
    size_attr: str = "mlp.intermediate_size"
    fused: bool = False  # one linear holds [gate; up] (Phi-3's gate_up_proj): a channel is a row in each half


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers' config.model_type
    name: str
    gguf_arch: str | None  # general.architecture edgekd writes; None: no GGUF export (see gguf_refusal)
    gguf_refusal: str = ""
    loads_from_gguf: tuple[str, ...] = ()  # GGUF architectures that load as this family
    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attention: str = "self_attn"  # the block's attention module (its layer_idx indexes the KV cache)
    linears: tuple[tuple[str, str], ...] = LLAMA_LINEARS
    norms: tuple[tuple[str, str], ...] = LLAMA_NORMS
    # roles whose rows llama.cpp expects interleaved by rotary pair, with the config field that
    # counts their heads: Hugging Face rotates the two halves of each head instead
    rotary_rows: tuple[tuple[str, str], ...] = (("attn_q", "num_attention_heads"), ("attn_k", "num_key_value_heads"))
    mlp: MlpChannels = field(default_factory=MlpChannels)
    pre_tokenizers: tuple[tuple[int | None, str], ...] = ()  # (vocab size or None for any, llama.cpp pre-tokenizer)
    # rope types (config.rope_parameters["rope_type"]) the GGUF file can carry; "llama3" is the
    # rope_freqs.weight tensor of divisors llama.cpp's llama loader reads (edgekd.exporters.gguf)
    gguf_rope_types: tuple[str, ...] = ("default",)
    per_layer_config: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block (sliced by depth pruning)
    # llama.cpp builds some layers without a rotary embedding at a fixed step it does not read from
    # the file (smollm3: every 4th, (i + 1) % 4 == 0); a model whose NoPE layers differ cannot be written
    gguf_nope_step: int | None = None
    gguf_required_tokens: tuple[str, ...] = ()  # tokens llama.cpp's vocabulary loader looks up for this architecture
    # added to every norm weight in the file: Gemma's RMSNorm scales by (1 + weight), llama.cpp's by weight
    gguf_norm_offset: float = 0.0

    # ------------------------------------------------------------ modules
    def decoder_layers(self, model: Any) -> Any:
        try:
            return operator.attrgetter(self.layers)(model)
        except AttributeError:
            raise EdgekdError(f"this model has no {self.layers} stack", fix=f"use a decoder edgekd supports: {supported_text()}") from None

    def set_decoder_layers(self, model: Any, layers: Any) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(operator.attrgetter(parent)(model), name, layers)

    def embedding_module(self, model: Any) -> Any:
        return operator.attrgetter(self.embedding)(model)

    def head_module(self, model: Any) -> Any:
        return operator.attrgetter(self.head)(model)

    def final_norm_module(self, model: Any) -> Any:
        return operator.attrgetter(self.final_norm)(model)

    def attention_module(self, layer: Any) -> Any:
        return operator.attrgetter(self.attention)(layer)

    def block_linears(self, layer: Any) -> list[tuple[str, Any]]:
        """(role, module) of every linear layer of one decoder block that exists in it."""
        out = []
        for path, role in self.linears:
            try:
                out.append((role, operator.attrgetter(path)(layer)))
            except AttributeError:
                continue
        return out

    def linear_modules(self, model: Any) -> list[tuple[int, str, Any]]:
        """(layer index, role, module) of every block linear layer, the tensors QAT and export quantize."""
        return [(i, role, mod) for i, layer in enumerate(self.decoder_layers(model)) for role, mod in self.block_linears(layer)]

    def roles(self) -> tuple[str, ...]:
        """The roles of a block's linear layers."""
        return tuple(role for _, role in self.linears)

    def check_tensor_keys(self, keys: Any, layers: int) -> None:
        """A clear error for per-tensor format keys that name no tensor of this family's models."""
        bad = []
        for key in keys:
            if key in ("embedding", "head"):
                continue
            block, _, role = key.rpartition(".")
            layer_ok = not block or (block.startswith("blk.") and block[4:].isdigit() and int(block[4:]) < layers)
            if role not in self.roles() or not layer_ok:
                bad.append(key)
        if bad:
            raise EdgekdError(
                f"deployment.tensor_formats names tensors a {self.name} model with {layers} blocks does not have: {', '.join(bad)}",
                fix=f"use embedding, head, a role ({', '.join(self.roles())}) or blk.N.<role> with N below {layers}")

    def tied(self, model: Any) -> bool:
        return bool(getattr(model.config, "tie_word_embeddings", False))

    # ------------------------------------------------------------ width pruning
    def mlp_in_features(self, layer: Any) -> int:
        return operator.attrgetter(self.mlp.cols)(layer).in_features

    def mlp_down(self, layer: Any) -> Any:
        """The module whose input is the MLP's intermediate activation (the channels' importance tap)."""
        return operator.attrgetter(self.mlp.cols)(layer)

    def replace_mlp(self, layer: Any, keep: list[int], slicer: Any) -> None:
        """Keep the MLP channels ``keep`` of one block: ``slicer(module, rows=..., cols=...)`` returns
        the sliced linear (rows of the gate/up projections, columns of the down projection)."""
        width = len(keep)
        for path in self.mlp.rows:
            lin = operator.attrgetter(path)(layer)
            rows = list(keep) + [lin.out_features // 2 + k for k in keep] if self.mlp.fused else list(keep)
            _set_path(layer, path, slicer(lin, rows=rows))
        _set_path(layer, self.mlp.cols, slicer(operator.attrgetter(self.mlp.cols)(layer), cols=list(keep)))
        owner, _, attr = self.mlp.size_attr.rpartition(".")
        target = operator.attrgetter(owner)(layer) if owner else layer
        if attr and hasattr(target, attr):
            setattr(target, attr, width)

    # ------------------------------------------------------------ GGUF
    def gguf_tensors(self, config: Any) -> list[tuple[str, str, str, int | None]]:
        """(state-dict key, GGUF tensor name, role, layer) of every tensor a GGUF file holds, in file order."""
        out = [(f"{self.embedding}.weight", "token_embd.weight", "embedding", None),
               (f"{self.final_norm}.weight", "output_norm.weight", "norm", None)]
        if not getattr(config, "tie_word_embeddings", False):
            out.append((f"{self.head}.weight", "output.weight", "head", None))
        for i in range(config.num_hidden_layers):
            prefix = f"{self.layers}.{i}."
            out += [(f"{prefix}{path}.weight", f"blk.{i}.{role}.weight", "norm", i) for path, role in self.norms]
            out += [(f"{prefix}{path}.weight", f"blk.{i}.{role}.weight", role, i) for path, role in self.linears]
        return out

    def rotary_heads(self, role: str, config: Any) -> int | None:
        """Heads of a role whose rows must be permuted for llama.cpp's rotary layout, else None."""
        field_name = dict(self.rotary_rows).get(role)
        return None if field_name is None else int(getattr(config, field_name))

    def gguf_hparams(self, config: Any) -> dict[str, int | float]:
        """GGUF metadata ``<arch>.<key>`` values (the GGUF spec's llama keys), in the order written.
        A partial rotary embedding (Phi-3: ``partial_rotary_factor``) rotates ``rope.dimension_count``
        of each head's dimensions; LongRoPE's extra keys are the exporter's (they need transformers)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = rope_parameters(config)
        partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
        out: dict[str, int | float] = {
            "context_length": int(getattr(config, "max_position_embeddings", 2048)),
            "embedding_length": int(config.hidden_size),
            "block_count": int(config.num_hidden_layers),
            "feed_forward_length": int(config.intermediate_size),
            "attention.head_count": int(heads),
            "attention.head_count_kv": int(config.num_key_value_heads),
            "rope.freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
            "rope.dimension_count": int(head_dim * partial),
        }
        if head_dim != config.hidden_size // heads:
            out["attention.key_length"] = int(head_dim)
            out["attention.value_length"] = int(head_dim)
        out["vocab_size"] = int(config.vocab_size)
        return out

    def unsupported_gguf_config(self, config: Any) -> str | None:
        """Why this config cannot be written as GGUF by edgekd, or None."""
        if self.gguf_arch is None:
            return self.gguf_refusal
        for rope in rope_parameters(config, None):
            if rope.get("rope_type", "default") not in self.gguf_rope_types:
                return f"GGUF export of {self.name} models does not write rope scaling {rope.get('rope_type')!r}"
        if self.gguf_nope_step:
            expected = [int((i + 1) % self.gguf_nope_step != 0) for i in range(config.num_hidden_layers)]
            if list(getattr(config, "no_rope_layers", expected)) != expected:
                return (f"llama.cpp's {self.gguf_arch} models skip the rotary embedding in every {self.gguf_nope_step}th block; this "
                        f"model's blocks without it are {[i for i, r in enumerate(config.no_rope_layers) if not r]} (a depth-pruned "
                        "student keeps its blocks' own)")
        if getattr(config, "use_sliding_window", False):
            return f"llama.cpp's {self.gguf_arch} models attend to the whole context: this model's sliding-window attention would change in the file"
        return None

    def config_from_gguf(self, config: Any, metadata: dict[str, Any]) -> None:
        """Set, from a GGUF file's metadata, what transformers' GGUF loader leaves at a default
        (called before a dequantized teacher is saved); nothing for the families it reads fully."""

    def gguf_key(self, name: str) -> str:
        """The metadata key ``<arch>.<name>`` of this family's GGUF files."""
        return f"{self.gguf_arch}.{name}"

    def pre_tokenizer(self, vocab_size: int) -> str:
        names = dict(self.pre_tokenizers)
        return names.get(vocab_size) or names.get(None) or "gpt-2"


def rope_parameters(config: Any, layer_type: str | None = "full_attention") -> Any:
    """A config's rope parameters. Families with per-layer-type rotary embeddings (Gemma 3) nest
    them by layer type: ``layer_type`` picks one set (the global layers' by default), None returns
    every set as a list; a flat config has one set, returned either way."""
    rope = getattr(config, "rope_parameters", None) or {}
    nested = bool(rope) and all(isinstance(v, dict) for v in rope.values())
    if layer_type is None:
        return list(rope.values()) if nested else [rope]
    return rope.get(layer_type, {}) if nested else rope


def _set_path(root: Any, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(operator.attrgetter(parent)(root) if parent else root, name, value)


LLAMA = Family("llama", "Llama (incl. SmolLM, Llama 3.x)", gguf_arch="llama", loads_from_gguf=("llama",),
               pre_tokenizers=((49152, "smollm"), (128256, "llama-bpe")), gguf_rope_types=("default", "llama3"))
# Qwen2 and Mistral share Llama's block layout (pre-norm attention + SwiGLU MLP, RoPE, GQA).
QWEN2 = replace(LLAMA, model_type="qwen2", name="Qwen2", gguf_arch=None, loads_from_gguf=("qwen2",), gguf_rope_types=("default",),
                gguf_refusal="GGUF export supports Llama and Mistral models, not 'qwen2'",
                pre_tokenizers=((None, "qwen2"),))
MISTRAL = replace(LLAMA, model_type="mistral", name="Mistral", loads_from_gguf=(), pre_tokenizers=())  # Mistral GGUFs say "llama"
# Qwen3: Llama's layout plus a per-head RMSNorm on q and k before the rotary embedding
# (transformers' modeling_qwen3; llama.cpp's qwen3 loader requires attn_q_norm / attn_k_norm).
# Its rotary embedding rotates halves of each head as Hugging Face does (NEOX): no row permutation.
QWEN3 = replace(LLAMA, model_type="qwen3", name="Qwen3", gguf_arch="qwen3", loads_from_gguf=("qwen3",), rotary_rows=(),
                gguf_rope_types=("default",),  # llama.cpp's qwen3 loader has no rope_freqs tensor
                norms=LLAMA_NORMS + (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")),
                pre_tokenizers=((None, "qwen2"),))

# SmolLM3: Llama's layout; every 4th block has no rotary embedding (config.no_rope_layers, 1 = rope),
# which llama.cpp's smollm3 graph hard-codes. transformers cannot load smollm3 GGUF files.
SMOLLM3 = replace(LLAMA, model_type="smollm3", name="SmolLM3", gguf_arch="smollm3", loads_from_gguf=(),
                  gguf_rope_types=("default",), per_layer_config=("layer_types", "no_rope_layers"), gguf_nope_step=4,
                  pre_tokenizers=((128256, "llama-bpe"),))


@dataclass(frozen=True)
class Phi3Family(Family):
    def config_from_gguf(self, config: Any, metadata: dict[str, Any]) -> None:
        """transformers' phi3 loader rotates whole heads and drops LongRoPE: the partial rotary
        factor comes from ``rope.dimension_count``, the factors from the ``rope_factors_*`` tensors."""
        key = self.gguf_key
        head_dim = config.hidden_size // config.num_attention_heads
        rope = dict(rope_parameters(config))
        rope["partial_rotary_factor"] = int(metadata.get(key("rope.dimension_count"), head_dim)) / head_dim
        long, short = metadata.get("rope_factors_long.weight"), metadata.get("rope_factors_short.weight")
        if long is not None and short is not None:
            original = int(metadata[key("rope.scaling.original_context_length")])
            rope.update(rope_type="longrope", long_factor=list(long), short_factor=list(short),
                        original_max_position_embeddings=original)
            if key("rope.scaling.attn_factor") in metadata:
                rope["attention_factor"] = float(metadata[key("rope.scaling.attn_factor")])
            config.original_max_position_embeddings = original
        config.rope_parameters = rope


# Phi-3 / Phi-4-mini: fused [q; k; v] and [gate; up] projections (llama.cpp's attn_qkv and a
# 2 x n_ff ffn_up), a partial NEOX rotary embedding, LongRoPE factors as two global tensors.
PHI3 = Phi3Family("phi3", "Phi-3 / Phi-4-mini", gguf_arch="phi3", loads_from_gguf=("phi3",), rotary_rows=(),
                  linears=(("self_attn.qkv_proj", "attn_qkv"), ("self_attn.o_proj", "attn_output"),
                           ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")),
                  mlp=MlpChannels(rows=("mlp.gate_up_proj",), cols="mlp.down_proj", size_attr="", fused=True),
                  pre_tokenizers=((200064, "gpt-4o"),), gguf_rope_types=("default", "longrope"),
                  gguf_required_tokens=("<|endoftext|>",))


@dataclass(frozen=True)
class Gemma3Family(Family):
    """Gemma 3's text decoder (transformers' modeling_gemma3, llama.cpp's gemma3 loader): four
    norms per block plus q/k norms, all scaling by (1 + weight); GeGLU; embeddings scaled by
    sqrt(hidden) (both runtimes do it themselves); sliding-window blocks with their own rope base
    between global ones. llama.cpp reads the window, which blocks slide (a per-block list, so a
    depth-pruned student keeps its own pattern), the two rope bases and linear rope scaling of the
    global blocks from the file; it hard-codes the attention scale to 1/sqrt(head_dim)
    (1/sqrt(hidden/heads) in a 62-block model), so ``query_pre_attn_scalar`` must agree."""

    @staticmethod
    def llama_cpp_query_scalar(config: Any) -> int:
        """What llama.cpp scales attention by (1/sqrt of this); it reads no key for it."""
        return config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else config.head_dim

    def gguf_hparams(self, config: Any) -> dict[str, Any]:
        out = super().gguf_hparams(config)
        # always, even when head_dim = hidden / heads: transformers' GGUF reader takes Gemma's
        # head_dim from key_length alone (its default is 256)
        out["attention.key_length"] = out["attention.value_length"] = int(config.head_dim)
        sliding = [t == "sliding_attention" for t in config.layer_types]
        if any(sliding):
            out["attention.sliding_window"] = int(config.sliding_window)
            out["attention.sliding_window_pattern"] = sliding
            out["rope.freq_base_swa"] = float(rope_parameters(config, "sliding_attention").get("rope_theta", 10000.0))
        full = rope_parameters(config, "full_attention")
        if full.get("rope_type") == "linear":
            out["rope.scaling.type"] = "linear"
            out["rope.scaling.factor"] = float(full["factor"])
        if getattr(config, "final_logit_softcapping", None):
            out["final_logit_softcapping"] = float(config.final_logit_softcapping)
        return out

    def config_from_gguf(self, config: Any, metadata: dict[str, Any]) -> None:
        """transformers' loader keeps Gemma 3's defaults for the block pattern (every 6th global),
        the local rope base, rope scaling and the attention scale; read them as llama.cpp does
        (``set_swa_pattern``: block i slides when i % n < n - 1; an array names each block)."""
        key = self.gguf_key
        n = config.num_hidden_layers
        pattern = metadata.get(key("attention.sliding_window_pattern"), 6)
        if not metadata.get(key("attention.sliding_window")):
            sliding = [False] * n
        elif isinstance(pattern, list):
            sliding = [bool(x) for x in pattern]
        else:
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n)]
        config.layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": float(metadata.get(key("rope.freq_base"), 1e6))}
        if metadata.get(key("rope.scaling.type")) == "linear" and metadata.get(key("rope.scaling.factor")):
            full.update(rope_type="linear", factor=float(metadata[key("rope.scaling.factor")]))
        config.rope_parameters = {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(metadata.get(key("rope.freq_base_swa"), 10000.0))}}
        config.query_pre_attn_scalar = self.llama_cpp_query_scalar(config)
        config.final_logit_softcapping = metadata.get(key("final_logit_softcapping")) or None

    def unsupported_gguf_config(self, config: Any) -> str | None:
        refusal = super().unsupported_gguf_config(config)
        if refusal:
            return refusal
        if rope_parameters(config, "sliding_attention").get("rope_type", "default") != "default":
            return "llama.cpp's gemma3 models rotate sliding-window blocks without rope scaling; this model scales them"
        scale = self.llama_cpp_query_scalar(config)
        if float(config.query_pre_attn_scalar) != float(scale):
            return (f"llama.cpp scales a {config.num_hidden_layers}-block gemma3 model's attention by 1/sqrt({scale}); "
                    f"this model's query_pre_attn_scalar is {config.query_pre_attn_scalar}")
        if getattr(config, "attn_logit_softcapping", None):
            return "llama.cpp's gemma3 models have no attention-logit soft-capping; this model uses it"
        if getattr(config, "use_bidirectional_attention", False):
            return "llama.cpp's gemma3 models attend causally; this model attends bidirectionally"
        return None


GEMMA3 = Gemma3Family(
    "gemma3_text", "Gemma 3 (text)", gguf_arch="gemma3", loads_from_gguf=("gemma3",), rotary_rows=(),
    norms=(("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
           ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
           ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")),
    gguf_rope_types=("default", "linear"), gguf_norm_offset=1.0)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, QWEN2, MISTRAL, QWEN3, SMOLLM3, PHI3, GEMMA3)}


# Image-text checkpoints whose text decoder is a supported family: model_type -> (the decoder's
# model_type, how its weight names map onto the text-only model's). Gemma 3 4B+ ship this way;
# the vision tower's weights are left unread.
TEXT_DECODERS: dict[str, tuple[str, dict[str, str]]] = {
    "gemma3": ("gemma3_text", {r"^language_model\.model\.": "model.", r"^model\.language_model\.": "model.",
                               r"^language_model\.lm_head\.": "lm_head."}),
}


def supported_text() -> str:
    return ", ".join(f"{f.name} (model_type {t!r})" for t, f in FAMILIES.items())


# Architectures users bring that edgekd does not handle, and why (model_type or GGUF architecture).
_GATED_DELTANET = ("mix Gated DeltaNet linear-attention blocks with attention blocks: their recurrent state has no place "
                   "in edgekd's attention-only export and distillation taps")
NOT_SUPPORTED_WHY = {
    "gemma3n": "Gemma 3n is a hybrid (per-layer embeddings, AltUp, MatFormer blocks): its blocks are not decoder blocks "
               "edgekd can prune, distill per layer or export",
    "qwen3_next": f"Qwen3-Next / Qwen3.5 {_GATED_DELTANET}",
    "qwen3_5": f"Qwen3.5 models {_GATED_DELTANET}",
    "lfm2": "LFM2 is a hybrid of short-convolution and attention blocks: the convolution blocks have no attention "
            "or KV cache for edgekd's distillation taps and exporters",
}


def unsupported_message(name: Any, where: str = "", what: str = "architecture") -> str:
    """``unsupported architecture 'lfm2' in DIR: why``, with the reason where edgekd knows one."""
    why = NOT_SUPPORTED_WHY.get(str(name))
    return f"unsupported {what} {name!r}" + (f" in {where}" if where else "") + (f": {why}" if why else "")


def family_of(model_or_config: Any) -> Family:
    """The family of a model (or its config), by ``model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise EdgekdError(unsupported_message(model_type), fix=f"edgekd supports these decoders: {supported_text()}")
    return family


def gguf_loadable_archs() -> list[str]:
    return sorted({arch for f in FAMILIES.values() for arch in f.loads_from_gguf})
