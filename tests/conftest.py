"""Shared fixtures: a tiny random Llama-family model with a real (small) BPE tokenizer.

Built from a config at test time, so the default tier needs no network and no model files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from tiny_models import corpus_text, make_tiny_llama, train_tiny_tokenizer  # noqa: E402

__all__ = ["make_tiny_llama"]  # tests import it from here


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text(corpus_text(30), encoding="utf-8")
    return path


# keep the end-to-end runs on the tiny model fast (formats and width fixed: no planner)
TINY_OVERRIDES = ("deployment.tensor_formats={}", "compression.prune.mlp_keep_fraction=1.0", "compression.data.block_len=64",
                  "compression.evaluation.max_heldout_blocks=4", "compression.prune.keep_layers=3", "compression.prune.calibration_blocks=4",
                  "compression.distill.steps=4", "compression.distill.batch_size=2", "compression.distill.checkpoint_every=2",
                  "compression.qat.steps=2")


@pytest.fixture
def tiny_profile_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_gguf_of(tiny_model_dir, tmp_path_factory):
    """The tiny model written as a GGUF in a format (``tiny_gguf_of("q8_0")``), once per format."""
    made = {}

    def make(fmt: str) -> Path:
        if fmt not in made:
            pytest.importorskip("llama_cpp")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from edgekd.exporters.gguf import export_gguf
            from edgekd.formats import FormatPlan

            model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
            made[fmt] = export_gguf(model, tok, tmp_path_factory.mktemp("gguf") / f"tiny-{fmt}.gguf", FormatPlan.uniform(fmt),
                                    source_name="tiny")
        return made[fmt]

    return make


def skip_costs_by_full_passes(model, blocks) -> list[float]:
    """KL to the teacher with each decoder block skipped, each a full forward pass with the block's
    output replaced by its input: the reference the planner's replayed block skips are held to."""
    from edgekd.methods.prune import decoder_layers, skip_block
    from edgekd.methods.sensitivity import _KLMeter

    meter = _KLMeter(model, blocks)
    costs = []
    for layer in decoder_layers(model):
        handle = layer.register_forward_hook(skip_block, with_kwargs=True)
        try:
            costs.append(meter.kl(model))
        finally:
            handle.remove()
    return costs
