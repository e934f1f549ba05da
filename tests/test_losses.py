"""Every distillation loss against an independent reference computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.methods.losses import (
    attention_kl,
    hidden_state_loss,
    kd_loss,
    logit_divergence,
    sampled_forward_kl,
    topk_forward_kl,
)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g) * 2
    t = torch.randn(2, 5, 11, generator=g) * 2
    return s, t


def ref_kl(p, q):  # KL(p || q) from probabilities, per position
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_forward_kl_with_temperature_matches_torch(logits, T):
    s, t = logits
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1).mean() * T * T
    assert logit_divergence(s, t, "forward", T).item() == pytest.approx(ref.item(), rel=1e-5)


def test_reverse_kl(logits):
    s, t = logits
    ref = ref_kl(F.softmax(s, -1), F.softmax(t, -1)).mean()
    assert logit_divergence(s, t, "reverse", 1.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_skew_kl(logits):
    s, t = logits
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    ref = ref_kl(p, 0.1 * p + 0.9 * q).mean()
    assert logit_divergence(s, t, "skew", 1.0).item() == pytest.approx(ref.item(), rel=1e-5)
    # skew with b -> 0 approaches forward KL
    fwd = logit_divergence(s, t, "forward", 1.0)
    assert logit_divergence(s, t, "skew", 1.0, beta=1e-10).item() == pytest.approx(fwd.item(), rel=1e-4)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_generalized_jsd(logits, beta):
    s, t = logits
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = beta * p + (1 - beta) * q
    ref = (beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)).mean()
    assert logit_divergence(s, t, "jsd", 1.0, beta=beta).item() == pytest.approx(ref.item(), rel=1e-5)
    # symmetric JSD is bounded by log 2
    assert logit_divergence(s, t, "jsd", 1.0).item() <= math.log(2) + 1e-6


def test_identical_distributions_have_zero_divergence(logits):
    s, _ = logits
    for kind in ("forward", "reverse", "skew", "jsd"):
        assert logit_divergence(s, s.clone(), kind, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_mixes_ce_and_kd_with_mask(logits):
    s, t = logits
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[0, -1] = -100
    out = kd_loss(s, t, labels, alpha=0.7, temperature=2.0)
    ce = F.cross_entropy(s.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    mask = labels != -100
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    kd = (kl * mask).sum() / mask.sum() * 4
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.3 * ce.item() + 0.7 * kd.item(), rel=1e-5)
    assert kd_loss(s, t, labels, alpha=0.0, temperature=2.0)["loss"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_topk_cache_kl_equals_bucketed_reference_and_full_kl_at_full_k(logits):
    s, t = logits
    T = 2.0
    logq = F.log_softmax(t / T, -1)
    k = 4
    top = logq.topk(k, -1)
    got = topk_forward_kl(s, top.indices, top.values, T)
    # reference: collapse both distributions to k + 1 outcomes
    p = logq.exp()
    q = F.softmax(s / T, -1)
    p_top, q_top = p.gather(-1, top.indices), q.gather(-1, top.indices)
    p_k = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_k = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    ref = ref_kl(p_k, q_k).mean() * T * T
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    full = logq.topk(11, -1)
    assert topk_forward_kl(s, full.indices, full.values, T).item() == pytest.approx(
        logit_divergence(s, t, "forward", T).item(), rel=1e-3)



def test_sampled_cache_kl_and_its_gradient_are_unbiased(logits):
    """Many draws from the teacher: the estimate and its gradient approach the full forward KL's."""
    s, t = logits
    T = 2.0
    logq = F.log_softmax(t / T, -1)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(logq.exp().reshape(-1, logq.shape[-1]), 20000, replacement=True, generator=g)
    draws = draws.reshape(*logq.shape[:-1], -1)
    s1 = s.clone().requires_grad_(True)
    est = sampled_forward_kl(s1, draws, logq.gather(-1, draws), T)
    est.backward()
    s2 = s.clone().requires_grad_(True)
    full = logit_divergence(s2, t, "forward", T)
    full.backward()
    assert est.item() == pytest.approx(full.item(), rel=0.03)
    cos = F.cosine_similarity(s1.grad.flatten(), s2.grad.flatten(), dim=0)
    assert cos > 0.99
    # a top-k cache of the same size per position drops the tail from the gradient: biased
    top = logq.topk(2, -1)
    s3 = s.clone().requires_grad_(True)
    topk_forward_kl(s3, top.indices, top.values, T).backward()
    assert F.cosine_similarity(s3.grad.flatten(), s2.grad.flatten(), dim=0) < cos

def test_hidden_mse_is_normalised_and_cosine():
    g = torch.Generator().manual_seed(2)
    hs = [torch.randn(2, 3, 8, generator=g) for _ in range(2)]
    ht = [torch.randn(2, 3, 8, generator=g) * 5 for _ in range(2)]
    ref = torch.stack([((a - b) ** 2).sum(-1).div((b**2).sum(-1)).mean() for a, b in zip(hs, ht)]).mean()
    assert hidden_state_loss(hs, ht, "mse").item() == pytest.approx(ref.item(), rel=1e-5)
    refc = torch.stack([(1 - F.cosine_similarity(a, b, dim=-1)).mean() for a, b in zip(hs, ht)]).mean()
    assert hidden_state_loss(hs, ht, "cosine").item() == pytest.approx(refc.item(), rel=1e-5)
    assert hidden_state_loss(ht, ht, "mse").item() == pytest.approx(0.0, abs=1e-7)


def test_hidden_loss_projection_when_widths_differ():
    g = torch.Generator().manual_seed(3)
    hs = [torch.randn(2, 3, 4, generator=g)]
    ht = [torch.randn(2, 3, 8, generator=g)]
    with pytest.raises(ValueError, match="pass a projection"):
        hidden_state_loss(hs, ht)
    proj = torch.nn.Linear(4, 8)
    loss = hidden_state_loss(hs, ht, "mse", projections=[proj])
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_attention_kl_matches_reference():
    g = torch.Generator().manual_seed(4)
    a_s = [F.softmax(torch.randn(2, 3, 5, 5, generator=g), -1)]
    a_t = [F.softmax(torch.randn(2, 3, 5, 5, generator=g), -1)]
    ref = ref_kl(a_t[0], a_s[0]).mean()
    assert attention_kl(a_s, a_t).item() == pytest.approx(ref.item(), rel=1e-4)
    assert attention_kl(a_t, a_t).item() == pytest.approx(0.0, abs=1e-6)
