"""Export a decoder as an onnxruntime-genai model folder, carrying the exact block codes of its plan.

The only module that drives onnxruntime-genai's model builder
(``python -m onnxruntime_genai.models.builder``, the interface its documentation gives). The
builder writes the graph onnxruntime-genai and its Android / iOS bindings run: one fused
``GroupQueryAttention`` per block (rotary embedding and an in-place KV cache inside it),
``SkipSimplifiedLayerNormalization`` for residual + norm, Q/K/V and gate/up products packed
where a block gives their parts one format, the head for the last position only, and a
``genai_config.json`` with the tokenizer files beside the model.

The builder is run in fp32 and its weights are then swapped for the plan's own codes, never
re-quantized: its int4 path quantizes with onnxruntime's ``MatMulNBitsQuantizer`` (round to
nearest on its own scales), which is not the Q4_0 grid QAT trained on. Every ``MatMul`` weight
of the built graph is matched by content to the student's linear layers (a packed Q/K/V or
gate/up product is the concatenation of its parts along N, and so are their codes and scales)
and becomes a ``MatMulNBits`` over exactly the codes and fp16-rounded scales of its format in
:mod:`edgekd.formats` (Q4_0: zero point 8, block 32). The tied embedding table is stored once:
a ``MatMulNBits`` for the output head and a ``GatherBlockQuantized`` for the embedding read the
same codes, so nothing is folded to fp32 at session start. A weight whose format has no
``MatMulNBits`` form keeps an fp32 initializer holding the values its format ships.

``accuracy_level=4``: the products quantize their activations to int8 per block of 32, as
llama.cpp's Q4_0/Q8_0 kernels do (its ``ggml_vec_dot_q4_0_q8_0``); onnxruntime has no
fp32-activation kernel for 8-bit weights (an 8-bit head took 81 ms a token against 0.66 ms with
int8 activations on this project's benchmark host), and with fp32 activations its 4-bit
products are 2.4x slower. The parity floor is therefore llama.cpp's, not fp32's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..device.onnxgenai import CONFIG_FILE, FACTS_FILE, available
from ..errors import EdgekdError
from ..families import family_of
from ..fileio import atomic_path
from ..formats import FP32, FormatPlan, WeightFormat
from .onnx import _packed_codes, _prune_unused, _weight, set_bench_facts

ACCURACY_LEVEL = 4
GENAI = "onnxruntime-genai"
PLAIN_FIX = "export the plain ONNX decoder instead (--set deployment.runtime=onnxruntime), or GGUF"
# HF architectures of edgekd's families that onnxruntime-genai 0.18's model builder builds with
# transformers 5 (tested: tests/test_export_genai.py, benchmarks/family_parity.py) ...
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
# ... and where it fails, measured, so the plain decoder ships instead
BUILDER_FAILS = {
    "SmolLM3ForCausalLM": "onnxruntime-genai 0.18's model builder fails on SmolLM3's blocks without rotary "
                          "(KeyError 'position_ids' in make_attention_qk_rope: its fused-rotary graph has no position input)",
    "Phi3ForCausalLM": "onnxruntime-genai 0.18's model builder does not read transformers 5's Phi-3 rope parameters "
                       "(KeyError 'multi_cache' in make_rotary_embedding_multi_cache)",
    "Gemma3ForCausalLM": "onnxruntime-genai 0.18's model builder does not read transformers 5's per-layer-type Gemma 3 "
                         "rope parameters (KeyError 'rope_type' in make_rope_init)",
}


def genai_file_format(plan: FormatPlan | None) -> str:
    """The format an onnxruntime-genai export of ``plan`` carries: its linear layers' format where
    MatMulNBits holds it, else f32 weights."""
    fmt = plan.format_of("linear") if plan is not None else None
    return fmt.name if fmt is not None and fmt.onnx_int_form(GENAI) else FP32


def unsupported_reason(model: Any) -> str | None:
    """Why onnxruntime-genai cannot carry ``model`` (None when it can)."""
    if not available():
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if arch in BUILDER_FAILS:
        return BUILDER_FAILS[arch]
    if arch not in SUPPORTED_ARCHITECTURES:
        return f"onnxruntime-genai's model builder does not build {arch}"
    return None


class BuilderFailed(EdgekdError):
    """onnxruntime-genai's model builder could not build this model (the plain decoder can ship instead)."""


def _same_format(model: Any, plan: FormatPlan, roles: tuple[str, ...]) -> bool:
    """Every block gives ``roles`` one format: their products can be packed into one MatMulNBits."""
    return all(len({plan.format_of(role, layer).name for role in roles}) == 1 for layer in range(model.config.num_hidden_layers))


def _run_builder(hf_dir: Path, out_dir: Path, cache_dir: Path, fuse_qkv: bool, fuse_gate_up: bool) -> None:
    # prune_lm_head: the head for the last position only (prefill computes one row of logits, as an app needs)
    options = ["hf_token=false", "prune_lm_head=true", f"fuse_qkv={str(fuse_qkv).lower()}",
               f"fuse_mlp_gate_up={str(fuse_gate_up).lower()}"]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", "fp32", "-e", "cpu", "-c", str(cache_dir), "--extra_options", *options]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # the model is local; never reach the Hub
    # the builder stamps the graph with `git rev-parse HEAD` run beside its own files, which inside a
    # virtual environment in a git checkout is that checkout's commit, not onnxruntime-genai's: with
    # no repository to find, it stamps the commit its wheel records (and the file's bytes stop
    # depending on the user's working tree)
    env["GIT_DIR"] = os.devnull
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out_dir / "model.onnx").is_file():
        tail = (proc.stderr.strip() or proc.stdout.strip())[-600:]
        raise BuilderFailed("onnxruntime-genai's model builder failed on this model", details=[tail], fix=PLAIN_FIX)


class _WeightIndex:
    """The student's linear weights, found by content: the first row of W (a column of W^T) ->
    candidates; a built MatMul weight is split into the parts it concatenates."""

    def __init__(self) -> None:
        self.by_row: dict[bytes, list[tuple[np.ndarray, WeightFormat]]] = {}

    def add(self, w: np.ndarray, fmt: WeightFormat) -> None:
        self.by_row.setdefault(np.ascontiguousarray(w[0]).tobytes(), []).append((w, fmt))

    def split(self, b: np.ndarray) -> list[tuple[np.ndarray, WeightFormat]] | None:
        """``b`` = [K, N] as the builder stores it: the parts (W [n, K], format) whose W^T concatenate to it."""
        parts, col = [], 0
        while col < b.shape[1]:
            hit = None
            for w, fmt in self.by_row.get(np.ascontiguousarray(b[:, col]).tobytes(), ()):
                if col + w.shape[0] <= b.shape[1] and np.array_equal(b[:, col:col + w.shape[0]], w.T):
                    hit = (w, fmt)
                    break
            if hit is None:
                return None
            parts.append(hit)
            col += hit[0].shape[0]
        return parts


def _quantize_built_graph(proto: Any, model: Any, plan: FormatPlan, fixed_grids: dict[str, Any], accuracy_level: int) -> None:
    """Swap the fp32 weights of a built graph for the plan's codes (see the module docstring)."""
    from onnx import helper, numpy_helper

    from ..methods.qat import weight_names

    family = family_of(model)
    names = weight_names(model)
    graph = proto.graph
    index = _WeightIndex()
    tensors = [(mod, plan.format_of(role, layer)) for layer, role, mod in family.linear_modules(model)]
    tied = family.tied(model)
    if not tied:
        tensors.append((family.head_module(model), plan.format_of("head")))
    weight_grid = {}  # first row -> the K-quant grid fixed at conversion, for formats that ship fp32 values
    for mod, fmt in tensors:
        w = _weight(mod)
        index.add(w, fmt)
        weight_grid[w[0].tobytes()] = fixed_grids.get(names[id(mod)])
    emb = _weight(family.embedding_module(model))
    emb_fmt = plan.format_of("embedding")
    emb_grid = fixed_grids.get(names[id(family.embedding_module(model))])

    inits = {i.name: i for i in graph.initializer}
    producers = {y: n for n in graph.node for y in n.output}
    new_inits, nodes, replaced, expected = [], [], 0, len(tensors)

    def fp32_init(name: str, value: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))

    def nbits_node(node: Any, tag: str, k: int, n: int, fmt: WeightFormat) -> Any:
        """A MatMulNBits reading the initializers ``<tag>.qweight`` / ``<tag>.scales``."""
        return helper.make_node("MatMulNBits", [node.input[0], f"{tag}.qweight", f"{tag}.scales"], list(node.output),
                                name=f"{node.name}NBits", domain="com.microsoft", K=k, N=n, bits=fmt.onnx_bits,
                                block_size=fmt.block, accuracy_level=accuracy_level)

    emb_native = emb_fmt.onnx_int_form(GENAI, embedding=True)
    if emb_native:
        codes, scales = _packed_codes(emb, emb_fmt)
        new_inits.append(numpy_helper.from_array(codes, "embedding.qweight"))
        # one table of codes for both; the scales twice (3.5 MB at a 49k vocabulary), as MatMulNBits wants
        # them [N, blocks] and GatherBlockQuantized of the same rank as the codes
        new_inits.append(numpy_helper.from_array(scales.reshape(emb.shape[0], -1), "embedding.scales"))
        new_inits.append(numpy_helper.from_array(scales.reshape(emb.shape[0], -1, 1), "embedding.gather_scales"))
        new_inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "embedding.rows_shape"))
    emb_shipped = None if emb_native else emb_fmt.shipped(emb, emb_grid)

    def is_table(name: str, transposed: bool) -> bool:
        """The initializer ``name`` holds the embedding table (shape first: most weights are not it)."""
        if name not in inits or tuple(inits[name].dims) != (emb.T.shape if transposed else emb.shape):
            return False
        a = numpy_helper.to_array(inits[name])
        return np.array_equal(a.T if transposed else a, emb)

    def table_source(name: str) -> bool:
        """``name`` holds the embedding table, directly or through a Transpose of the tied head's weight."""
        if name in producers and producers[name].op_type == "Transpose":
            return is_table(producers[name].input[0], transposed=True)
        return is_table(name, transposed=False)

    for node in graph.node:
        if node.op_type == "Gather" and table_source(node.input[0]):
            replaced += 1
            if emb_native:
                blocks = f"{node.output[0]}/blocks"  # [batch, seq, hidden / block, block] -> [batch, seq, hidden]
                nodes.append(helper.make_node("GatherBlockQuantized", ["embedding.qweight", node.input[1], "embedding.gather_scales"],
                                              [blocks], name=f"{node.name}BlockQuantized", domain="com.microsoft",
                                              gather_axis=0, quantize_axis=2, block_size=emb_fmt.block, bits=emb_fmt.onnx_bits))
                nodes.append(helper.make_node("Reshape", [blocks, "embedding.rows_shape"], list(node.output), name=f"{node.name}/Reshape"))
                continue
            if node.input[0] in inits:  # an untied table of its own: the values its format ships
                fp32_init(node.input[0], emb_shipped)
        if node.op_type == "MatMul" and node.input[1] in inits:
            if tied and is_table(node.input[1], transposed=True):
                replaced += 1
                if emb_native:
                    n, k = emb.shape
                    nodes.append(nbits_node(node, "embedding", k, n, emb_fmt))  # the head reads the table's own codes
                    continue
                fp32_init(node.input[1], emb_shipped.T)
                nodes.append(node)
                continue
            b = numpy_helper.to_array(inits[node.input[1]])
            parts = index.split(b) if b.ndim == 2 else None
            if parts is None:
                raise EdgekdError(f"onnxruntime-genai export: the built weight {node.input[1]} is not one of the student's "
                                  "weights", fix=PLAIN_FIX)
            replaced += len(parts)
            fmts = {fmt.name for _, fmt in parts}
            if len(fmts) == 1 and parts[0][1].onnx_int_form(GENAI):
                fmt = parts[0][1]
                codes = [_packed_codes(w, fmt) for w, _ in parts]
                data = np.concatenate([c for c, _ in codes], axis=0)
                tag = node.input[1].removesuffix(".weight")
                new_inits.append(numpy_helper.from_array(data, f"{tag}.qweight"))
                new_inits.append(numpy_helper.from_array(np.concatenate([s for _, s in codes]), f"{tag}.scales"))
                nodes.append(nbits_node(node, tag, b.shape[0], b.shape[1], fmt))
                continue
            # a part whose format has no MatMulNBits kernel (or mixed formats): the fp32 values each part ships
            shipped = [fmt.shipped(w, weight_grid.get(w[0].tobytes())) if not fmt.identity else w for w, fmt in parts]
            fp32_init(node.input[1], np.concatenate(shipped, axis=0).T)
        nodes.append(node)
    if replaced < expected + 1:
        raise EdgekdError(f"onnxruntime-genai export: found {replaced} of {expected + 1} weight uses in the built graph",
                          fix=PLAIN_FIX)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _prune_unused(graph)


def _write_config(folder: Path, onnx_name: str, context_length: int, meta: dict[str, str]) -> None:
    path = folder / CONFIG_FILE
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["filename"] = onnx_name
    # the KV cache is allocated for max_length tokens (past_present_share_buffer): the profile's context
    cfg["search"]["max_length"] = min(int(context_length), int(cfg["model"]["context_length"]))
    path.write_text(json.dumps(cfg, indent=4))
    (folder / FACTS_FILE).write_text(json.dumps(meta, indent=2))


def export_genai(model: Any, tokenizer: Any, path: str | Path, plan: FormatPlan, context_length: int,
                 metadata: dict[str, str] | None = None, accuracy_level: int = ACCURACY_LEVEL) -> Path:
    """Write ``model`` as an onnxruntime-genai folder: ``path`` is the decoder (``<folder>/<name>.onnx``,
    weights in ``<name>.onnx.data``), ``genai_config.json`` and the tokenizer files beside it.
    ``accuracy_level`` 0 makes the products take fp32 activations (exact, and slower: for checks).

    Returns ``path``. The folder appears complete or not at all."""
    import onnx

    from ..methods.qat import grids

    reason = unsupported_reason(model)
    if reason:
        raise EdgekdError(f"cannot export for onnxruntime-genai: {reason}",
                          fix=PLAIN_FIX)
    path = Path(path)
    folder = path.parent
    with atomic_path(folder) as tmp:
        hf, built = tmp / "hf", tmp / "built"
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        # packed Q/K/V and gate/up products where each block gives their parts one format (a mixed
        # plan, say attn_v at Q8_0, keeps them apart so every part stays in its own int form)
        _run_builder(hf, built, tmp / "cache", fuse_qkv=_same_format(model, plan, ("attn_q", "attn_k", "attn_v")),
                     fuse_gate_up=_same_format(model, plan, ("ffn_gate", "ffn_up")))
        proto = onnx.load(str(built / "model.onnx"))
        _quantize_built_graph(proto, model, plan, grids(model), accuracy_level)
        # in the graph for plain onnxruntime, and in edgekd.json for onnxruntime-genai (its config refuses unknown keys)
        facts = set_bench_facts(proto, model, genai_file_format(plan))
        onnx.save_model(proto, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        for f in built.iterdir():  # genai_config.json, tokenizer and chat-template files
            if f.suffix not in (".onnx", ".data"):
                shutil.move(str(f), tmp / f.name)
        shutil.rmtree(hf)
        shutil.rmtree(built)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        _write_config(tmp, path.name, context_length, {**facts, **(metadata or {})})
    return path
