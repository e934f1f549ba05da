"""The CUDA path: distillation and QAT-KD steps with both models on one GPU, in bf16, through the
same code as the CPU path. Runs only where a GPU is (``pytest -m gpu``)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_distillation_step_on_the_gpu_matches_the_cpu_one():
    from conftest import make_tiny_llama

    from edgekd.methods.distill import DistillConfig
    from edgekd.methods.step_losses import distill_step_losses

    teacher, student = make_tiny_llama(300, layers=4, seed=0), make_tiny_llama(300, layers=2, seed=1).train()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(steps=1, batch_size=2, w_hidden=1.0, w_attention=1.0)
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    cpu = distill_step_losses(student, teacher, ids, cfg, [0, 3])
    cpu["loss"].backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    teacher.cuda(), student.cuda()
    gpu = distill_step_losses(student, teacher, ids.cuda(), cfg, [0, 3])
    gpu["loss"].backward()
    assert gpu["loss"].item() == pytest.approx(cpu["loss"].item(), rel=1e-3)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), want[n], rtol=1e-2, atol=1e-4, msg=n)


def test_compress_runs_on_the_gpu_in_bf16(tiny_model_dir, small_corpus_file, tmp_path, tiny_profile_overrides):
    import edgekd

    report = edgekd.compress(tiny_model_dir, "raspberry-pi-5", small_corpus_file, output=tmp_path, run_name="gpu",
                             overrides=[*tiny_profile_overrides, "compression.distill.precision=bf16"], quiet=True)
    distill = report.stage("distill")
    assert distill.settings["precision"] == "bf16" and distill.metrics["steps"] == 4
    assert all(np.isfinite(h) for h in [distill.metrics["final_loss"]])
    assert (tmp_path / "gpu" / "model-q4_0.gguf").exists()
