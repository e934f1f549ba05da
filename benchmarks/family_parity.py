"""Does each supported family's shipped file compute what its torch model computes?

For every family, a tiny random model of its transformers config with the family's own features
switched on (the builders of tests/test_families.py: q/k norms, NoPE blocks, fused projections,
LongRoPE, Llama 3 rope scaling, Gemma 3's windows and (1 + weight) norms) is written as GGUF in
Q8_0 and Q4_0, as the plain int4 ONNX decoder and as the onnxruntime-genai folder (with fp32
activations, accuracy level 0: the graph and codes alone; and as shipped, level 4: int8
activations), and each runtime's logits are compared with the torch model on the same grid
(``edgekd.methods.qat.convert``): KL(torch || runtime) and top-1 agreement over 3 x 64 random
tokens. This is the runtime floor the chain's parity checks sit on. A family onnxruntime-genai's
model builder refuses gets a row saying why.

    .venv/bin/python benchmarks/family_parity.py     # writes results/family_parity.json, about a minute
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from common import write_result

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parents[1] / "tests" / "helpers")]


def builders(tok, phi3_tok):
    import test_families as tf
    from tiny_models import make_tiny_llama

    longrope = {"rope_type": "longrope", "rope_theta": 100.0, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 32,
                "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]}

    return {
        "llama": (lambda: make_tiny_llama(len(tok)), tok),
        "llama (Llama 3 rope)": (lambda: tf.tiny_llama_rope(len(tok), tf.LLAMA3_ROPE), tok),
        "qwen3": (lambda: tf.tiny_qwen3(len(tok)), tok),
        "smollm3": (lambda: tf.tiny_smollm3(len(tok)), tok),
        "phi3": (lambda: tf.tiny_phi3(len(phi3_tok)), phi3_tok),
        "phi3 (LongRoPE)": (lambda: tf.tiny_phi3(len(phi3_tok), longrope), phi3_tok),
        "gemma3": (lambda: tf.tiny_gemma3(len(tok)), tok),
    }


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import numpy as np
    from tiny_models import train_tiny_tokenizer

    from edgekd.device import llamacpp, onnxgenai, onnxrt
    from edgekd.errors import EdgekdError
    from edgekd.exporters.gguf import export_gguf
    from edgekd.exporters.onnx import export_onnx
    from edgekd.exporters.onnx_genai import export_genai, unsupported_reason
    from edgekd.formats import FormatPlan
    from edgekd.methods.evaluate import evaluate, torch_logits_fn
    from edgekd.methods.qat import convert

    tok = train_tiny_tokenizer()
    phi3_tok = copy.deepcopy(tok)
    phi3_tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    blocks = np.random.default_rng(0).integers(3, len(tok), size=(3, 64)).astype(np.int32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, (build, tokenizer) in builders(tok, phi3_tok).items():
            model = build()
            # the plain ONNX export last: torch.export leaves the model's rotary buffers unfit for deepcopy
            for runtime, fmt in (("llama.cpp", "q8_0"), ("llama.cpp", "q4_0"), ("onnxruntime-genai, fp32 activations", "q4_0"),
                                 ("onnxruntime-genai", "q4_0"), ("onnxruntime", "q4_0")):
                plan = FormatPlan.uniform(fmt)
                ref = torch_logits_fn(convert(copy.deepcopy(model), plan))
                if runtime == "llama.cpp":
                    path = export_gguf(model, tokenizer, Path(tmp) / f"m-{fmt}.gguf", plan)
                    fn = llamacpp.logits_fn(path, blocks.shape[1], threads=1)
                elif runtime == "onnxruntime":
                    fn = onnxrt.logits_fn(export_onnx(model, Path(tmp) / "m.onnx", plan), threads=1)
                else:
                    level = 0 if "fp32" in runtime else 4
                    reason = unsupported_reason(model)
                    if reason:
                        rows.append({"family": family, "runtime": runtime, "format": fmt, "refused": reason})
                        continue
                    try:
                        path = export_genai(model, tokenizer, Path(tmp) / f"genai{level}" / "m.onnx", plan, 256, accuracy_level=level)
                    except EdgekdError as exc:
                        rows.append({"family": family, "runtime": runtime, "format": fmt, "refused": exc.problem})
                        print(rows[-1], file=sys.stderr, flush=True)
                        continue
                    fn = onnxgenai.logits_fn(path, threads=1)
                m = evaluate(fn, blocks, ref)
                rows.append({"family": family, "runtime": runtime, "format": fmt, "kl": m.kl_to_teacher, "top1": m.top1_agreement})
                print(rows[-1], file=sys.stderr, flush=True)
    write_result("family_parity", {"rows": rows, "tokens": int(blocks.size)})
    print("| family | runtime | format | KL(torch \\|\\| runtime) | top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['family']} | {r['runtime']} | {r['format']} | refused: {r['refused']} | |")
        else:
            print(f"| {r['family']} | {r['runtime']} | {r['format']} | {r['kl']:.2e} | {100 * r['top1']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
