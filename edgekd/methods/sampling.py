"""Sampling continuations of prompts: one sampler, two engines (torch with a KV cache, llama.cpp).

The sampler (:func:`next_tokens`) draws from softmax(z / T) restricted to the nucleus of mass
``top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") with a numpy
``Generator``: the same code picks the tokens whichever engine computed the logits, and a seed
fixes the samples. Used for the teacher's samples (sequence-level KD, Kim & Rush 2016; data-free
QAT, Liu et al. 2023) and for the student's own samples in on-policy distillation (GKD, Agarwal
et al. 2024).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

NUCLEUS_CANDIDATES = 256  # the nucleus is looked for among the most likely tokens first (exact: see next_tokens)


def next_tokens(logits: Any, rng: np.random.Generator, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
    """One token per row of ``logits`` (rows, vocab): greedy at ``temperature`` 0, else a draw
    from the tempered distribution cut to its smallest set of tokens holding ``top_p`` of the mass.

    float64 throughout. A row's nucleus is looked for among its ``NUCLEUS_CANDIDATES`` most likely
    tokens first (exact when they hold ``top_p`` of the mass: the nucleus then lies inside them),
    else in the whole sorted row: sorting a 49k vocabulary per row costs as much as a decode step."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return z.argmax(-1)
    z = z / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random(len(p))
    if top_p >= 1.0:
        return np.minimum((np.cumsum(p, -1) < u[:, None]).sum(-1), p.shape[-1] - 1)
    out = np.empty(len(p), dtype=np.int64)
    k = min(NUCLEUS_CANDIDATES, p.shape[-1] - 1)
    for r, row in enumerate(p):
        order = np.argpartition(-row, k)[:k] if k < len(row) - 1 else np.arange(len(row))
        if row[order].sum() < top_p:
            order = np.arange(len(row))
        order = order[np.argsort(-row[order], kind="stable")]
        mass = row[order]
        mass = mass * (np.cumsum(mass) - mass < top_p)  # a token stays while the mass before it is short of top_p
        cdf = np.cumsum(mass)
        out[r] = order[min(int((cdf < u[r] * cdf[-1]).sum()), len(order) - 1)]
    return out


@torch.no_grad()
def torch_continue(model: Any, prompts: np.ndarray, new_tokens: int, rng: np.random.Generator, temperature: float = 1.0,
                   top_p: float = 1.0, autocast: Callable[[], Any] = contextlib.nullcontext,
                   stop_id: int | None = None) -> np.ndarray:
    """``prompts`` (rows, P) continued by ``new_tokens`` sampled tokens each with ``model``'s KV
    cache: (rows, P + new_tokens); shorter when every row has sampled ``stop_id`` (the rows that
    did earlier go on sampling until then). Rows run as one batch (equal-length prompts, no padding)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(prompts, dtype=np.int64), device=device)
    out = np.empty((ids.shape[0], ids.shape[1] + new_tokens), dtype=np.int64)
    out[:, : ids.shape[1]] = ids.cpu().numpy()
    cache = DynamicCache()
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"  # transformers 5.x renamed it
    step_in, past = ids, 0
    stopped = np.zeros(len(out), dtype=bool)
    for i in range(new_tokens):
        positions = torch.arange(past, past + step_in.shape[1], device=device).expand(len(out), -1)
        with autocast():
            logits = model(input_ids=step_in, position_ids=positions, use_cache=True, logits_to_keep=1,
                           **{cache_arg: cache}).logits[:, -1]
        past += step_in.shape[1]
        tok = next_tokens(logits.float().cpu().numpy(), rng, temperature, top_p)
        out[:, ids.shape[1] + i] = tok
        if stop_id is not None:
            stopped |= tok == stop_id
            if stopped.all():
                return out[:, : ids.shape[1] + i + 1]
        step_in = torch.as_tensor(tok[:, None], device=device)
    return out


def llama_cpp_continue(llm: Any, prompt: list[int], new_tokens: int, rng: np.random.Generator, temperature: float = 1.0,
                       top_p: float = 1.0, stop_id: int | None = None) -> list[int]:
    """``prompt`` continued by ``new_tokens`` tokens, the logits computed by llama.cpp (``llm``, a
    llama_cpp.Llama from edgekd.device.llamacpp.load), the tokens picked by :func:`next_tokens`."""
    from ..device.llamacpp import last_logits

    llm.reset()
    seq = list(prompt)
    llm.eval(seq)
    for i in range(new_tokens):
        logits = last_logits(llm)[None]
        tok = int(next_tokens(logits, rng, temperature, top_p)[0])
        seq.append(tok)
        if tok == stop_id:
            break
        if i < new_tokens - 1:
            llm.eval([tok])
    return seq
