"""GGUF's K-quants (Q4_K, Q5_K, Q6_K): numpy references bit-exact with llama.cpp, and their grids.

A K-quant row is cut into super-blocks of 256 weights. Q4_K / Q5_K split a super-block into 8
sub-blocks of 32 with a 6-bit scale and a 6-bit minimum each, relative to the super-block's
fp16 ``d`` and ``dmin``: a weight is ``(d * sc) * q - (dmin * m)``, ``q`` in 0 .. 15 (0 .. 31).
Q6_K splits it into 16 sub-blocks of 16 with a signed 8-bit scale: ``(d * sc) * (q - 32)``,
``q`` in 0 .. 63. Rows must be a multiple of 256 long (Qwen3-0.6B's 1024, Llama-3.2-1B's 2048;
not SmolLM2-135M's 576), as llama.cpp requires.

The numpy functions are ggml-quants.c's ``quantize_row_q{4,5,6}_K_ref`` (what ``llama-quantize``
runs without an importance matrix): the least-squares scale/minimum search of
``make_qkx2_quants`` (Q4_K, Q5_K) and the weighted scale search of ``make_qx_quants`` (Q6_K),
written with the same IEEE single-precision operations in the same order, so every byte matches
(tests compare with files ``llama_model_quantize`` writes). Sums run element by element, as the
C loops do, because float addition is not associative. Where llama-cpp-python is installed the
formats quantize with llama.cpp's own C function instead (:func:`quantize`; the same bytes, several
times faster); the numpy references stay the definition a machine without it runs, and the tests'.

Unlike the 32-weight types, re-quantizing a K-quant's own output need not give the same codes:
the search may find another scale for the rounded values. So QAT fixes the **grid** (every
sub-block's integer scale and minimum, and the super-block fp16 scales) from the reference
quantizer once, trains on that grid, and the exporter writes the codes on the same grid:
:func:`codes_on_grid` is the reference's own final rounding step, and a weight already on the
grid rounds back to its code exactly (:func:`grid_values` is a fixed point of it).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32


class KBlocks(NamedTuple):
    """A K-quant 2-D weight. ``d`` / ``dmin``: fp16 super-block scales [rows, cols/256];
    ``sc`` / ``m``: integer sub-block scales and minimums [rows, cols/sub] (Q6_K: int8 scales,
    no minimums); ``codes``: uint8 [rows, cols], 0 .. 2^bits - 1."""

    kind: str  # "q4_k" | "q5_k" | "q6_k"
    d: np.ndarray
    sc: np.ndarray
    codes: np.ndarray
    dmin: np.ndarray | None = None
    m: np.ndarray | None = None


GRID_FIELDS = ("d", "sc", "codes", "dmin", "m")  # the per-row arrays of a KBlocks (kind aside)


def map_rows(blocks: KBlocks, fn: Any) -> KBlocks:
    """``blocks`` with ``fn`` applied to each of its per-row arrays (a row permutation, say)."""
    return blocks._replace(**{f: fn(getattr(blocks, f)) for f in GRID_FIELDS if getattr(blocks, f) is not None})


SPEC = {  # kind: (bits, sub-block length, bytes per super-block)
    "q4_k": (4, 32, 144),
    "q5_k": (5, 32, 176),
    "q6_k": (6, 16, 210),
}


def _rint(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` (adds 1.5 * 2^23 in float32): round half to even."""
    return np.rint(x.astype(F32))


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis element by element in float32, as a C ``for`` loop adds."""
    acc = terms[..., 0].astype(F32)
    for i in range(1, terms.shape[-1]):
        acc = (acc + terms[..., i]).astype(F32)
    return acc


CHUNK_ROWS = 1 << 15  # sub-blocks a search call takes at most: 1M weights, whose temporaries stay in cache


def _in_row_chunks(search: Any, *arrays: np.ndarray, workers: int | None = None, chunk_rows: int = CHUNK_ROWS,
                   min_rows: int = 4096) -> tuple[np.ndarray, ...]:
    """``search(*arrays)`` over chunks of at most ``chunk_rows`` rows, as many for each of ``workers``
    threads (default: one per core) and none under ``min_rows``, its outputs joined. The searches
    treat every sub-block (row) on its own and numpy's element-wise operations let go of the GIL, so
    the result is the same bytes as one call; smaller chunks keep the searches' temporaries in cache,
    and the threads use every core (benchmarks/RESULTS.md, "Speed of the toolkit", 10)."""
    from .versions import usable_threads

    workers = workers or usable_threads(1 << 10)
    rows = len(arrays[0])
    pieces = -(-rows // chunk_rows)
    pieces = min(-(-pieces // workers) * workers, max(1, rows // min_rows))  # the same number of chunks for every thread
    if pieces < 2:
        return search(*arrays)
    bounds = np.linspace(0, rows, pieces + 1).astype(int)
    with ThreadPoolExecutor(max(1, min(workers, pieces))) as pool:
        parts = list(pool.map(lambda ab: search(*(a[ab[0]:ab[1]] for a in arrays)), zip(bounds[:-1], bounds[1:])))
    return tuple(np.concatenate(out) for out in zip(*parts))


def _check(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"K-quants need a 2-D weight whose rows are a multiple of {QK_K} long, got {w.shape}")
    return w


def fits(cols: int) -> bool:
    """Whether a row of ``cols`` weights can be stored as a K-quant."""
    return cols % QK_K == 0


# ---------------------------------------------------------------- make_qkx2_quants (Q4_K, Q5_K)


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised ``make_qkx2_quants`` (use_mad false) over sub-blocks x, w: (S, n) float32.
    Returns (scale, the_min, L) with L uint8 (S, n)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lo = np.minimum(x.min(axis=1), F32(0))
        hi = x.max(axis=1)
        sum_w = _seqsum(w)
        sum_x = _seqsum(w * x)
        flat = hi == lo
        iscale = (F32(nmax) / (hi - lo)).astype(F32)
        scale = (F32(1) / iscale).astype(F32)
        L = np.clip(_rint(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(F32)
        diff = (scale[:, None] * L + lo[:, None] - x).astype(F32)
        best = _seqsum(w * (diff * diff))
        mn = lo.copy()
        for step in range(nstep + 1):  # the C loop updates min as it finds better fits: later candidates start from it
            iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - mn)).astype(F32)
            la = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
            wl = (w * la).astype(F32)
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * la)
            sum_xl = _seqsum(wl * x)
            D = (sum_w * sum_l2 - sum_l * sum_l).astype(F32)
            this_scale = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(F32)
            this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(F32)
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, (sum_xl / sum_l2).astype(F32), this_scale)
            diff = (this_scale[:, None] * la + this_min[:, None] - x).astype(F32)
            cur = _seqsum(w * (diff * diff))
            take = (D > 0) & (cur < best) & ~flat
            L = np.where(take[:, None], la, L)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
        scale = np.where(flat, F32(0), scale).astype(F32)
        L = np.where(flat[:, None], F32(0), L)
        return scale, (-mn).astype(F32), L.astype(np.uint8)


def _quantize_scale_min(w: np.ndarray, bits: int, rmin: float, nstep: int) -> KBlocks:
    """``quantize_row_q4_K_ref`` (bits 4) / ``quantize_row_q5_K_ref`` (bits 5)."""
    w = _check(w)
    rows, cols = w.shape
    nmax = (1 << bits) - 1
    x = w.reshape(-1, 32)
    av_x = np.sqrt((_seqsum(x * x) / F32(32)).astype(F32)).astype(F32)
    weights = (av_x[:, None] + np.abs(x)).astype(F32)
    scales, mins, L = _in_row_chunks(lambda xs, ws: _make_qkx2(xs, ws, nmax, rmin, 0.1, nstep), x, weights)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(_rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / F32(63)).astype(F32).astype(np.float16)
    dmin = (max_min / F32(63)).astype(F32).astype(np.float16)
    blocks = KBlocks(f"q{bits}_k", d.reshape(rows, -1), ls.reshape(rows, -1), np.zeros((rows, cols), np.uint8),
                     dmin.reshape(rows, -1), lm.reshape(rows, -1))
    codes = codes_on_grid(w, blocks, keep=L.reshape(rows, cols))
    return blocks._replace(codes=codes)


def quantize_q4_k(w: np.ndarray) -> KBlocks:
    return _quantize_scale_min(w, 4, -1.0, 20)


def quantize_q5_k(w: np.ndarray) -> KBlocks:
    return _quantize_scale_min(w, 5, -0.5, 15)


# ---------------------------------------------------------------- make_qx_quants (Q6_K)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``make_qx_quants`` with rmse_type 1 (weights x^2) over sub-blocks x: (S, n).
    Returns (scale, L) with L = l + nmax as uint8."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        idx = np.abs(x).argmax(axis=1)
        mx = x[np.arange(len(x)), idx]
        zero = np.abs(mx) < GROUP_MAX_EPS
        wgt = (x * x).astype(F32)

        def sums(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            lvl = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
            return lvl, _seqsum((wgt * x).astype(F32) * lvl), _seqsum((wgt * lvl).astype(F32) * lvl)

        iscale = (F32(-nmax) / mx).astype(F32)
        lvl, sumlx, suml2 = sums(iscale)
        L = lvl
        scale = np.where(suml2 != 0, (sumlx / suml2).astype(F32), F32(0)).astype(F32)
        best = (scale * sumlx).astype(F32)
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / mx).astype(F32)
            lvl, sumlx, suml2 = sums(iscale)
            take = (suml2 > 0) & ((sumlx * sumlx).astype(F32) > (best * suml2).astype(F32)) & ~zero
            L = np.where(take[:, None], lvl, L)
            scale = np.where(take, (sumlx / suml2).astype(F32), scale)
            best = np.where(take, (scale * sumlx).astype(F32), best)
        scale = np.where(zero, F32(0), scale).astype(F32)
        L = np.where(zero[:, None], F32(-nmax), L)
        return scale, (L + nmax).astype(np.uint8)


def quantize_q6_k(w: np.ndarray) -> KBlocks:
    """``quantize_row_q6_K_ref``."""
    w = _check(w)
    rows, cols = w.shape
    x = w.reshape(-1, 16)
    scales, L = _in_row_chunks(lambda xs: _make_qx(xs, 32), x)
    scales = scales.reshape(-1, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(len(scales)), idx]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, F32(0), F32(-128) / max_scale).astype(F32)
        d = np.where(zero, F32(0), (F32(1) / iscale).astype(F32)).astype(np.float16)
    sc = np.minimum(_rint(iscale[:, None] * scales), 127).astype(np.int8)
    sc[zero] = 0
    blocks = KBlocks("q6_k", d.reshape(rows, -1), sc.reshape(rows, -1), np.zeros((rows, cols), np.uint8))
    keep = L.reshape(-1, QK_K)
    keep[zero] = 0  # an all-zero super-block is written as zero bytes
    return blocks._replace(codes=codes_on_grid(w, blocks, keep=keep.reshape(rows, cols)))


# ---------------------------------------------------------------- the grid


def sub_scales(blocks: KBlocks) -> tuple[np.ndarray, np.ndarray | None]:
    """Per sub-block float32 step ``d * sc`` and minimum ``dmin * m`` [rows, cols/sub] (llama.cpp's d1, m1)."""
    sub = SPEC[blocks.kind][1]
    per = QK_K // sub
    step = (np.repeat(blocks.d.astype(F32), per, axis=1) * blocks.sc.astype(F32)).astype(F32)
    if blocks.m is None:
        return step, None
    return step, (np.repeat(blocks.dmin.astype(F32), per, axis=1) * blocks.m.astype(F32)).astype(F32)


def codes_on_grid(w: np.ndarray, blocks: KBlocks, keep: np.ndarray | None = None) -> np.ndarray:
    """The reference's final rounding of ``w`` onto the grid of ``blocks``: for Q4_K / Q5_K
    ``q = nearest((x + dm) / d)`` clipped to the code range, for Q6_K ``nearest(x / d) + 32``.
    Sub-blocks whose step is zero keep the codes of ``keep`` (the search's own, as the C code
    does), or 0 (Q4_K/Q5_K) / 32 (Q6_K) when none are given."""
    w = _check(w)
    rows, cols = w.shape
    bits, sub, _ = SPEC[blocks.kind]
    step, mn = sub_scales(blocks)
    x = w.reshape(rows, -1, sub)
    with np.errstate(divide="ignore", invalid="ignore"):
        if mn is None:
            q = np.clip(_rint((x / step[..., None]).astype(F32)), -32, 31) + 32
        else:
            q = np.clip(_rint(((x + mn[..., None]) / step[..., None]).astype(F32)), 0, (1 << bits) - 1)
    dead = (step == 0)[..., None]
    if keep is None:
        keep = np.full(w.shape, 32 if mn is None else 0, np.uint8)
    q = np.where(dead, keep.reshape(q.shape).astype(F32), q)
    return q.astype(np.uint8).reshape(rows, cols)


def dequantize(blocks: KBlocks) -> np.ndarray:
    """llama.cpp's ``dequantize_row_q*_K``: ``(d * sc) * q - dmin * m``, or ``(d * sc) * (q - 32)``."""
    rows, cols = blocks.codes.shape
    sub = SPEC[blocks.kind][1]
    step, mn = sub_scales(blocks)
    q = blocks.codes.reshape(rows, -1, sub).astype(F32)
    if mn is None:
        out = step[..., None] * (q - F32(32))
    else:
        out = step[..., None] * q - mn[..., None]
    return out.astype(F32).reshape(rows, cols)


def grid_values(w: np.ndarray, blocks: KBlocks) -> np.ndarray:
    """``w`` rounded onto the fixed grid of ``blocks``: what the runtime computes with."""
    return dequantize(blocks._replace(codes=codes_on_grid(w, blocks, keep=blocks.codes)))


# ---------------------------------------------------------------- GGUF bytes


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minimums per super-block into 12 bytes (ggml's get_scale_min_k4 layout)."""
    out = np.zeros(ls.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    out[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    return out


def _unpack_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ls = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    lm = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return ls, lm


def pack(blocks: KBlocks) -> np.ndarray:
    """GGUF bytes, (rows, super-blocks * bytes) uint8, in ggml's ``block_q*_K`` layout."""
    rows, cols = blocks.codes.shape
    nsb = cols // QK_K
    L = blocks.codes.reshape(rows, nsb, QK_K)
    if blocks.kind == "q6_k":
        c = L.reshape(rows, nsb, 2, 4, 32)  # (half of 128, quarter, l)
        ql = np.concatenate([(c[:, :, :, 0] & 0xF) | ((c[:, :, :, 2] & 0xF) << 4),
                             (c[:, :, :, 1] & 0xF) | ((c[:, :, :, 3] & 0xF) << 4)], axis=-1).reshape(rows, nsb, 128)
        qh = ((c[:, :, :, 0] >> 4) | ((c[:, :, :, 1] >> 4) << 2) | ((c[:, :, :, 2] >> 4) << 4)
              | ((c[:, :, :, 3] >> 4) << 6)).reshape(rows, nsb, 64)
        sc = blocks.sc.reshape(rows, nsb, 16).view(np.uint8)
        d = blocks.d.astype(np.float16).reshape(rows, nsb, 1).view(np.uint8)
        return np.concatenate([ql, qh, sc, d], axis=-1).reshape(rows, -1)
    head = np.concatenate([blocks.d.astype(np.float16).reshape(rows, nsb, 1).view(np.uint8),
                           blocks.dmin.astype(np.float16).reshape(rows, nsb, 1).view(np.uint8),
                           _pack_scale_min(blocks.sc.reshape(rows, nsb, 8), blocks.m.reshape(rows, nsb, 8))], axis=-1)
    c = L.reshape(rows, nsb, 4, 2, 32)  # 64-weight chunks: low nibbles then high nibbles
    qs = ((c[:, :, :, 0] & 0xF) | ((c[:, :, :, 1] & 0xF) << 4)).reshape(rows, nsb, 128)
    if blocks.kind == "q4_k":
        return np.concatenate([head, qs], axis=-1).reshape(rows, -1)
    hi = (c >> 4) & 1  # (rows, nsb, chunk n, half, j): bit 2n + half of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (hi << shifts[None, None, :, :, None]).sum(axis=(2, 3)).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=-1).reshape(rows, -1)


def unpack(kind: str, data: np.ndarray, shape: tuple[int, int]) -> KBlocks:
    """Inverse of :func:`pack`: GGUF bytes of a (rows, cols) tensor back to its blocks."""
    rows, cols = shape
    nsb = cols // QK_K
    b = np.asarray(data, np.uint8).reshape(rows, nsb, SPEC[kind][2])
    if kind == "q6_k":
        ql, qh = b[..., :128].reshape(rows, nsb, 2, 64), b[..., 128:192].reshape(rows, nsb, 2, 32)
        sc = b[..., 192:208].copy().view(np.int8).reshape(rows, -1)
        d = b[..., 208:210].copy().view(np.float16).reshape(rows, nsb)
        q = np.stack([(ql[..., :32] & 0xF) | (((qh >> 0) & 3) << 4), (ql[..., 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                      (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)], axis=3)
        return KBlocks(kind, d, sc, q.reshape(rows, cols).astype(np.uint8))
    d = b[..., 0:2].copy().view(np.float16).reshape(rows, nsb)
    dmin = b[..., 2:4].copy().view(np.float16).reshape(rows, nsb)
    ls, lm = _unpack_scale_min(b[..., 4:16])
    if kind == "q4_k":
        qs = b[..., 16:144].reshape(rows, nsb, 4, 32)
        q = np.stack([qs & 0xF, qs >> 4], axis=3)
    else:
        qh, qs = b[..., 16:48], b[..., 48:176].reshape(rows, nsb, 4, 32)
        bits = np.stack([np.stack([(qh >> (2 * n + h)) & 1 for h in range(2)], axis=2) for n in range(4)], axis=2)
        q = np.stack([qs & 0xF, qs >> 4], axis=3) | (bits << 4)
    return KBlocks(kind, d, ls.reshape(rows, -1), q.reshape(rows, cols).astype(np.uint8), dmin, lm.reshape(rows, -1))


# ---------------------------------------------------------------- torch twins


def torch_reference_round_trip(w: Any, clip: Any = None, *, kind: str) -> Any:
    """The reference round trip of a torch weight (numpy underneath: the search is not a training
    path, it runs once per tensor for sensitivity and to fix QAT's grid)."""
    import torch

    out = dequantize(QUANTIZERS[kind](w.detach().float().cpu().numpy()))
    return torch.from_numpy(out).to(w.device)


def torch_grids(blocks: KBlocks) -> tuple[Any, Any]:
    """(step, minimum) torch tensors [rows, cols/sub, 1] of a grid, for :func:`torch_grid_round_trip`
    (minimum None for Q6_K)."""
    import torch

    step, mn = sub_scales(blocks)
    return torch.from_numpy(step[..., None]), None if mn is None else torch.from_numpy(mn[..., None])


def torch_grid_round_trip(w: Any, step: Any, mn: Any, bits: int) -> Any:
    """Torch twin of :func:`grid_values`, bit-identical: ``w`` rounded onto a fixed grid."""
    import torch

    rows, cols = w.shape
    x = w.float().reshape(rows, step.shape[1], -1)
    dead = step == 0
    safe = torch.where(dead, torch.ones_like(step), step)
    if mn is None:
        q = torch.round(x / safe).clamp(-32, 31)
        out = torch.where(dead, torch.zeros_like(x), step * q)
    else:
        q = torch.round((x + mn) / safe).clamp(0, (1 << bits) - 1)
        out = torch.where(dead, (-mn).expand_as(x), step * q - mn)
    return out.reshape(rows, cols)


def save_grids(path: Any, grids: dict[str, KBlocks]) -> None:
    """Grids by weight name in one ``.npz`` (next to the QAT model: the exporters need them)."""
    arrays: dict[str, np.ndarray] = {}
    for name, b in grids.items():
        arrays[f"{name}|kind"] = np.array(b.kind)
        for field in GRID_FIELDS:
            value = getattr(b, field)
            if value is not None:
                arrays[f"{name}|{field}"] = value
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_grids(path: Any) -> dict[str, KBlocks]:
    from pathlib import Path

    if not Path(path).exists():
        return {}
    with np.load(path) as z:
        names = {k.split("|")[0] for k in z.files}
        return {n: KBlocks(str(z[f"{n}|kind"]), z[f"{n}|d"], z[f"{n}|sc"], z[f"{n}|codes"],
                           z[f"{n}|dmin"] if f"{n}|dmin" in z.files else None, z[f"{n}|m"] if f"{n}|m" in z.files else None)
                for n in names}


REFERENCES: dict[str, Any] = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}


def quantize(kind: str, w: np.ndarray) -> KBlocks:
    """``w`` in ``kind``: llama.cpp's own quantizer where llama-cpp-python is installed (its bytes
    unpacked; 6-11x faster than the numpy reference on every core, measured on 2: benchmarks/RESULTS.md,
    "Speed of the toolkit", 12), else the numpy reference. The same bytes either way: tests compare both with the files
    ``llama_model_quantize`` writes."""
    from .device.llamacpp import ggml_quantize
    from .versions import usable_threads

    w = _check(w)
    raw = ggml_quantize(kind, w, w.shape[1] // QK_K * SPEC[kind][2], usable_threads(1 << 10))
    return REFERENCES[kind](w) if raw is None else unpack(kind, raw, w.shape)


QUANTIZERS: dict[str, Any] = {kind: functools.partial(quantize, kind) for kind in REFERENCES}
