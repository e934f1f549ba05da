"""The output head and the logit losses, a chunk of positions at a time: no (batch, seq, vocab) tensor.

A distillation step's largest tensors are the logits: (batch, seq, vocab) in fp32 for the student
and the teacher, and their softmaxes and gradients, several copies of each (1.6 GB at batch 4 x 256
tokens on a 49,152-token vocabulary; 5 GB on Qwen3's 151,936). Here the models stop at their final
hidden states (``logits_to_keep=1``: transformers computes one position's logits) and the head
product ``h W^T``, the softmaxes and the losses run over :func:`chunk_positions` positions at a time.
The gradient of each chunk with respect to the hidden states and the head weight is taken inside
the forward pass (``torch.autograd.grad`` over the chunk), so the backward pass holds dL/dh
(positions x hidden) and dL/dW (vocab x hidden) and no logits at all: the design of Liger Kernel's
fused linear cross-entropy (Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM
Training") and Apple's cut cross-entropy (Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary
Language Models"), here in plain torch so it runs on CPUs, GPUs and under autocast alike, for every
logit loss of edgekd.methods.losses and the teacher-logit cache. The default loss (forward KL on
the live teacher plus CE) skips autograd inside the chunk: its gradient w.r.t. the logits has a
closed form (:func:`forward_kl_and_ce_with_grad`), so a chunk holds four (positions, vocab)
buffers instead of the dozen autograd's softmaxes keep, and no graph is built per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..families import family_of
from .losses import LOGIT_KINDS, cached_kl_per_position, divergence_per_position

# one chunk's fp32 logits; the closed-form loss keeps ~5 such buffers at once. 16 MiB rather than 32: the
# default QAT-KD step's peak in this loop ~100 MiB lower, the chunked loss 1.45 s against 1.53 s (benchmarks/RESULTS.md "Memory")
CHUNK_LOGIT_BYTES = 16 * 2**20


def chunk_positions(vocab_size: int) -> int:
    """Positions per chunk: ``CHUNK_LOGIT_BYTES`` of fp32 logits, at least 16 rows for the matmul's sake."""
    return max(16, CHUNK_LOGIT_BYTES // (4 * vocab_size))


def unwrapped(model: Any) -> Any:
    """The model under a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


@dataclass
class Head:
    """A model's output head as a function of its final (normed) hidden states."""

    weight: torch.Tensor  # (vocab, hidden); under QAT the straight-through round trip of the master weight
    bias: torch.Tensor | None = None
    softcap: float | None = None  # Gemma's final_logit_softcapping: logits = c tanh(z / c)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        z = F.linear(hidden, self.weight if weight is None else weight, self.bias if bias is None else bias)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def head_of(model: Any) -> Head:
    """The head of ``model``, its weight read once (a parametrized weight computes its round trip here)."""
    model = unwrapped(model)
    head = model.get_output_embeddings()
    return Head(head.weight, head.bias, getattr(model.config, "final_logit_softcapping", None))


@contextmanager
def final_hidden(model: Any) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward pass of ``model`` appends its final norm's output to the list."""
    model = unwrapped(model)
    seen: list[torch.Tensor] = []
    handle = family_of(model).final_norm_module(model).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def forward_to_hidden(model: Any, ids: torch.Tensor, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    """``model``'s outputs (logits of the last position only) and its final hidden states (B, T, h)."""
    with final_hidden(model) as seen:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)
    return out, seen[-1]


class _GradInForward(torch.autograd.Function):
    """Sum of ``chunk_loss`` over chunks of rows; each chunk's gradients are taken in the forward pass.

    ``weight`` (and ``bias``) come in their own dtype (fp32 master weights, or QAT's fp32 round
    trip); under autocast they are cast to its dtype once, here, for the chunks' products, and
    their gradient is summed in fp32 and handed back as is: no cast copy of the table outlives
    the forward pass and no second gradient-sized tensor is made in backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                chunk_loss: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], chunk: int,
                logit_grad: Callable[..., tuple] | None = None) -> tuple:
        dtype = _autocast_dtype(hidden.device)
        w_c = weight.detach().to(dtype) if dtype is not None else weight.detach()
        b_c = (bias.detach().to(dtype) if dtype is not None else bias.detach()) if bias is not None else None
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        totals = torch.zeros(3, dtype=torch.float64, device=hidden.device)
        w = w_c.requires_grad_(logit_grad is None)
        b = b_c.requires_grad_(logit_grad is None) if b_c is not None else None
        for start in range(0, hidden.shape[0], chunk):
            if logit_grad is not None:  # the gradient w.r.t. the logits in closed form: the products' backward by hand
                h = hidden[start:start + chunk].detach()
                h_c = h.to(w.dtype)
                loss, ce, kd, dz = logit_grad(F.linear(h_c, w, b).float(), start, start + chunk)
                dz = dz.to(w.dtype)
                grad_h[start:start + chunk] = dz @ w
                _add_product(grad_w, dz, h_c)
                if grad_b is not None:
                    grad_b += dz.float().sum(0)
            else:
                with torch.enable_grad():
                    h = hidden[start:start + chunk].detach().requires_grad_()
                    loss, ce, kd = chunk_loss(h, w, b, start, start + chunk)
                    grads = torch.autograd.grad(loss, [h, w] + ([b] if b is not None else []))
                grad_h[start:start + chunk] = grads[0]
                _add_by_rows(grad_w, grads[1])
                if grad_b is not None:
                    grad_b += grads[2]
            totals += torch.stack([loss.detach(), ce.detach(), kd.detach()]).double()
        del w, b, w_c, b_c
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), *([grad_b.to(bias.dtype)] if grad_b is not None else []))
        out = totals.float()
        loss, ce, kd = out[0], out[1], out[2]
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, _g_ce: Any, _g_kd: Any) -> tuple:
        grad_h, grad_w, *rest = ctx.saved_tensors
        ones = bool(g_loss == 1)  # the usual case: the loss itself; no scaled copy of the table's gradient
        scale = (lambda t: t) if ones else (lambda t: t * g_loss)
        return scale(grad_h), scale(grad_w), scale(rest[0]) if rest else None, None, None, None


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    kind: str = "forward",
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    teacher_cached: tuple[torch.Tensor, torch.Tensor, str] | None = None,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """edgekd.methods.losses.kd_loss from the final hidden states, a chunk of positions at a time.

    ``student_hidden`` (B, T, h) and ``teacher_hidden`` are aligned with ``labels`` (B, T) (position t
    predicts labels[t]; -100 is ignored), as are the cache's (indices, log-probs, kind) in
    ``teacher_cached``. Same values and gradients as ``kd_loss`` on the full logits.
    """
    if kind not in LOGIT_KINDS:
        raise ValueError(f"unknown logit loss {kind!r}; choose from {LOGIT_KINDS}")
    if alpha > 0 and teacher_cached is None and (teacher_hidden is None or teacher_head is None):
        raise ValueError("pass the teacher's hidden states and head, or its cached logits")
    if teacher_cached is not None and kind != "forward":
        raise ValueError("the logit cache supports forward KL only")
    t = float(temperature)
    hs = student_hidden.flatten(0, -2)
    flat_labels = labels.flatten()
    valid = flat_labels != -100
    n_valid = valid.sum().clamp_min(1).to(torch.float32)
    th = teacher_hidden.flatten(0, -2) if teacher_hidden is not None else None
    cached = None
    if teacher_cached is not None:
        idx, logp, cache_kind = teacher_cached
        cached = (idx.flatten(0, -2), logp.flatten(0, -2), cache_kind)
    chunk = chunk or chunk_positions(student_head.weight.shape[0])

    def chunk_loss(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, start: int, end: int) -> tuple:
        s_logits = student_head.logits(h, w, b).float()
        lab, m = flat_labels[start:end], valid[start:end].to(torch.float32)
        ce = F.cross_entropy(s_logits, lab, ignore_index=-100, reduction="sum") / n_valid
        if alpha == 0:
            kd = torch.zeros((), device=h.device)
        elif cached is not None:
            kd = (cached_kl_per_position(s_logits, cached[0][start:end], cached[1][start:end], cached[2], t) * m).sum() / n_valid * t * t
        else:
            with torch.no_grad():
                logp_t = F.log_softmax(teacher_head.logits(th[start:end]).float() / t, dim=-1)
            logp_s = F.log_softmax(s_logits / t, dim=-1)
            kd = (divergence_per_position(logp_s, logp_t, kind) * m).sum() / n_valid * t * t
        return (1 - alpha) * ce + alpha * kd, ce, kd

    def forward_kl_grad(z: torch.Tensor, start: int, end: int) -> tuple:
        with torch.no_grad():
            t_logits = teacher_head.logits(th[start:end]).float()
        return forward_kl_and_ce_with_grad(z, t_logits, flat_labels[start:end], valid[start:end], n_valid, alpha, t)

    def sampled_kl_grad(z: torch.Tensor, start: int, end: int) -> tuple:
        return sampled_kl_and_ce_with_grad(z, cached[0][start:end], cached[1][start:end], flat_labels[start:end],
                                           valid[start:end], n_valid, alpha, t)

    w, b = student_head.weight, student_head.bias
    if teacher_head is not None:
        teacher_head = _cast_once(teacher_head, hs.device)
    # forward KL + CE, on the live teacher or a sampled cache, has a closed-form logit gradient: a
    # third of the (chunk, vocab) temporaries autograd keeps, and no graph per chunk
    logit_grad = None
    if kind == "forward" and alpha > 0 and not student_head.softcap:
        if cached is None and not teacher_head.softcap:
            logit_grad = forward_kl_grad
        elif cached is not None and cached[2] == "sample":
            logit_grad = sampled_kl_grad
    if torch.is_grad_enabled() and (hs.requires_grad or w.requires_grad):
        loss, ce, kd = _GradInForward.apply(hs, w, b, chunk_loss, chunk, logit_grad)
    else:
        with torch.no_grad():
            head = _cast_once(Head(w, b), hs.device)  # cast once, not per chunk
            parts = [chunk_loss(hs[s:s + chunk], head.weight, head.bias, s, s + chunk) for s in range(0, hs.shape[0], chunk)]
        loss, ce, kd = (torch.stack([p[i] for p in parts]).sum() for i in range(3))
    return {"ce": ce, "kd": kd, "loss": loss}


@torch.no_grad()
def forward_kl_and_ce_with_grad(z: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                                n_valid: torch.Tensor, alpha: float, t: float) -> tuple:
    """``(1 - alpha) CE + alpha t^2 KL(p_t || q_s)`` over a chunk of fp32 logits ``z`` (rows; ``valid``
    masks them, sums divided by ``n_valid``), its parts, and its gradient w.r.t. ``z`` in closed form:
    ``(1 - alpha) (softmax(z) - onehot) + alpha t (softmax(z / t) - softmax(z_t / t))`` (Hinton et al.
    2015's soft-target gradient), computed in place in four (rows, vocab) buffers (``z`` and
    ``t_logits`` are overwritten).
    """
    with torch.autocast(z.device.type, enabled=False):  # the row sums below are matmuls autocast would round to bf16
        return _forward_kl_and_ce_with_grad(z, t_logits, labels, valid, n_valid, alpha, t)


def _forward_kl_and_ce_with_grad(z: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                                 n_valid: torch.Tensor, alpha: float, t: float) -> tuple:
    m = valid.to(torch.float32) / n_valid
    log_p = t_logits.div_(t)
    log_p -= torch.logsumexp(log_p, -1, keepdim=True)  # teacher log-probabilities at temperature t
    log_q = z / t
    log_q -= torch.logsumexp(log_q, -1, keepdim=True)  # student's
    p = log_p.exp()
    kl = torch.einsum("ij,ij->i", p, log_p) - torch.einsum("ij,ij->i", p, log_q)
    dz = log_q.exp_().sub_(p).mul_((alpha * t) * m[:, None])  # log_q's buffer holds the gradient now
    del log_p
    lse = torch.logsumexp(z, -1, keepdim=True)
    safe = labels.clamp_min(0)[:, None]
    ce_rows = (lse - z.gather(-1, safe)).squeeze(-1)
    soft = p.copy_(z).sub_(lse).exp_()  # p's buffer: softmax(z)
    soft.scatter_add_(-1, safe, torch.full_like(lse, -1.0))
    dz.add_(soft.mul_((1 - alpha) * m[:, None]))
    ce = (ce_rows * m).sum()
    kd = (kl * m).sum() * (t * t)
    return (1 - alpha) * ce + alpha * kd, ce, kd, dz


@torch.no_grad()
def sampled_kl_and_ce_with_grad(z: torch.Tensor, idx: torch.Tensor, t_logp: torch.Tensor, labels: torch.Tensor,
                                valid: torch.Tensor, n_valid: torch.Tensor, alpha: float, t: float) -> tuple:
    """As :func:`forward_kl_and_ce_with_grad`, with the teacher given by K tokens ``idx`` drawn from
    it and their log-probabilities ``t_logp`` (the sampled logit cache; the KL estimate is
    ``mean_k(t_logp - log q_s(idx_k / t))``, Anshumann et al. 2025). Its gradient w.r.t. ``z`` is the
    live one with the teacher's distribution replaced by the samples' empirical one:
    ``alpha t (softmax(z / t) - counts / K)``. Two (rows, vocab) buffers; ``z`` is overwritten."""
    with torch.autocast(z.device.type, enabled=False):
        m = valid.to(torch.float32) / n_valid
        idx = idx.long()
        draws = idx.shape[-1]
        log_q = z / t
        log_q -= torch.logsumexp(log_q, -1, keepdim=True)
        kl = t_logp.float().mean(-1) - log_q.gather(-1, idx).mean(-1)
        dz = log_q.exp_()
        dz.scatter_add_(-1, idx, torch.full(idx.shape, -1.0 / draws, dtype=dz.dtype, device=dz.device))
        dz.mul_((alpha * t) * m[:, None])
        lse = torch.logsumexp(z, -1, keepdim=True)
        safe = labels.clamp_min(0)[:, None]
        ce_rows = (lse - z.gather(-1, safe)).squeeze(-1)
        soft = z.sub_(lse).exp_()  # z's buffer: softmax(z)
        soft.scatter_add_(-1, safe, torch.full_like(lse, -1.0))
        dz.add_(soft.mul_((1 - alpha) * m[:, None]))
        ce = (ce_rows * m).sum()
        kd = (kl * m).sum() * (t * t)
        return (1 - alpha) * ce + alpha * kd, ce, kd, dz


TABLE_ROWS_PER_ADD = 4096  # rows of the table's gradient updated at a time


def _add_product(out: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """``out += dz^T h`` a slice of ``out``'s rows at a time. In one product, a bf16 (vocab, hidden)
    result and the fp32 copy CPU kernels make of it to add it to fp32 ``out`` would live beside
    the table's gradient (162 MiB on a 49k x 576 table, measured); a slice's take 14 MiB, and the
    slices run 4x faster (measured on CPU: 22 ms against 91 ms a chunk)."""
    for s in range(0, out.shape[0], TABLE_ROWS_PER_ADD):
        out[s:s + TABLE_ROWS_PER_ADD] += dz[:, s:s + TABLE_ROWS_PER_ADD].t() @ h


def _add_by_rows(out: torch.Tensor, part: torch.Tensor) -> None:
    """``out += part`` a slice of rows at a time: no full-size copy of ``part`` in ``out``'s dtype."""
    if part.dtype == out.dtype:
        out += part
        return
    for s in range(0, out.shape[0], TABLE_ROWS_PER_ADD):
        out[s:s + TABLE_ROWS_PER_ADD] += part[s:s + TABLE_ROWS_PER_ADD]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _cast_once(head: Head, device: torch.device) -> Head:
    """A frozen head with its weight already in autocast's dtype."""
    dtype = _autocast_dtype(device)
    if dtype is None or head.weight.dtype == dtype:
        return head
    with torch.no_grad():
        return Head(head.weight.to(dtype), head.bias.to(dtype) if head.bias is not None else None, head.softcap)


@torch.no_grad()
def chunked_kl_sum(student_hidden: torch.Tensor, student_head: Head, teacher_hidden: torch.Tensor | None = None,
                   teacher_head: Head | None = None, chunk: int | None = None,
                   teacher_logp: list[torch.Tensor] | None = None) -> float:
    """Sum over positions of KL(p_teacher || p_student) at temperature 1, in float64 (an evaluation).
    The teacher's side from its final hidden states and head, or ``teacher_logp``: its log-probabilities
    a chunk at a time as :func:`teacher_logprob_chunks` made them (the same chunks)."""
    hs = student_hidden.flatten(0, -2)
    chunk = chunk or chunk_positions(student_head.weight.shape[0])
    th = teacher_hidden.flatten(0, -2) if teacher_logp is None else None
    total = 0.0
    for i, s in enumerate(range(0, hs.shape[0], chunk)):
        logp_s = F.log_softmax(student_head.logits(hs[s:s + chunk]).float(), dim=-1)
        logp_t = F.log_softmax(teacher_head.logits(th[s:s + chunk]).float(), dim=-1) if teacher_logp is None else teacher_logp[i]
        total += float((logp_t.exp() * (logp_t - logp_s)).sum(dtype=torch.float64))
    return total


def teacher_logprob_chunks(teacher_hidden: torch.Tensor, teacher_head: Head, chunk: int | None = None) -> list[torch.Tensor]:
    """The teacher's log-probabilities a chunk of positions at a time, as :func:`chunked_kl_sum` makes them."""
    th = teacher_hidden.flatten(0, -2)
    chunk = chunk or chunk_positions(teacher_head.weight.shape[0])
    return [F.log_softmax(teacher_head.logits(th[s:s + chunk]).float(), dim=-1) for s in range(0, th.shape[0], chunk)]
