"""AdamW with its two moments stored in bf16: 4 bytes of optimizer state per parameter instead of 8.

AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), the update computed
in fp32 from the upcast moments and written back rounded to nearest. bf16 keeps fp32's exponent
range, so the second moment (squared gradients, 1e-12 and below) neither underflows nor needs a
scale, and its 8-bit mantissa perturbs sqrt(v) by at most 0.2%; the precision loss 8-bit
optimizers trade for 2 bytes (Dettmers et al. 2022, block-wise quantized state) is larger.
torchao's AdamW8bit needs torch.compile (a C++ compiler, ~30 s to compile) and its CPU step is
several times plain AdamW's; this one runs anywhere torch does.

Its state has AdamW's keys (step, exp_avg, exp_avg_sq), so a checkpoint of either resumes into the other.

:class:`Bf16Gradients` keeps the weight gradients of bf16 products in bf16, which under bf16
autocast loses nothing (its docstring says why); this optimizer reads them from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

UPDATE_SLICE = 1 << 22  # elements updated at a time


class Bf16Gradients:
    """Gradients of ``params`` held in bf16 from the moment autograd has finished each one.

    Exact under bf16 autocast with one backward pass per step: a linear layer's weight gradient is
    a bf16 matrix product there, cast to fp32 only by the backward of autocast's cast (QAT's
    straight-through round trip passes it on unchanged), so the fp32 ``.grad`` holds a bf16 value
    and keeping it in bf16 rounds nothing. Half the memory of fp32 gradients; no extra compute.
    Not for weights used twice a step (their fp32 sum is not bf16; a tied table), nor with
    accumulation over micro-batches, nor under DistributedDataParallel (it reduces ``.grad``).

    ``scale`` multiplies every gradient as :meth:`AdamWBf16Moments.step` reads it (the global-norm
    clip, applied there in fp32 instead of rounding the scaled values to bf16).
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self.grads: dict[torch.Tensor, torch.Tensor] = {}
        self.scale = 1.0
        self._handles = [p.register_post_accumulate_grad_hook(self._keep) for p in params]

    def _keep(self, p: torch.Tensor) -> None:
        self.grads[p] = p.grad.to(torch.bfloat16)
        p.grad = None

    def pop(self, p: torch.Tensor) -> torch.Tensor | None:
        return self.grads.pop(p, None)

    def clear(self) -> None:
        self.grads.clear()
        self.scale = 1.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, held: Bf16Gradients | None = None) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over ``params``' ``.grad`` and the gradients ``held`` in
    bf16 together (their scale set, not their values rounded); returns the total norm."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
    if held is not None:
        norms += [torch.linalg.vector_norm(g, dtype=torch.float32) for g in held.grads.values()]
    if not norms:
        return 0.0
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
        if held is not None:
            held.scale = coef
    return total


class AdamWBf16Moments(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.held: Bf16Gradients | None = None  # gradients kept in bf16, read in place of .grad

    @torch.no_grad()
    def init_state(self) -> None:
        """Allocate every moment now (before training's first step) instead of at the first update."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p)

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = torch.enable_grad()(closure)() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                grad, scale = p.grad, 1.0
                if grad is None and self.held is not None:
                    grad, scale = self.held.pop(p), self.held.scale
                if grad is None:
                    continue
                state = self._state_of(p)
                for key in ("exp_avg", "exp_avg_sq"):  # state resumed from an fp32 AdamW checkpoint
                    if state[key].dtype != torch.bfloat16:
                        state[key] = state[key].to(torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                if wd:
                    p.mul_(1 - lr * wd)
                # in slices, so the fp32 working copies of a large tensor (a 150k-token embedding) stay small
                flat_p, flat_g = p.view(-1), grad.view(-1)
                flat_m, flat_v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                for s in range(0, flat_p.numel(), UPDATE_SLICE):
                    sl = slice(s, s + UPDATE_SLICE)
                    g = flat_g[sl].float()
                    if scale != 1.0:
                        g.mul_(scale)
                    m = flat_m[sl].float().mul_(b1).add_(g, alpha=1 - b1)
                    v = flat_v[sl].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                    flat_m[sl] = m
                    flat_v[sl] = v
                    denom = (v.sqrt_() / math.sqrt(1 - b2 ** step)).add_(eps)
                    flat_p[sl].addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
        if self.held is not None:
            self.held.clear()
        return loss


def make_optimizer(groups: list[dict[str, Any]], lr: float, weight_decay: float, state: str = "fp32") -> torch.optim.Optimizer:
    """AdamW with ``state`` ("fp32" or "bf16") moments."""
    if state == "bf16":
        return AdamWBf16Moments(groups, lr=lr, weight_decay=weight_decay)
    if state != "fp32":
        raise ValueError(f"unknown optimizer state {state!r}; choose fp32 or bf16")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
