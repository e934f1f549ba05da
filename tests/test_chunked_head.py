"""The chunked head losses against the plain ones on full logits: values and gradients."""

import pytest
import torch
from tiny_models import make_tiny_llama

from edgekd.methods.chunked_head import chunked_kd_loss, chunked_kl_sum, forward_to_hidden, head_of
from edgekd.methods.losses import LOGIT_KINDS, kd_loss

V = 97  # not a multiple of the chunk: the last chunk is short


def _inputs(seed=0, n=2, t=13, h=24, bias=False, softcap=None):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, t, h, generator=g, requires_grad=True)
    w = (torch.randn(V, h, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    th = torch.randn(n, t, h, generator=g)
    tw = torch.randn(V, h, generator=g) * 0.3
    labels = torch.randint(0, V, (n, t), generator=g)
    labels[0, :3] = -100
    from edgekd.methods.chunked_head import Head

    return hs, Head(w, b, softcap), labels, th, Head(tw, None, softcap)


def _plain(hs, head, labels, th, thead, **kw):
    return kd_loss(head.logits(hs), thead.logits(th) if th is not None else None, labels, **kw)


@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, None), (True, 5.0)])  # forward KL without softcap: closed form
def test_chunked_kd_loss_matches_plain_values_and_gradients(kind, bias, softcap):
    hs, head, labels, th, thead = _inputs(bias=bias, softcap=softcap)
    kw = dict(alpha=0.7, temperature=2.0, kind=kind)
    ref = _plain(hs, head, labels, th, thead, **kw)
    ref["loss"].backward()
    ref_grads = [p.grad.clone() for p in (hs, head.weight, head.bias) if p is not None]
    for p in (hs, head.weight, head.bias):
        if p is not None:
            p.grad = None
    out = chunked_kd_loss(hs, head, labels, teacher_hidden=th, teacher_head=thead, chunk=7, **kw)
    for k in ("loss", "ce", "kd"):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-6), k
    out["loss"].backward()
    for got, want in zip([p.grad for p in (hs, head.weight, head.bias) if p is not None], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cache_kind,alpha", [("topk", 0.5), ("sample", 0.5), ("sample", 1.0)])  # sample: closed form
def test_chunked_kd_loss_matches_plain_with_a_logit_cache(cache_kind, alpha):
    hs, head, labels, th, thead = _inputs(seed=1)
    logp_t = torch.log_softmax(thead.logits(th) / 2.0, -1)
    if cache_kind == "topk":
        logp, idx = logp_t.topk(5, dim=-1)
    else:
        idx = torch.multinomial(logp_t.exp().flatten(0, 1), 5, replacement=True, generator=torch.Generator().manual_seed(0))
        idx = idx.view(*logp_t.shape[:2], 5)
        logp = logp_t.gather(-1, idx)
    cached = (idx, logp, cache_kind)
    ref = kd_loss(head.logits(hs), None, labels, alpha, 2.0, teacher_cached=cached)
    ref["loss"].backward()
    want = [hs.grad.clone(), head.weight.grad.clone()]
    hs.grad = head.weight.grad = None
    out = chunked_kd_loss(hs, head, labels, alpha, 2.0, teacher_cached=cached, chunk=4)
    for k in ("loss", "ce", "kd"):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-6), k
    out["loss"].backward()
    for got, w in zip([hs.grad, head.weight.grad], want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)


def test_chunked_loss_without_gradients_and_kl_sum():
    hs, head, labels, th, thead = _inputs(seed=2)
    with torch.no_grad():
        ref = _plain(hs, head, labels, th, thead, alpha=1.0, temperature=1.0)
        out = chunked_kd_loss(hs, head, labels, 1.0, 1.0, teacher_hidden=th, teacher_head=thead, chunk=5)
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
        kl = chunked_kl_sum(hs, head, th, thead, chunk=6)
        plain = torch.log_softmax(thead.logits(th), -1)
        want = (plain.exp() * (plain - torch.log_softmax(head.logits(hs), -1))).sum()
    assert kl == pytest.approx(want.item(), rel=1e-5)


def test_a_tied_model_gets_the_same_gradients_through_its_hidden_states():
    """End to end on a tiny Llama with a tied head: the model stops at its hidden states (one position's logits)."""
    student, teacher = make_tiny_llama(101, layers=2, seed=0).train(), make_tiny_llama(101, layers=2, seed=1)
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    ref = kd_loss(student(input_ids=ids).logits[:, :-1], t_logits, ids[:, 1:], 0.7, 2.0)
    ref["loss"].backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    out, hidden = forward_to_hidden(student, ids)
    assert out.logits.shape[1] == 1
    with torch.no_grad():
        _, t_hidden = forward_to_hidden(teacher, ids)
    got = chunked_kd_loss(hidden[:, :-1], head_of(student), ids[:, 1:], 0.7, 2.0, teacher_hidden=t_hidden[:, :-1],
                          teacher_head=head_of(teacher), chunk=8)
    assert got["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    got["loss"].backward()
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_closed_form_gradient_matches_autograd_under_bf16_autocast(kind, monkeypatch):
    """The default loss's closed-form logit gradient (forward KL + CE, chunked) and the autograd path
    inside the chunks (reverse KL: bf16 table gradients added to the fp32 sum) against autograd through
    the plain loss on full logits, both under bf16 autocast; the table's gradient summed a few rows
    at a time."""
    import edgekd.methods.chunked_head as ch

    monkeypatch.setattr(ch, "TABLE_ROWS_PER_ADD", 7)
    hs, head, labels, th, thead = _inputs(seed=3, t=40)
    kw = dict(alpha=0.7, temperature=2.0, kind=kind)
    grads = []
    for chunked in (True, False):
        for p in (hs, head.weight):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                out = chunked_kd_loss(hs, head, labels, teacher_hidden=th, teacher_head=thead, chunk=16, **kw)
            else:
                out = _plain(hs, head, labels, th, thead, **kw)
        out["loss"].backward()
        grads.append((out, hs.grad.clone(), head.weight.grad.clone()))
    (a, ga_h, ga_w), (b, gb_h, gb_w) = grads
    for k in ("loss", "ce", "kd"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-3), k
    torch.testing.assert_close(ga_h, gb_h, rtol=2e-2, atol=2e-4)  # bf16 products on both sides
    torch.testing.assert_close(ga_w, gb_w, rtol=2e-2, atol=2e-4)
