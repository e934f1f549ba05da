"""What every benchmark starts from: the default profile, teacher and corpus blocks, and where results go.

The scripts in this folder run as ``.venv/bin/python benchmarks/<script>.py``, so this module is
importable as ``common``. Everything a benchmark measures is computed by edgekd's own methods
(edgekd.methods, edgekd.exporters, edgekd.device): a table row is the recipe a run uses.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROFILE = "raspberry-pi-5"
PRUNED_LAYERS = 24  # the default run's student: the deepest one under the Pi 5's 80 MB budget


def default_setup(teacher: str | None = None, blocks: str | None = None) -> types.SimpleNamespace:
    """The default profile, the teacher (``teacher``: a GGUF or HF directory; None: the embedded
    one) and the default corpus's blocks, as the pipeline makes them: ``train``, ``heldout`` (the
    evaluation's first blocks) and ``calibration``. ``blocks``: an npz written by
    ``qat_recipe.py --write-blocks``, so another machine scores the same tokens."""
    import numpy as np

    import edgekd
    from edgekd.methods.data import calibration_blocks, load_corpus
    from edgekd.methods.models import load_causal_lm, resolve_model_source

    prof = edgekd.load_profile(PROFILE)
    source = resolve_model_source(teacher)
    loaded = load_causal_lm(source)
    if blocks:
        data = np.load(blocks)
        train, heldout, calib = data["train"], data["heldout"], data["calibration"]
    else:
        corpus = load_corpus(None, loaded.tokenizer, prof.compression.data.block_len, prof.compression.evaluation.heldout_fraction)
        train = corpus.train
        heldout = corpus.heldout[: prof.compression.evaluation.max_heldout_blocks]
        calib = calibration_blocks(train, prof.compression.prune.calibration_blocks)
    return types.SimpleNamespace(profile=prof, source=source, teacher=loaded, train=train, heldout=heldout, calibration=calib)


def pruned_student_plan(setup: types.SimpleNamespace, layers: int = PRUNED_LAYERS) -> Any:
    """The default run's prune plan at ``layers`` blocks (Block Influence on the calibration blocks)."""
    from edgekd.methods.prune import PrunePlan, score_blocks, select_layers

    scores = score_blocks(setup.teacher.model, setup.calibration)
    return PrunePlan(select_layers(scores, layers, "block_influence"))


def heldout_metrics(model: Any, setup: types.SimpleNamespace) -> dict[str, float]:
    """Perplexity, KL to the teacher and top-1 agreement on the held-out blocks, in torch."""
    from edgekd.methods.evaluate import evaluate, torch_logits_fn

    m = evaluate(torch_logits_fn(model), setup.heldout, torch_logits_fn(setup.teacher.model))
    return {"perplexity": m.perplexity, "kl_to_teacher": m.kl_to_teacher, "top1_agreement": m.top1_agreement}


def license_blocks(tokenizer: Any, block_len: int) -> Any:
    """Out-of-domain evaluation text: CPython's LICENSE.txt (legal English prose; ships with every
    Python), tokenised and packed like the corpus."""
    import sysconfig

    from edgekd.methods.data import Document, pack, tokenize_documents

    text = (Path(sysconfig.get_path("stdlib")) / "LICENSE.txt").read_text(encoding="utf-8")
    return pack(tokenize_documents([Document("license", text)], tokenizer), block_len)


def write_result(name: str, result: dict[str, Any]) -> Path:
    """``results/<name>.json`` with the host and library versions it was measured with."""
    from edgekd.versions import host_info, library_versions

    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "host": host_info(), "versions": library_versions()}, indent=2) + "\n")
    return out


def concatenating_kv_cache(capacity: int):
    """transformers' ``DynamicCache``, grown by concatenation: the reference edgekd's in-place sampling
    cache (edgekd.methods.kv_cache.decode_cache) is measured against; ``capacity`` unused."""
    from transformers import DynamicCache

    return DynamicCache()
