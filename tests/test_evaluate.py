import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd.methods.evaluate import evaluate, log_softmax, torch_logits_fn


def reference(student_logits, teacher_logits, blocks):
    s = torch.from_numpy(student_logits[:, :-1]).double()
    t = torch.from_numpy(teacher_logits[:, :-1]).double()
    targets = torch.from_numpy(blocks[:, 1:]).long()
    nll = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    agree = (s.argmax(-1) == t.argmax(-1)).double().mean()
    return nll.exp().item(), kl.item(), agree.item()


def test_metrics_match_torch_reference():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 50, size=(5, 12)).astype(np.int32)
    s_logits = rng.normal(size=(5, 12, 50)).astype(np.float32) * 3
    t_logits = (s_logits + rng.normal(size=s_logits.shape).astype(np.float32)).astype(np.float32)
    lookup = {b.tobytes(): (s, t) for b, s, t in zip(blocks, s_logits, t_logits)}
    m = evaluate(lambda b: np.stack([lookup[r.tobytes()][0] for r in b]), blocks,
                 teacher_fn=lambda b: np.stack([lookup[r.tobytes()][1] for r in b]), batch_size=2)
    ppl, kl, agree = reference(s_logits, t_logits, blocks)
    assert m.perplexity == pytest.approx(ppl, rel=1e-4)
    assert m.kl_to_teacher == pytest.approx(kl, rel=1e-4)
    assert m.top1_agreement == pytest.approx(agree)
    assert m.tokens == 5 * 11 and m.blocks == 5


def test_identical_models_have_zero_kl_and_full_agreement(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    blocks = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(3, 16)).astype(np.int32)
    fn = torch_logits_fn(model)
    m = evaluate(fn, blocks, teacher_fn=fn)
    assert m.kl_to_teacher == pytest.approx(0.0, abs=1e-6)
    assert m.top1_agreement == 1.0
    # a random tiny model is near-uniform: perplexity close to the vocabulary size
    assert 0.5 * model.config.vocab_size < m.perplexity < 2 * model.config.vocab_size


def test_log_softmax_is_stable():
    x = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    out = log_softmax(x)
    assert np.isfinite(out).all() and out[0, 0] == pytest.approx(0.0)


def test_a_batchs_logits_are_freed_before_the_next_batchs_forward_passes():
    import weakref

    blocks = np.random.default_rng(0).integers(0, 16, size=(6, 8))
    made = []  # every logits array handed out, weakly: the memory check counts one batch's of each model

    def logits_fn(batch):
        assert all(ref() is None for ref in made + teacher_made), "an earlier batch's logits are still held"
        out = np.random.default_rng(len(made)).normal(size=(len(batch), batch.shape[1], 16)).astype(np.float32)
        made.append(weakref.ref(out))
        return out

    def teacher_fn(batch):
        out = np.zeros((len(batch), batch.shape[1], 16), dtype=np.float32)
        teacher_made.append(weakref.ref(out))
        return out

    teacher_made = []
    metrics = evaluate(logits_fn, blocks, teacher_fn, batch_size=2)
    assert len(made) == len(teacher_made) == 3 and metrics.tokens == 6 * 7
