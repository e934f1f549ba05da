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
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch

NUCLEUS_CANDIDATES = (64, 1024, 8192)  # a nucleus is looked for among this many most likely tokens first (exact: see next_tokens)


def next_tokens(logits: Any, rng: np.random.Generator, temperature: float = 1.0, top_p: float = 1.0) -> np.ndarray:
    """One token per row of ``logits`` (rows, vocab): greedy at ``temperature`` 0, else a draw
    from the tempered distribution cut to its smallest set of tokens holding ``top_p`` of the mass.

    float64 throughout, every row at once in torch (with a row-by-row draw the teacher's decode step
    at 64 rows took 0.32 s against 0.20 s; benchmarks/RESULTS.md, "Speed of the toolkit"); the one
    uniform draw a row comes from ``rng``, so a seed fixes the samples whichever engine computed the logits."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if temperature <= 0:
        return z.argmax(-1).numpy()
    p = torch.softmax(z / temperature, -1)
    u = torch.from_numpy(rng.random(len(p)))
    if top_p >= 1.0:
        return _inverse_cdf(p, u).numpy()
    out = torch.empty(len(p), dtype=torch.int64)
    # a row's nucleus lies inside its k most likely tokens when they hold top_p of the mass (exact):
    # k grows through NUCLEUS_CANDIDATES, and only the rows still short are sorted whole (sorting a 49k
    # vocabulary costs a row as much as its share of a decode step)
    rows = torch.arange(len(p))
    for k in (*(c for c in NUCLEUS_CANDIDATES if c < p.shape[-1]), p.shape[-1]):
        mass, order = torch.topk(p[rows], k, dim=-1, sorted=True)
        inside = (mass.sum(-1) >= top_p) | (k == p.shape[-1])
        mass, order = mass[inside], order[inside]
        mass = mass * ((torch.cumsum(mass, -1) - mass) < top_p)  # a token stays while the mass before it is short of top_p
        out[rows[inside]] = order.gather(-1, _inverse_cdf(mass, u[rows[inside]])[:, None])[:, 0]
        rows = rows[~inside]
        if not len(rows):
            break
    return out.numpy()


def _inverse_cdf(mass: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index whose cumulative (unnormalised) mass first reaches ``u`` of the row's total."""
    cdf = torch.cumsum(mass, -1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp_max(mass.shape[-1] - 1)


@torch.no_grad()
def torch_continue(model: Any, prompts: np.ndarray, new_tokens: int, rng: np.random.Generator, temperature: float = 1.0,
                   top_p: float = 1.0, autocast: Callable[[], Any] = contextlib.nullcontext,
                   stop_ids: Collection[int] = (), greedy_first: int = 0, reply: tuple[int, ...] = (),
                   pads: np.ndarray | None = None) -> np.ndarray:
    """``prompts`` (rows, P) continued by ``new_tokens`` sampled tokens each with ``model``'s KV
    cache: (rows, P + new_tokens); shorter when every row has sampled one of ``stop_ids`` (the rows that
    did earlier go on sampling until then). Rows run as one batch; ``pads`` (rows,): how many of a
    row's first columns are padding (:func:`left_padded`), masked out of attention, the positions
    counted from the row's first real token, as transformers' ``generate`` batches prompts of
    different lengths (without it, the rows of a prompt file ran one length at a time, near one row a
    batch: 6.0x fewer tokens/s for 32 questions of 13 lengths, benchmarks/RESULTS.md).
    ``greedy_first``: the first this many new tokens are the most likely ones (LLM-QAT's hybrid sampling).
    ``reply`` (end of turn, then the next turn's opening): a row that samples ``reply[0]`` is fed the rest
    of ``reply`` (not sampled) and goes on sampling the next turn, and only a stop token after that
    stops it: a user's message the model wrote, then its answer (see :class:`Turns`)."""
    from .kv_cache import cache_argument, decode_cache

    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(prompts, dtype=np.int64), device=device)
    out = np.empty((ids.shape[0], ids.shape[1] + new_tokens), dtype=np.int64)
    out[:, : ids.shape[1]] = ids.cpu().numpy()
    cache, cache_arg = decode_cache(out.shape[1]), cache_argument(model)  # written in place: no step copies it
    step_in, past = ids, 0
    stopped = np.zeros(len(out), dtype=bool)
    stops = np.asarray(list(stop_ids), dtype=np.int64)
    turns = Turns(len(out), reply)
    padded = pads is not None and bool(np.any(pads))
    if padded:
        shift = torch.as_tensor(np.asarray(pads, dtype=np.int64), device=device)[:, None]
        mask = (torch.arange(out.shape[1], device=device)[None, :] >= shift).long()  # (rows, P + new): 0 on the padding
    for i in range(new_tokens):
        positions, masked = torch.arange(past, past + step_in.shape[1], device=device).expand(len(out), -1), {}
        if padded:  # each row's positions from its first real token; the padding masked out
            positions, masked = (positions - shift).clamp_min(0), {"attention_mask": mask[:, : past + step_in.shape[1]]}
        with autocast():
            logits = model(input_ids=step_in, position_ids=positions, use_cache=True, logits_to_keep=1,
                           **{cache_arg: cache}, **masked).logits[:, -1]
        past += step_in.shape[1]
        tok, in_last_turn = turns.take(next_tokens(logits.float().cpu().numpy(), rng, temperature if i >= greedy_first else 0.0, top_p))
        out[:, ids.shape[1] + i] = tok
        if len(stops):
            stopped |= np.isin(tok, stops) & in_last_turn
            if stopped.all():
                return out[:, : ids.shape[1] + i + 1]
        step_in = torch.as_tensor(tok[:, None], device=device)
    return out


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one (rows, longest) array padded on the left with ``pad_id``,
    and each row's number of padding columns (``torch_continue``'s ``pads``)."""
    longest = max(len(p) for p in prompts)
    pads = np.asarray([longest - len(p) for p in prompts], dtype=np.int64)
    return np.asarray([[pad_id] * int(n) + list(p) for p, n in zip(prompts, pads)], dtype=np.int64), pads


class Turns:
    """Per row: sampling its first turn, being fed the next turn's opening, or sampling that turn.
    Without ``reply`` every row is in its last turn from the start (plain continuation)."""

    def __init__(self, rows: int, reply: tuple[int, ...] = ()):
        self.reply = tuple(reply)
        # tokens of the opening fed so far: 0 in the first turn, 1..len-1 while feeding, len in the last turn
        self.fed = np.zeros(rows, dtype=np.int64)

    def take(self, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens the rows append (``sampled``, or the opening's next token where a row is being fed),
        and which of them were sampled in the last turn (only those may stop a row)."""
        tok = np.asarray(sampled).copy()
        if not self.reply:
            return tok, np.ones(len(tok), dtype=bool)
        last_turn = self.fed >= len(self.reply)
        feeding = (self.fed > 0) & ~last_turn
        tok[feeding] = np.asarray(self.reply)[self.fed[feeding]]
        self.fed[feeding] += 1
        self.fed[(self.fed == 0) & (tok == self.reply[0])] = 1  # the first turn ends: feeding starts
        return tok, last_turn


def llama_cpp_continue(llm: Any, prompt: list[int], new_tokens: int, rng: np.random.Generator, temperature: float = 1.0,
                       top_p: float = 1.0, stop_ids: Collection[int] = (), greedy_first: int = 0,
                       reply: tuple[int, ...] = ()) -> list[int]:
    """``prompt`` continued by ``new_tokens`` tokens, the logits computed by llama.cpp (``llm``, a
    llama_cpp.Llama from edgekd.device.llamacpp.load), the tokens picked by :func:`next_tokens`;
    ``reply`` as in :func:`torch_continue`."""
    from ..device.llamacpp import last_logits

    llm.reset()
    seq = list(prompt)
    llm.eval(seq)
    turns = Turns(1, reply)
    for i in range(new_tokens):
        logits = last_logits(llm)[None]
        picked, last_turn = turns.take(next_tokens(logits, rng, temperature if i >= greedy_first else 0.0, top_p))
        tok = int(picked[0])
        seq.append(tok)
        if tok in stop_ids and last_turn[0]:
            break
        if i < new_tokens - 1:
            llm.eval([tok])
    return seq
