"""Export a decoder as an ONNX model with a KV cache: fp32, or with the weights' block codes.

The only module that drives the ONNX exporter (``torch.onnx.export``, dynamo) and writes ONNX.

Interface (what onnxruntime-genai-style runners expect):
  inputs  ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq], ``position_ids``
          [batch, seq], ``past_key_values.N.key`` / ``.value`` [batch, kv_heads, past, head_dim]
  outputs ``logits`` [batch, seq, vocab], ``present.N.key`` / ``.value``
The first step feeds a past of length 0.

Quantized variants are not re-quantized from fp32 by onnxruntime's tools: every linear weight
becomes a ``MatMulNBits`` (com.microsoft) whose codes and scales are exactly the block codes and
fp16-rounded scales of its format in :mod:`edgekd.formats` (the format plan says which; for
Q4_0 4-bit codes with the default zero point 8), the embedding a ``GatherBlockQuantized`` over
its format's codes (Q8_0, stored +128), and the tied output head reads
the same codes through ``Cast -> Sub 128 -> Mul scale -> MatMul``. onnxruntime folds that
dequantization once, at session start, into an fp32 matrix whose every entry is exactly
``fp16(d) * q`` (an 11-bit mantissa times a small integer is exact in fp32): an 8-bit
``MatMulNBits`` has no fp32-activation kernel in onnxruntime and dequantized the whole
49,152 x 576 head on every call (most of each decoded token's time), while its int8-activation
mode (``accuracy_level=4``) changes the top-1 token too often. The cost is the folded fp32 head
in memory. Weights are found in the exported graph by content (the exporter folds ``W^T`` into
anonymous initializers).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError
from ..families import family_of
from ..fileio import atomic_path
from ..formats import FORMATS, FP32, FormatPlan, WeightFormat

IR_VERSION = 10  # onnxruntime 1.20+ reads IR <= 10 everywhere; newer exporters write higher
EXTERNAL_DATA_THRESHOLD = 512 * 1024 * 1024


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _decoder_wrapper(model: Any):
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class DecoderWithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # full-length layers for every block: a sliding-window block (Gemma 3) masks by position
            # instead of dropping old entries, so present.N is always past + seq long
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            presents = []
            for i in range(n_layers):
                layer = out.past_key_values.layers[i]
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return DecoderWithCache().eval()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_fp32_proto(model: Any) -> Any:
    """Trace the decoder with torch.export and return the fp32 ONNX ModelProto."""
    import torch

    cfg = model.config
    n_layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # batch >= 2 and lengths >= 2 in the example, or torch.export specialises those axes to 1
    b, s, p = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = tuple(torch.zeros(b, kv_heads, p, head_dim) for _ in range(2 * n_layers))
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "seq", "past_len", "total"))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    inputs, outputs = io_names(n_layers)
    try:
        with warnings.catch_warnings():  # the exporter's notes on axis names and torchvision ops are not ours to act on
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                _decoder_wrapper(model), (ids, mask, pos, *past), None, input_names=inputs, output_names=outputs,
                dynamic_shapes=dynamic, dynamo=True, opset_version=18, verbose=False,
            )
    except Exception as exc:
        raise EdgekdError(f"torch.onnx.export failed for this model ({type(exc).__name__}: {str(exc)[:300]})",
                          fix="export to GGUF instead, or report the model architecture") from None
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    for node in proto.graph.node:  # the exporter's per-node provenance: ~2 kB a node, unused at run time
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def _packed_codes(w: np.ndarray, fmt: WeightFormat) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits`` data: unsigned codes packed low nibble first, [N, K / block, block * bits / 8]
    uint8, and the fp32 scales flattened."""
    codes, scales = fmt.unsigned_codes(w)
    n, k = codes.shape
    if fmt.onnx_bits == 4:
        codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return codes.reshape(n, k // fmt.block, -1), scales.reshape(-1)


def _weight(module: Any) -> np.ndarray:
    return module.weight.detach().float().cpu().numpy()


def _quantize_graph(proto: Any, model: Any, plan: FormatPlan) -> Any:
    """Replace fp32 linear/embedding weights by MatMulNBits / GatherBlockQuantized on our codes."""
    from onnx import TensorProto, helper, numpy_helper

    family = family_of(model)
    graph = proto.graph
    # Tensors whose format ONNX cannot hold (no MatMulNBits kernel for its bit width, or a
    # per-block minimum) keep their fp32 initializer: the exact weights the runtime computes with.
    linear_by_digest: dict[str, tuple[np.ndarray, WeightFormat]] = {}  # digest of W^T -> (W, format)
    for layer, role, mod in family.linear_modules(model):
        fmt = plan.format_of(role, layer)
        if fmt.onnx_int_form("onnxruntime"):
            w = _weight(mod)
            linear_by_digest[_digest(w.T)] = (w, fmt)
    n_linear = len(linear_by_digest)
    if not family.tied(model) and plan.format_of("head").onnx_int_form("onnxruntime"):
        head = _weight(family.head_module(model))
        linear_by_digest[_digest(head.T)] = (head, plan.format_of("head"))
    emb = _weight(family.embedding_module(model))
    emb_fmt = plan.format_of("embedding")
    emb_native = emb_fmt.onnx_int_form("onnxruntime", embedding=True)
    emb_digest = _digest(emb) if emb_native else None

    inits = {i.name: i for i in graph.initializer}
    consumers = defaultdict(list)
    producers = {}
    for node in graph.node:
        for x in node.input:
            consumers[x].append(node)
        for y in node.output:
            producers[y] = node
    new_inits = []
    replaced = 0

    def matmul_nbits(node: Any, a: str, w: np.ndarray, fmt: WeightFormat, tag: str) -> Any:
        n, k = w.shape
        data, scales, bits = *_packed_codes(w, fmt), fmt.onnx_bits
        weight_name = f"{tag}.qweight"
        new_inits.append(numpy_helper.from_array(data, weight_name))
        new_inits.append(numpy_helper.from_array(scales, f"{tag}.scales"))
        return helper.make_node("MatMulNBits", [a, weight_name, f"{tag}.scales"], list(node.output), name=f"{tag}.MatMulNBits",
                                domain="com.microsoft", K=k, N=n, bits=bits, block_size=fmt.block, accuracy_level=0)

    # The tied table is stored once, as [vocab, hidden/32, 32] uint8 codes offset to unsigned
    # (Q8_0: +128): the layout MatMulNBits reads, and a 3-D input GatherBlockQuantized accepts
    # (quantize_axis=2).
    # Other embedding formats stay an fp32 table (exact values).
    emb_data, emb_scales = emb_fmt.unsigned_codes(emb) if emb_native else (None, None)
    vocab, hidden = emb.shape
    block = emb_fmt.block
    emb_name = "embedding.qweight"
    emb_used = False

    def gather_block_quantized(node: Any) -> list[Any]:
        new_inits.append(numpy_helper.from_array(np.array([hidden], np.int64), "embedding.hidden"))
        out = node.output[0]
        return [
            helper.make_node("GatherBlockQuantized", [emb_name, node.input[1], "embedding.scales"], [f"{out}.blocks"],
                             name="embedding.GatherBlockQuantized", domain="com.microsoft",
                             gather_axis=0, quantize_axis=2, block_size=block, bits=emb_fmt.onnx_bits),
            helper.make_node("Shape", [node.input[1]], [f"{out}.ids_shape"], name="embedding.Shape"),
            helper.make_node("Concat", [f"{out}.ids_shape", "embedding.hidden"], [f"{out}.shape"], name="embedding.Concat", axis=0),
            helper.make_node("Reshape", [f"{out}.blocks", f"{out}.shape"], [out], name="embedding.Reshape"),
        ]

    def dequantized_head(node: Any) -> list[Any]:
        new_inits.append(numpy_helper.from_array(np.array([vocab, hidden], np.int64), "head.shape"))
        new_inits.append(numpy_helper.from_array(np.array(float(1 << (emb_fmt.onnx_bits - 1)), np.float32), "head.zero_point"))
        w = "head.weight"
        return [
            helper.make_node("Cast", [emb_name], [f"{w}.codes"], name="head.Cast", to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{w}.codes", "head.zero_point"], [f"{w}.centered"], name="head.Sub"),
            helper.make_node("Mul", [f"{w}.centered", "embedding.scales"], [f"{w}.blocks"], name="head.Mul"),
            helper.make_node("Reshape", [f"{w}.blocks", "head.shape"], [f"{w}.rows"], name="head.Reshape"),
            helper.make_node("Transpose", [f"{w}.rows"], [f"{w}.t"], name="head.Transpose", perm=[1, 0]),
            helper.make_node("MatMul", [node.input[0], f"{w}.t"], list(node.output), name="head.MatMul"),
        ]

    nodes = []
    for idx, node in enumerate(graph.node):
        if node.op_type == "MatMul" and node.input[1] in inits:
            w_t = numpy_helper.to_array(inits[node.input[1]])
            hit = linear_by_digest.get(_digest(w_t)) if w_t.ndim == 2 else None
            if hit is not None:
                nodes.append(matmul_nbits(node, node.input[0], hit[0], hit[1], f"linear{idx}"))
                replaced += 1
                continue
        if node.op_type == "MatMul" and node.input[1] in producers and producers[node.input[1]].op_type == "Transpose":
            src = producers[node.input[1]].input[0]
            if src in inits and _digest(numpy_helper.to_array(inits[src])) == emb_digest:
                nodes.extend(dequantized_head(node))
                emb_used = True
                replaced += 1
                continue
        if node.op_type == "Gather" and node.input[0] in inits and _digest(numpy_helper.to_array(inits[node.input[0]])) == emb_digest:
            nodes.extend(gather_block_quantized(node))
            emb_used = True
            replaced += 1
            continue
        nodes.append(node)
    if emb_used:
        new_inits.append(numpy_helper.from_array(emb_data.reshape(vocab, hidden // block, block), emb_name))
        new_inits.append(numpy_helper.from_array(emb_scales.reshape(vocab, hidden // block, 1), "embedding.scales"))
    if replaced < n_linear + int(emb_native):
        raise EdgekdError(f"int ONNX: found {replaced} of {n_linear + 2 * int(emb_native)} weight uses to quantize in the exported graph",
                          fix="this model's graph is not supported for int4 ONNX export; export fp32 ONNX or GGUF")
    del graph.node[:]
    graph.node.extend(nodes)

    graph.initializer.extend(new_inits)
    # drop fp32 weights (and Transposes) that nothing reads any more
    _prune_unused(graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def _kept_on_their_grids(proto: Any, model: Any, plan: FormatPlan) -> None:
    """Put the weights that stay fp32 initializers (formats ONNX does not hold) on their formats'
    grids, so the file computes what the plan ships whatever weights ``model`` holds."""
    from onnx import numpy_helper

    from ..methods.qat import grids, weight_names

    family = family_of(model)
    fixed, names = grids(model), weight_names(model)
    exact: dict[str, np.ndarray] = {}  # digest of the initializer's array -> its round trip
    tensors = [(plan.format_of(role, layer), mod) for layer, role, mod in family.linear_modules(model)]
    tensors.append((plan.format_of("embedding"), family.embedding_module(model)))
    if not family.tied(model):
        tensors.append((plan.format_of("head"), family.head_module(model)))
    for fmt, mod in tensors:
        if fmt.identity:
            continue
        w = _weight(mod)
        shipped = fmt.shipped(w, fixed.get(names[id(mod)]))
        exact[_digest(w)] = shipped
        exact[_digest(w.T)] = np.ascontiguousarray(shipped.T)
    for init in proto.graph.initializer:
        if init.data_type == 1 and len(init.dims) == 2:  # fp32 matrices only
            hit = exact.get(_digest(numpy_helper.to_array(init)))
            if hit is not None:
                init.CopyFrom(numpy_helper.from_array(hit.astype(np.float32), init.name))


def set_bench_facts(proto: Any, model: Any, weight_format: str) -> dict[str, str]:
    """Write what `edgekd bench` needs for its roofline projection into the model's metadata,
    readable through onnxruntime alone (edgekd.device.onnxrt.Decoder.model_facts); returns it."""
    import onnx

    facts = {"params": str(sum(p.numel() for p in model.parameters())),
             "attention_heads": str(model.config.num_attention_heads), "weight_format": weight_format}
    onnx.helper.set_model_props(proto, {f"edgekd.{k}": v for k, v in facts.items()})
    return facts


def _prune_unused(graph: Any) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if not (set(n.output) & used)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {x for n in graph.node for x in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def onnx_file_format(plan: FormatPlan | None) -> str:
    """The format an ONNX export of a model with ``plan`` carries: the linear layers' own format
    where ONNX has a kernel for it (its ``onnx_file_format``), else f32 weights."""
    return FP32 if plan is None else plan.format_of("linear").onnx_file_format


def export_onnx(model: Any, path: str | Path, plan: FormatPlan | None = None) -> Path:
    """Write ``model`` to ``path`` (``.onnx``; large weights go to ``<name>.data`` beside it): with
    the block codes of ``plan`` where :func:`onnx_file_format` keeps them, else in fp32."""
    import onnx

    model = model.eval()
    weight_format = onnx_file_format(plan)
    proto = export_fp32_proto(model)
    quantized = FORMATS[weight_format].quantized
    if quantized:
        proto = _quantize_graph(proto, model, plan)
    if plan is not None:
        _kept_on_their_grids(proto, model, plan)
    set_bench_facts(proto, model, weight_format)
    path = Path(path)
    data_name = f"{path.name}.data"
    size = sum(i.ByteSize() for i in proto.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD or not quantized
    with atomic_path(path.parent / f"{path.stem}.onnx-export") as tmp_dir:
        tmp_dir.mkdir(parents=True)
        onnx.save_model(proto, str(tmp_dir / path.name), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    staged = path.parent / f"{path.stem}.onnx-export"
    # move the data file first: the .onnx appears only when its weights are in place
    if (staged / data_name).exists():
        (staged / data_name).replace(path.parent / data_name)
    elif (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    (staged / path.name).replace(path)
    shutil.rmtree(staged, ignore_errors=True)
    return path
