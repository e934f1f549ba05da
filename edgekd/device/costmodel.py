"""Analytic cost of a Llama-family model on a device: file size, bytes and FLOPs per token.

Decode is bound by memory bandwidth (every weight and the KV cache are read once per token);
prefill by compute. The roofline time of one decoded token is

    t = max(bytes_per_token / (bandwidth * eff_mem), flops_per_token / (peak_flops * eff_compute))

(Williams, Waterman & Patterson 2009, "Roofline"). The efficiencies are what fraction of the
datasheet peak a runtime reaches; the defaults are assumptions, labelled as such wherever a
projection is shown, and ``edgekd bench`` calibrates them against a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..families import FAMILIES
from ..formats import FormatPlan
from ..profiles import Hardware

# Assumed fractions of peak reached by llama.cpp-class runtimes on small ARM/x86 boards.
DEFAULT_MEMORY_EFFICIENCY = 0.6
# A GGUF also stores the tokenizer (token strings, types, BPE merges) and metadata: measured
# 1.78 MB for SmolLM2's 49,152-entry vocabulary (36.3 bytes per entry) beyond the tensor data.
TOKENIZER_BYTES_PER_VOCAB_ENTRY = 37
DEFAULT_COMPUTE_EFFICIENCY = 0.5
LLAMA_CPP_UBATCH = 512  # llama.cpp's default n_ubatch (its SWA cache holds the window plus one)


@dataclass
class ArchShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    fused_projections: bool = False  # Phi-3: one [q; k; v] and one [gate; up] linear per block
    sliding_layers: int = 0  # blocks attending to a window of the last sliding_window tokens (Gemma 3)
    sliding_window: int = 0
    max_positions: int = 0  # the rotary tables onnxruntime-genai's graph carries hold this many positions

    @classmethod
    def from_config(cls, cfg: Any) -> ArchShape:
        heads = cfg.num_attention_heads
        family = FAMILIES.get(getattr(cfg, "model_type", None))
        return cls(
            layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
            heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
            tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            fused_projections=family is not None and "attn_qkv" in family.roles(),
            max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
            sliding_layers=sum(t == "sliding_attention" for t in getattr(cfg, "layer_types", None) or []),
            sliding_window=int(getattr(cfg, "sliding_window", None) or 0),
        )

    def with_layers(self, layers: int) -> ArchShape:
        """The shape with ``layers`` blocks (sliding-window ones in the teacher's proportion)."""
        sliding = round(self.sliding_layers * layers / self.layers) if self.layers else 0
        return ArchShape(**{**asdict(self), "layers": layers, "sliding_layers": sliding})

    def role_params(self) -> dict[str, int]:
        """Parameters of each linear layer of one block, by role (the GGUF tensor names)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp = self.hidden * self.intermediate
        if self.fused_projections:
            return {"attn_qkv": self.hidden * (q + 2 * kv), "attn_output": q * self.hidden, "ffn_up": 2 * mlp, "ffn_down": mlp}
        return {"attn_q": self.hidden * q, "attn_k": self.hidden * kv, "attn_v": self.hidden * kv, "attn_output": q * self.hidden,
                "ffn_gate": mlp, "ffn_up": mlp, "ffn_down": mlp}

    def role_row_length(self, role: str) -> int:
        """How long a weight row of ``role`` is (its input features): what a block format must divide."""
        return {"attn_output": self.heads * self.head_dim, "ffn_down": self.intermediate}.get(role, self.hidden)

    # parameters of the linear layers of one block (norms excluded)
    def block_linear_params(self) -> int:
        return sum(self.role_params().values())

    def linear_bytes(self, plan: FormatPlan) -> float:
        """Bytes of every block's linear layers, each in the format the plan gives it."""
        roles = self.role_params()
        return sum(plan.format_of(role, layer).tensor_bytes(n) for layer in range(self.layers) for role, n in roles.items())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def facts(self, plan: FormatPlan) -> ModelFacts:
        """What a decoded token reads and computes: every block's linear weights and the output
        head (the token table is read one row at a time and not counted)."""
        head = plan.format_of("embedding" if self.tied_embeddings else "head").tensor_bytes(self.embedding_params())
        return ModelFacts(tensor_bytes=self.linear_bytes(plan) + head, params=self.layers * self.block_linear_params() + self.embedding_params(),
                          layers=self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim, heads=self.heads,
                          sliding_layers=self.sliding_layers, sliding_window=self.sliding_window)


def tensor_data_bytes(shape: ArchShape, plan: FormatPlan) -> float:
    linear = shape.linear_bytes(plan)
    emb = plan.format_of("embedding").tensor_bytes(shape.embedding_params())
    head = 0 if shape.tied_embeddings else plan.format_of("head").tensor_bytes(shape.embedding_params())
    norms = plan.format_of("norm").tensor_bytes((2 * shape.layers + 1) * shape.hidden)
    return linear + emb + head + norms


ONNX_GRAPH_BYTES_PER_BLOCK = 8000  # the .onnx graph itself, SmolLM2-135M: 6.8 kB a block (genai), 6.1 kB (plain)


def onnx_tensor_bytes(fmt: Any, n_weights: int, runtime: str, embedding: bool = False) -> float:
    """Bytes of ``n_weights`` in an ONNX file: codes with an fp32 scale per block where the runtime
    holds the format in int form (``WeightFormat.onnx_int_form``), else fp32 values."""
    if fmt.onnx_int_form(runtime, embedding):
        return n_weights * fmt.onnx_bits / 8 + n_weights / fmt.block * 4
    return 4.0 * n_weights


def onnx_data_bytes(shape: ArchShape, plan: FormatPlan, runtime: str) -> float:
    """Tensor data of the ONNX export for ``runtime``. A tied table's scales are stored twice in the
    onnxruntime-genai folder (MatMulNBits and GatherBlockQuantized want them in different shapes)."""
    roles = shape.role_params()
    linear = sum(onnx_tensor_bytes(plan.format_of(role, layer), n, runtime) for layer in range(shape.layers) for role, n in roles.items())
    emb_fmt, n = plan.format_of("embedding"), shape.embedding_params()
    emb = onnx_tensor_bytes(emb_fmt, n, runtime, embedding=True)
    rotary = 0.0
    if runtime == "onnxruntime-genai":
        if shape.tied_embeddings and emb_fmt.onnx_int_form(runtime, embedding=True):
            emb += n / emb_fmt.block * 4
        rotary = 2 * 4.0 * shape.max_positions * shape.head_dim / 2  # fp32 cos and sin tables
    head = 0 if shape.tied_embeddings else onnx_tensor_bytes(plan.format_of("head"), n, runtime)
    return linear + emb + head + 4.0 * (2 * shape.layers + 1) * shape.hidden + rotary + ONNX_GRAPH_BYTES_PER_BLOCK * shape.layers


def model_bytes(shape: ArchShape, plan: FormatPlan, runtime: str = "llama.cpp") -> float:
    """File size of the exported model ``runtime`` loads: a GGUF's tensor data plus its embedded
    tokenizer and metadata, or an ONNX file with its external data (the folder's tokenizer files
    are not counted, as edgekd bench measures the file)."""
    if runtime in ("onnxruntime", "onnxruntime-genai"):
        return onnx_data_bytes(shape, plan, runtime)
    return tensor_data_bytes(shape, plan) + TOKENIZER_BYTES_PER_VOCAB_ENTRY * shape.vocab


@dataclass
class ModelFacts:
    """What a roofline needs to know about an exported file, read from the file itself."""

    tensor_bytes: float  # weights; all of them are read for every decoded token (tied head included)
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    sliding_layers: int = 0
    sliding_window: int = 0

    def cached_positions(self, context: int) -> float:
        """KV-cache cells summed over blocks at ``context`` tokens: a sliding-window block holds
        llama.cpp's SWA cache, the window plus one micro-batch padded to 256, if that is less."""
        window = min(context, -(-(self.sliding_window + LLAMA_CPP_UBATCH) // 256) * 256) if self.sliding_layers else 0
        return (self.layers - self.sliding_layers) * context + self.sliding_layers * window

    def kv_bytes(self, context: int, bytes_per_value: int = 2) -> float:
        return 2.0 * self.cached_positions(context) * self.kv_heads * self.head_dim * bytes_per_value

    def decode_flops(self, context: int) -> float:
        return 2.0 * self.params + 4.0 * self.cached_positions(context) * self.heads * self.head_dim

    def prefill_flops(self, tokens: int) -> float:
        return 2.0 * self.params * tokens + 2.0 * self.cached_positions(tokens) * tokens * self.heads * self.head_dim


def roofline_rates(facts: ModelFacts, bandwidth_bps: float, flops_ps: float, prompt_tokens: int) -> dict[str, float]:
    """Decode tokens/s and prefill tokens/s at the roofline (Williams et al. 2009).

    Decode right after a ``prompt_tokens`` prompt: the weights and that much KV cache are
    read once per token, and about 2 FLOPs per parameter are spent. Prefill of the prompt:
    its FLOPs against peak compute, or one read of the weights if that is slower.
    """
    t_mem = (facts.tensor_bytes + facts.kv_bytes(prompt_tokens)) / bandwidth_bps
    t_cmp = facts.decode_flops(prompt_tokens) / flops_ps
    t_prefill = max(facts.prefill_flops(prompt_tokens) / flops_ps, facts.tensor_bytes / bandwidth_bps)
    return {"decode_tokens_per_s": 1.0 / max(t_mem, t_cmp), "prefill_tokens_per_s": prompt_tokens / t_prefill,
            "decode_bound": "memory" if t_mem >= t_cmp else "compute"}


@dataclass
class Projection:
    model_mb: float
    decode_tokens_per_s: float
    ttft_ms: float
    bound: str  # "memory" or "compute" for decode
    memory_efficiency: float
    compute_efficiency: float


def project(shape: ArchShape, plan: FormatPlan, hw: Hardware, context: int, prompt_tokens: int = 128,
            memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
            compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY, runtime: str = "llama.cpp") -> Projection:
    """Roofline projection of size (of the file ``runtime`` loads), decode speed and time to first token on ``hw``."""
    rates = roofline_rates(shape.facts(plan), hw.memory_bandwidth_gbs * 1e9 * memory_efficiency,
                           hw.peak_gflops_fp32 * 1e9 * compute_efficiency, prompt_tokens)
    return Projection(
        model_mb=model_bytes(shape, plan, runtime) / 1e6,
        decode_tokens_per_s=rates["decode_tokens_per_s"],
        ttft_ms=1e3 * prompt_tokens / rates["prefill_tokens_per_s"],
        bound=rates["decode_bound"],
        memory_efficiency=memory_efficiency,
        compute_efficiency=compute_efficiency,
    )


# ---------------------------------------------------------------- host-calibrated projection


def project_from_host(facts: ModelFacts, hw: Hardware, host_bandwidth_gbs: float, host_gflops: float,
                      measured_decode_tps: float, measured_prefill_tps: float, prompt_tokens: int = 128,
                      memory_efficiency: float = DEFAULT_MEMORY_EFFICIENCY,
                      compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY) -> dict[str, Any]:
    """PROJECTION of decode speed and time to first token on the device ``hw``.

    The runtime's efficiency on this host is measured: its decode (prefill) rate divided by
    the host's roofline from the host's measured copy bandwidth and GEMM throughput. That
    efficiency is carried over to the device's roofline (datasheet peaks times the assumed
    achievable fractions). The device roofline alone is returned beside it: the calibrated
    figure is lower wherever this host's runtime is held back by fixed costs or its kernels
    rather than by the ceilings, and both are projections, never measurements.
    """
    host = roofline_rates(facts, host_bandwidth_gbs * 1e9, host_gflops * 1e9, prompt_tokens)
    device = roofline_rates(facts, hw.memory_bandwidth_gbs * 1e9 * memory_efficiency,
                            hw.peak_gflops_fp32 * 1e9 * compute_efficiency, prompt_tokens)
    eff_decode = measured_decode_tps / host["decode_tokens_per_s"]
    eff_prefill = measured_prefill_tps / host["prefill_tokens_per_s"]
    decode = eff_decode * device["decode_tokens_per_s"]
    prefill = eff_prefill * device["prefill_tokens_per_s"]
    return {
        "label": "PROJECTION (host-calibrated roofline), not a measurement",
        "decode_tokens_per_s": decode, "ttft_ms": 1e3 * prompt_tokens / prefill,
        "roofline_decode_tokens_per_s": device["decode_tokens_per_s"],
        "roofline_ttft_ms": 1e3 * prompt_tokens / device["prefill_tokens_per_s"],
        "device_decode_bound": device["decode_bound"],
        "host_efficiency_decode": eff_decode, "host_efficiency_prefill": eff_prefill,
        "host_roofline_decode_tokens_per_s": host["decode_tokens_per_s"],
        "host_roofline_prefill_tokens_per_s": host["prefill_tokens_per_s"],
        "assumed_device_efficiency": {"memory": memory_efficiency, "compute": compute_efficiency},
    }


# Peak resident memory beyond the weights and the KV cache, fitted to edgekd bench's measurements
# of SmolLM2-135M files on the reference host (benchmarks/results/*_report.json): llama.cpp 248 MB
# (79.8 MB file, 37.7 MB cache) and 329 MB (91.7 MB, 94.4 MB); onnxruntime 908 MB (98.7 MB file).
PROCESS_BASELINE_MB = 47  # the Python process with the runtime imported
LLAMA_CPP_COMPUTE_MB = 64  # graph and scratch buffers (58-71 MB in the two fits)
LLAMA_CPP_LOGITS_BATCH = 128  # the logits buffer holds n_batch x vocab fp32 values
ONNXRUNTIME_ARENA_MB = 650  # allocator arenas of a decoding session
# onnxruntime-genai, fitted to edgekd bench of the SmolLM2-135M Q4_0 folder (104.2 MB, 1024-token
# cache): 326 MB peak = 47 baseline + 120 prepacked weights (MLAS's int8-activation layout keeps a
# per-block sum beside each fp32 scale: 1.31 x the GGUF-size data) + the tied table's mapped pages
# (the head's prepack reads them, the embedding lookup keeps them) + the fp32 KV buffer allocated
# for max_length + libraries, heap and the prefill's activations.
GENAI_PACKED_FACTOR = 1.31
GENAI_RUNTIME_MB = 80


def genai_peak_parts_mb(shape: ArchShape, plan: FormatPlan, context: int) -> dict[str, float]:
    """PROJECTION of an onnxruntime-genai process's peak memory, by part (MB)."""
    table = plan.format_of("embedding").tensor_bytes(shape.embedding_params()) / 1e6
    return {"process": PROCESS_BASELINE_MB, "prepacked weights": GENAI_PACKED_FACTOR * tensor_data_bytes(shape, plan) / 1e6,
            "mapped table": table if shape.tied_embeddings else 0.0,
            "kv cache (fp32)": 2 * shape.facts(plan).kv_bytes(context) / 1e6, "runtime": GENAI_RUNTIME_MB}


def projected_peak_memory_mb(shape: ArchShape, plan: FormatPlan, context: int, runtime: str) -> float:
    """PROJECTION of the runtime process's peak memory for a model of ``shape`` in ``plan``."""
    weights = tensor_data_bytes(shape, plan) / 1e6
    kv = shape.facts(plan).kv_bytes(context) / 1e6  # f16 cache, allocated up front
    if runtime == "llama.cpp":
        return PROCESS_BASELINE_MB + weights + kv + LLAMA_CPP_COMPUTE_MB + LLAMA_CPP_LOGITS_BATCH * shape.vocab * 4 / 1e6
    if runtime == "onnxruntime-genai":
        return sum(genai_peak_parts_mb(shape, plan, context).values())
    folded_head = shape.vocab * shape.hidden * 4 / 1e6  # onnxruntime folds the dequantized head to fp32 at start
    return PROCESS_BASELINE_MB + weights + folded_head + ONNXRUNTIME_ARENA_MB
