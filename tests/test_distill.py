import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd.methods.distill import (
    DistillConfig,
    distill,
)
from edgekd.methods.mixture import Mixture
from edgekd.methods.prune import make_student

WORKER = Path(__file__).parent / "helpers" / "distill_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run_worker(out_dir, steps, kill_at=None):
    args = [sys.executable, str(WORKER), str(out_dir), str(steps)] + ([str(kill_at)] if kill_at else [])
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)


def sample_indices(step, micro, cfg, n_blocks, rank, world):
    return Mixture.single(n_blocks).indices(step, micro, cfg, rank, world)[0]


def test_data_order_is_a_pure_function_and_ranks_are_disjoint():
    cfg = DistillConfig(steps=10, batch_size=3, grad_accum=2, seed=5)
    a = [sample_indices(s, m, cfg, 17, 0, 2) for s in range(3) for m in range(2)]
    b = [sample_indices(s, m, cfg, 17, 1, 2) for s in range(3) for m in range(2)]
    assert all(np.array_equal(x, sample_indices(s, m, cfg, 17, 0, 2)) for (s, m), x in zip([(s, m) for s in range(3) for m in range(2)], a))
    # within one epoch (17 blocks), the two ranks never share a block
    flat_a, flat_b = np.concatenate(a)[:8], np.concatenate(b)[:8]
    assert not set(flat_a) & set(flat_b)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    full = run_worker(tmp_path / "full", 8)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run_worker(tmp_path / "resumed", 8, kill_at=5)
    assert killed.returncode == -9  # SIGKILL after step 5; the last checkpoint is step 4
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert not (tmp_path / "resumed" / "rank-0.json").exists()
    resumed = run_worker(tmp_path / "resumed", 8)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "full" / "rank-0.json").read_text())
    b = json.loads((tmp_path / "resumed" / "rank-0.json").read_text())
    assert b["resumed_from"] == 4
    assert b["seen"] == a["seen"][len(a["seen"]) - len(b["seen"]):]  # the same batches, replayed
    assert a["digest"] == b["digest"]


def test_two_processes_see_different_data_and_end_identical(tmp_path):
    """Under a (distant) deadline, so each step's stop decision is broadcast from the main process:
    the ranks still train every step and end identical."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), str(tmp_path), "4"]
    proc = subprocess.run(cmd, env={**ENV, "DISTILL_DEADLINE_S": "3600"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank-0.json").read_text())
    r1 = json.loads((tmp_path / "rank-1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert not set(r0["seen"]) & set(r1["seen"])
    assert r0["digest"] == r1["digest"]


def test_distillation_reduces_kl_to_teacher():
    from conftest import make_tiny_llama

    from edgekd.methods.evaluate import evaluate, torch_logits_fn

    torch.manual_seed(0)
    teacher = make_tiny_llama(200, layers=4, seed=1)
    with torch.no_grad():  # a random model is near-uniform and its blocks barely matter: make both untrue
        teacher.model.norm.weight.mul_(10.0)
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight.mul_(5.0)
            layer.mlp.down_proj.weight.mul_(5.0)
    student = make_student(teacher, [0, 3])
    rng = np.random.default_rng(0)
    train = rng.integers(0, 200, size=(32, 24)).astype(np.int32)
    held = rng.integers(0, 200, size=(6, 24)).astype(np.int32)
    before = evaluate(torch_logits_fn(student), held, torch_logits_fn(teacher)).kl_to_teacher
    cfg = DistillConfig(steps=40, batch_size=4, learning_rate=3e-3, alpha=1.0, temperature=1.0, w_hidden=0.5)
    out = distill(student, teacher, train, cfg, [0, 3])
    after = evaluate(torch_logits_fn(student), held, torch_logits_fn(teacher)).kl_to_teacher
    assert after < 0.7 * before
    assert out.tokens == 40 * 4 * 24 and len(out.history) == 40
    assert not student.training


def test_logit_cache_matches_live_teacher_at_full_k_and_skips_the_teacher(tmp_path):
    from conftest import make_tiny_llama

    from edgekd.methods import logit_cache

    teacher = make_tiny_llama(64, layers=2, seed=4)
    blocks = np.random.default_rng(0).integers(0, 64, size=(6, 16)).astype(np.int32)
    cache = logit_cache.build(teacher, blocks, k=64, temperature=2.0, directory=tmp_path / "c")
    assert cache.indices.shape == (6, 15, 64) and cache.logprobs.dtype == np.float32
    again = logit_cache.load(tmp_path / "c", 64, 2.0, blocks)
    assert again is not None and np.array_equal(again.indices, cache.indices)
    assert logit_cache.load(tmp_path / "c", 32, 2.0, blocks) is None  # other settings: rebuilt
    cfg = DistillConfig(steps=3, batch_size=2, alpha=1.0, temperature=2.0, learning_rate=1e-3)
    live = make_student(teacher, [0])
    cached = make_student(teacher, [0])
    out_live = distill(live, teacher, blocks, cfg, [0])
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    out_cached = distill(cached, teacher, blocks, cfg, [0], logit_cache=cache)
    handle.remove()
    assert calls == []  # no teacher forward with a cache and only logit losses
    for a, b in zip(out_live.history, out_cached.history):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-3)  # full k: the same loss


def test_bf16_autocast_runs_the_forward_in_bf16_with_fp32_master_weights():
    from conftest import make_tiny_llama

    from edgekd.methods.precision import resolve_precision
    from edgekd.methods.step_losses import distill_step_losses

    teacher = make_tiny_llama(120, layers=3, seed=2)
    student = make_student(teacher, [0, 2])
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 120, size=(2, 32)))
    seen = []
    handle = student.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    fp32 = distill_step_losses(student, teacher, ids, DistillConfig(steps=1, w_hidden=1.0, w_attention=0.0), [0, 2])
    bf16 = distill_step_losses(student, teacher, ids, DistillConfig(steps=1, w_hidden=1.0, precision="bf16"), [0, 2])
    handle.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert bf16["loss"].dtype == torch.float32  # losses are computed in fp32 on upcast logits
    assert bf16["loss"].item() == pytest.approx(fp32["loss"].item(), rel=0.05)
    assert bf16["loss"].item() != fp32["loss"].item()
    bf16["loss"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in student.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    from edgekd.methods.precision import bf16_supported

    assert resolve_precision("auto") == ("bf16" if bf16_supported() else "fp32")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hidden_state_cache_trains_exactly_as_the_live_teacher_without_its_blocks(tmp_path, precision):
    from conftest import make_tiny_llama

    from edgekd.methods import logit_cache

    teacher = make_tiny_llama(64, layers=2, seed=4)
    blocks = np.random.default_rng(0).integers(0, 64, size=(6, 16)).astype(np.int32)
    cache = logit_cache.build_hidden(teacher, blocks, tmp_path / "h", precision, batch_size=2)
    assert cache.hidden.shape == (6, 15, teacher.config.hidden_size) and cache.bytes_per_token == (2 if precision == "bf16" else 4) * 64
    assert logit_cache.load(tmp_path / "h", None, 2.0, blocks, "hidden", precision) is not None
    other = "fp32" if precision == "bf16" else "bf16"
    assert logit_cache.load(tmp_path / "h", None, 2.0, blocks, "hidden", other) is None  # another precision: rebuilt
    cfg = DistillConfig(steps=3, batch_size=2, alpha=0.5, temperature=2.0, learning_rate=1e-3, precision=precision)
    live, cached = make_student(teacher, [0, 1]), make_student(teacher, [0, 1])
    out_live = distill(live, teacher, blocks, cfg, [0, 1])
    calls, heads = [], []
    handles = [teacher.model.layers[0].register_forward_hook(lambda *a: calls.append(1)),
               teacher.lm_head.register_forward_pre_hook(lambda m, a: heads.append(m.weight.dtype))]
    out_cached = distill(cached, teacher, blocks, cfg, [0, 1], logit_cache=cache)
    for h in handles:
        h.remove()
    assert calls == []  # no teacher block runs: its targets come from the cache through its head
    assert [a["kd"] for a in out_live.history] == [b["kd"] for b in out_cached.history]
    assert all(torch.equal(a, b) for a, b in zip(live.state_dict().values(), cached.state_dict().values()))
    with pytest.raises(ValueError, match="precision|built for"):
        distill(make_student(teacher, [0, 1]), teacher, blocks, DistillConfig(steps=1, precision=other), [0, 1], logit_cache=cache)


def test_a_hidden_state_cache_holds_the_blocks_the_steps_read_and_no_more(tmp_path):
    from conftest import make_tiny_llama

    from edgekd.methods import logit_cache

    teacher = make_tiny_llama(64, layers=2, seed=4)
    blocks = np.random.default_rng(0).integers(0, 64, size=(40, 16)).astype(np.int32)
    cfg = DistillConfig(steps=3, batch_size=4, alpha=1.0, learning_rate=1e-3)
    rows = logit_cache.blocks_read(Mixture.single(len(blocks)), cfg, cfg.steps)
    whole = {int(i) for step in range(3) for i in sample_indices(step, 0, cfg, len(blocks), 0, 1)}
    assert whole <= set(rows.tolist()) and len(rows) < len(blocks)  # 3 steps of 4 read 12 of 40 (and their micro-batch splits)
    cache = logit_cache.build_hidden(teacher, blocks, tmp_path / "h", "fp32", rows=rows)
    assert cache.hidden.shape[0] == len(rows)
    distill(make_student(teacher, [0, 1]), teacher, blocks, cfg, [0, 1], logit_cache=cache)
    split = DistillConfig(steps=3, batch_size=1, grad_accum=4, alpha=1.0, learning_rate=1e-3)  # as the memory check may split it
    distill(make_student(teacher, [0, 1]), teacher, blocks, split, [0, 1], logit_cache=cache)
    assert logit_cache.load(tmp_path / "h", None, 2.0, blocks, "hidden", "fp32", rows=np.arange(len(blocks))) is None
    with pytest.raises(ValueError, match="not built for"):
        distill(make_student(teacher, [0, 1]), teacher, blocks, DistillConfig(steps=20, batch_size=4), [0, 1], logit_cache=cache)


def test_the_step_probe_of_a_stage_shorter_than_its_probes_reads_only_cached_blocks(tmp_path):
    """A smoke run (``--set compression.distill.steps=1``) under a time budget: the probe's three
    steps must read the blocks of the one planned step, which is all its hidden-state cache holds."""
    from conftest import make_tiny_llama

    from edgekd.methods import logit_cache
    from edgekd.methods.step_probe import probe_step_seconds

    teacher = make_tiny_llama(64, layers=2, seed=4).requires_grad_(False)
    blocks = np.random.default_rng(0).integers(0, 64, size=(40, 16)).astype(np.int32)
    cfg = DistillConfig(steps=1, batch_size=4, alpha=1.0, learning_rate=1e-3)
    rows = logit_cache.blocks_read(Mixture.single(len(blocks)), cfg, cfg.steps)
    cache = logit_cache.build_hidden(teacher, blocks, tmp_path / "h", "fp32", rows=rows)
    assert probe_step_seconds(make_student(teacher, [0, 1]), teacher, blocks, cfg, [0, 1], logit_cache=cache, probes=3) > 0
