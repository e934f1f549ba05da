"""The memory check: its prediction, the savings it turns on, its refusal, and the savings themselves."""

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from edgekd import EdgekdError
from edgekd.methods.distill import DistillConfig
from edgekd.methods.layout import training_layout
from edgekd.methods.memory import HEADROOM, estimate_training_memory, fit_memory
from edgekd.methods.optim import AdamWBf16Moments
from edgekd.methods.step_losses import distill_step_losses
from edgekd.pipeline.peak_memory import peak_memory

GB = 1e9
RESIDENT = 0.5 * GB


def _models():
    teacher = make_tiny_llama(300, layers=4, hidden=64, intermediate=128, seed=0)
    student = make_tiny_llama(300, layers=2, hidden=64, intermediate=128, seed=1)
    return teacher, student


def _cfg(**kw):
    return DistillConfig(**{"steps": 2, "batch_size": 4, "w_hidden": 1.0, "w_attention": 1.0, **kw})


def _total(teacher, student, cfg):
    return estimate_training_memory(teacher, student, cfg, 128, resident_bytes=RESIDENT).total


def test_estimate_grows_with_batch_and_attention_and_shrinks_with_each_saving():
    teacher, student = _models()
    plain = _total(teacher, student, _cfg())
    assert _total(teacher, student, _cfg(batch_size=8)) > plain
    assert _total(teacher, student, DistillConfig(steps=2, batch_size=4)) < plain  # no attention maps, no hidden targets
    ckpt = _total(teacher, student, _cfg(gradient_checkpointing=True))
    both = _total(teacher, student, _cfg(gradient_checkpointing=True, optimizer_state="bf16"))
    assert both < ckpt < plain
    plan = estimate_training_memory(teacher, student, _cfg(), 128, resident_bytes=RESIDENT)
    assert plan.total == pytest.approx(sum(plan.parts.values())) and plan.parts["resident_now"] == RESIDENT


def test_fit_memory_turns_savings_on_cheapest_first_from_a_constructed_limit():
    teacher, student = _models()
    cfg = _cfg()
    totals = {"plain": _total(teacher, student, cfg), "ckpt": _total(teacher, student, _cfg(gradient_checkpointing=True)),
              "bf16": _total(teacher, student, _cfg(gradient_checkpointing=True, optimizer_state="bf16")),
              "micro": _total(teacher, student, _cfg(gradient_checkpointing=True, optimizer_state="bf16", batch_size=2, grad_accum=2))}

    def fitted(total):
        chosen, plan = fit_memory(teacher, student, cfg, 128, total / HEADROOM * 1.0001, resident_bytes=RESIDENT)
        return chosen, plan

    chosen, _ = fitted(totals["plain"])
    assert (chosen.gradient_checkpointing, chosen.optimizer_state) == (False, "fp32")
    chosen, plan = fitted(totals["ckpt"])
    assert (chosen.gradient_checkpointing, chosen.optimizer_state) == (True, "fp32")
    assert plan.settings()["gradient_checkpointing"] is True
    chosen, _ = fitted(totals["bf16"])
    assert (chosen.gradient_checkpointing, chosen.optimizer_state, chosen.batch_size) == (True, "bf16", 4)
    chosen, _ = fitted(totals["micro"])
    assert (chosen.batch_size, chosen.grad_accum) == (2, 2)  # the same tokens per optimizer step
    assert cfg.gradient_checkpointing is False and cfg.batch_size == 4  # the caller's config is left alone


def test_refusal_names_the_memory_that_would_fit_and_the_closest_settings():
    teacher, student = _models()
    smallest = _total(teacher, student, _cfg(gradient_checkpointing=True, optimizer_state="bf16", batch_size=1, grad_accum=4))
    with pytest.raises(EdgekdError) as exc:
        fit_memory(teacher, student, _cfg(), 128, 0.5 * smallest, resident_bytes=RESIDENT, stage="QAT-KD")
    text = str(exc.value)
    assert "QAT-KD needs about" in text and "gradient_checkpointing=True" in text and "optimizer_state=bf16" in text
    assert f"at least {smallest / HEADROOM / GB:.1f} GB" in text and "compression.memory_gb" in text


def test_the_cli_refuses_an_impossible_memory_limit_with_exit_code_2(tiny_model_dir, small_corpus_file, tmp_path, capsys,
                                                                    tiny_profile_overrides):
    from edgekd.cli import main

    args = ["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file), "--output", str(tmp_path),
            "--run-name", "tight", "--quiet", "--set", "compression.memory_gb=0.01"]
    for o in tiny_profile_overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "at least" in err and "Traceback" not in err
    assert not (tmp_path / "tight" / "student").exists()  # nothing half-written


def test_training_layout_gives_the_teacher_bf16_linears_and_restores_it_bit_for_bit(tmp_path):
    teacher, student = _models()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = _cfg(precision="bf16", gradient_checkpointing=True)
    with training_layout(student, teacher, cfg, tmp_path):
        assert teacher.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
        assert teacher.model.embed_tokens.weight.dtype == torch.float32  # the lookup is not autocast
        assert student.is_gradient_checkpointing
        assert list(tmp_path.glob("teacher-parked-*"))
    assert not student.is_gradient_checkpointing
    assert not list(tmp_path.glob("teacher-parked-*"))
    for k, v in teacher.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_teacher_the_cache_replaces_leaves_memory_and_comes_back_bit_for_bit(tmp_path, precision):
    teacher, student = _models()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logits_only = DistillConfig(steps=2, batch_size=4, precision=precision)
    with training_layout(student, teacher, logits_only, tmp_path, cached=True):
        assert all(p.numel() == 0 for p in teacher.parameters())
        assert len(list(tmp_path.glob("teacher-parked-*"))) == 1
    assert not list(tmp_path.glob("teacher-parked-*"))
    for k, v in teacher.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight or not teacher.config.tie_word_embeddings
    # a hidden-state loss still runs the teacher: it stays (bf16 linears at most)
    with training_layout(student, teacher, _cfg(precision=precision), tmp_path, cached=True):
        assert all(p.numel() for p in teacher.parameters())
    # the prediction takes the whole teacher off what is resident, and only when it is idle
    cached = estimate_training_memory(teacher, student, logits_only, 128, resident_bytes=RESIDENT, cached=True)
    live = estimate_training_memory(teacher, student, logits_only, 128, resident_bytes=RESIDENT)
    teacher_bytes = sum(p.numel() * 4 for p in teacher.parameters())
    assert cached.parts["teacher_held_less"] == -teacher_bytes and cached.teacher_parked and not live.teacher_parked
    assert cached.total < live.total - teacher_bytes / 2


def test_bf16_linears_give_the_teacher_the_same_logits_under_autocast():
    teacher, student = _models()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = teacher(input_ids=ids).logits
        with training_layout(student, teacher, _cfg(precision="bf16")):
            got = teacher(input_ids=ids).logits
    assert torch.equal(got, want)


def test_micro_batches_give_the_same_gradients_as_the_whole_batch():
    teacher, student = _models()
    student.train()
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    layer_map = [0, 3]
    cfg = DistillConfig(steps=1, batch_size=4, w_hidden=1.0)
    distill_step_losses(student, teacher, ids, cfg, layer_map)["loss"].backward()
    whole = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    for half in (ids[:2], ids[2:]):
        (distill_step_losses(student, teacher, half, cfg, layer_map)["loss"] / 2).backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, whole[n], rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_gives_the_same_gradients():
    teacher, student = _models()
    student.train()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    cfg = DistillConfig(steps=1, batch_size=2, w_hidden=1.0)
    distill_step_losses(student, teacher, ids, cfg, [0, 3])["loss"].backward()
    plain = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    with training_layout(student, teacher, DistillConfig(steps=1, gradient_checkpointing=True)):
        distill_step_losses(student, teacher, ids, cfg, [0, 3])["loss"].backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_moments_follow_adamw_and_resume_from_its_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ours = AdamWBf16Moments(twin.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(20):
        for m, opt in ((model, ref), (twin, ours)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert (a - b).abs().max() < 0.02 * a.abs().max()  # 20 steps of lr 1e-2: bf16 moments stay on AdamW's path
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in ours.state.values())
    resumed = AdamWBf16Moments(model.parameters(), lr=1e-2)
    resumed.load_state_dict(ref.state_dict())  # an fp32 AdamW checkpoint
    torch.nn.functional.mse_loss(model(x), y).backward()
    resumed.step()
    assert all(s["exp_avg"].dtype == torch.bfloat16 and float(s["step"]) == 21 for s in resumed.state.values())


def test_peak_memory_sees_an_allocation_inside_the_block():
    with peak_memory() as pm:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        del block
    assert pm.peak_mb is not None and pm.peak_mb >= pm.start_mb + 250
    assert pm.method in ("VmHWM", "sampled")


def _train(cfg, qat: bool = False):
    from edgekd.formats import FormatPlan
    from edgekd.methods.distill import distill
    from edgekd.methods.qat import prepare

    teacher, student = _models()
    if qat:
        prepare(student, FormatPlan.uniform("q4_0"))
    blocks = np.random.default_rng(3).integers(0, 300, size=(8, 32)).astype(np.int32)
    distill(student, teacher, blocks, cfg, [0, 3])
    return student


@pytest.mark.parametrize("qat,max_norm", [(False, 0.0), (True, 0.0), (True, 1e-3)])
def test_bf16_gradients_train_exactly_as_fp32_ones_under_bf16_autocast(qat, max_norm):
    kw = dict(steps=3, batch_size=2, w_hidden=1.0, precision="bf16", optimizer_state="bf16", max_grad_norm=max_norm,
              gradient_checkpointing=True, checkpoint_every=10**6)
    plain = _train(DistillConfig(**kw), qat)
    held = _train(DistillConfig(**kw, gradient_dtype="bf16"), qat)
    for (name, a), b in zip(plain.state_dict().items(), held.state_dict().values()):
        if max_norm:  # the clip's norm is summed in another order: equal to rounding (1% of one step of lr 1e-4,
            # where Adam's eps amplifies an ulp of a tiny clipped gradient)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), name


def test_bf16_gradients_are_a_rung_of_the_ladder_and_count_half():
    teacher, student = _models()
    cfg = _cfg(precision="bf16", gradient_checkpointing=True, optimizer_state="bf16")
    fp32_grads = estimate_training_memory(teacher, student, cfg, 128, resident_bytes=RESIDENT)
    bf16_grads = estimate_training_memory(teacher, student, _cfg(precision="bf16", gradient_checkpointing=True,
                                          optimizer_state="bf16", gradient_dtype="bf16"), 128, resident_bytes=RESIDENT)
    assert bf16_grads.parts["gradients"] < fp32_grads.parts["gradients"] and bf16_grads.gradient_dtype == "bf16"
    chosen, plan = fit_memory(teacher, student, _cfg(precision="bf16"), 128, bf16_grads.total / HEADROOM * 1.0001,
                              resident_bytes=RESIDENT)
    assert (chosen.gradient_checkpointing, chosen.optimizer_state, chosen.gradient_dtype, chosen.batch_size) == (True, "bf16", "bf16", 4)
    assert plan.settings()["gradient_dtype"] == "bf16"


def test_bf16_gradients_lower_no_qat_estimate_so_a_qat_step_keeps_fp32_ones():
    """A QAT step's peak sits in its forward pass: bf16 gradients are not credited there, so no
    memory target or limit turns them on for QAT (they cost ~5% of its step)."""
    from edgekd.formats import FormatPlan
    from edgekd.methods.qat import fake_quantized_params

    teacher, student = _models()
    quantized = fake_quantized_params(student, FormatPlan.uniform("q4_0"))
    kw = dict(precision="bf16", gradient_checkpointing=True, optimizer_state="bf16", recompute_round_trips=True)
    fp32_grads = estimate_training_memory(teacher, student, _cfg(**kw), 128, quantized_params=quantized, resident_bytes=RESIDENT)
    bf16_grads = estimate_training_memory(teacher, student, _cfg(**kw, gradient_dtype="bf16"), 128, quantized_params=quantized,
                                          resident_bytes=RESIDENT)
    assert bf16_grads.total == fp32_grads.total
    for target in (fp32_grads.total * 1.0001, fp32_grads.total * 0.9):  # reachable without them, and not at all
        chosen, plan = fit_memory(teacher, student, _cfg(precision="bf16"), 128, fp32_grads.total * 2, quantized_params=quantized,
                                  resident_bytes=RESIDENT, target_bytes=target)
        assert (chosen.gradient_dtype, chosen.batch_size) == ("fp32", 4) and plan.gradient_dtype == "fp32"


def test_a_teacher_behind_a_hidden_state_cache_keeps_only_its_head(tmp_path):
    teacher, student = _models()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    logits_only = DistillConfig(steps=2, batch_size=4, precision="bf16")
    with training_layout(student, teacher, logits_only, tmp_path, cached="hidden"):
        head = teacher.lm_head.weight
        assert head.numel() and head.dtype == torch.bfloat16  # the head's products run in bf16 anyway
        assert all(p.numel() == 0 for p in teacher.parameters() if p is not head)
    for k, v in teacher.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    plan = estimate_training_memory(teacher, student, logits_only, 128, resident_bytes=RESIDENT, cached="hidden")
    teacher_bytes = sum(p.numel() * 4 for p in teacher.parameters())
    assert plan.parts["teacher_held_less"] == -(teacher_bytes - teacher.lm_head.weight.numel() * 2)
    assert plan.teacher_parked


def _qat_train(cfg, monkeypatch, learn_clip=False):
    from edgekd.formats import FormatPlan
    from edgekd.methods.distill import distill
    from edgekd.methods.qat import FakeQuant, prepare

    teacher, student = _models()
    prepared = prepare(student, FormatPlan.uniform("q4_0"), learn_clip=learn_clip)
    calls = []
    made = FakeQuant._round_trip

    def counted(self, w):
        calls.append(self.product_weight)
        return made(self, w)
    monkeypatch.setattr(FakeQuant, "_round_trip", counted)
    blocks = np.random.default_rng(3).integers(0, 300, size=(8, 32)).astype(np.int32)
    distill(student, teacher, blocks, cfg, [0, 3], param_groups=prepared.param_groups, after_step=prepared.after_step)
    monkeypatch.undo()
    return student, sum(calls)


@pytest.mark.parametrize("learn_clip", [False, True])
def test_round_trips_cached_across_checkpointing_train_exactly_as_recomputed_ones(monkeypatch, learn_clip):
    kw = dict(steps=2, batch_size=2, alpha=1.0, precision="bf16", optimizer_state="bf16", gradient_checkpointing=True,
              checkpoint_every=10**6)
    cached, n_cached = _qat_train(DistillConfig(**kw), monkeypatch, learn_clip)
    again, n_again = _qat_train(DistillConfig(**kw, recompute_round_trips=True), monkeypatch, learn_clip)
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), again.state_dict().values()))
    # block linears' round trips: 2 blocks x 7 once a step, or again in each block's recomputation; a
    # learned clip's round trip saves tensors for backward, so it is made again whatever the setting
    assert n_again == 2 * 2 * (2 * 7) and n_cached == (n_again if learn_clip else n_again // 2)


def test_recomputed_round_trips_are_a_rung_of_the_ladder_for_qat_only():
    teacher, student = _models()
    cfg = _cfg(precision="bf16", gradient_checkpointing=True, optimizer_state="bf16")
    quantized = sum(p.numel() for p in student.parameters() if p.dim() == 2)
    cached = estimate_training_memory(teacher, student, cfg, 128, quantized_params=quantized, resident_bytes=RESIDENT)
    recomputed = estimate_training_memory(teacher, student, _cfg(precision="bf16", gradient_checkpointing=True,
                                          optimizer_state="bf16", recompute_round_trips=True), 128,
                                          quantized_params=quantized, resident_bytes=RESIDENT)
    assert recomputed.parts["weight_copies"] < cached.parts["weight_copies"] and recomputed.recompute_round_trips
    chosen, plan = fit_memory(teacher, student, _cfg(precision="bf16"), 128, recomputed.total / HEADROOM * 1.0001,
                              quantized_params=quantized, resident_bytes=RESIDENT)
    assert chosen.recompute_round_trips and plan.settings()["recompute_round_trips"]
    plain, _ = fit_memory(teacher, student, _cfg(precision="bf16"), 128, recomputed.total / HEADROOM * 1.0001, resident_bytes=RESIDENT)
    assert not plain.recompute_round_trips  # distillation: no round trips to recompute
