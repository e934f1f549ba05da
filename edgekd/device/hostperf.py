"""Measured ceilings of the machine edgekd runs on: memory bandwidth and fp32 compute.

The roofline projection (:mod:`edgekd.device.costmodel`) needs the host's own ceilings to tell how
far a runtime is from them on this machine, before carrying that efficiency over to a device:

- bandwidth: a STREAM-style copy (McCalpin 1995) of arrays far larger than the caches, split
  across ``threads`` threads (numpy releases the GIL while copying); bytes counted as STREAM
  counts them for Copy, read + write;
- compute: an fp32 matrix product through numpy's BLAS with ``threads`` threads.

Both run in a fresh child process, so the BLAS thread count is set before the library loads
and a caller's own threads (a training run) do not share the measurement. Needs no torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

COPY_BYTES = 256 * 2**20  # per array: far beyond any L3 cache of an edge CPU or a laptop
GEMM_N = 1024


@dataclass
class HostPerf:
    threads: int
    copy_bandwidth_gbs: float  # STREAM Copy convention: (read + write) bytes / s, best of the repeats
    gemm_gflops_fp32: float  # best of the repeats

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _copy_bandwidth(threads: int, nbytes: int, repeats: int) -> float:
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, len(src), threads + 1).astype(int)

    def part(i: int) -> None:
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    best = 0.0
    for _ in range(repeats + 1):  # the first pass faults the pages in
        workers = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t))
    return best / 1e9


def _gemm_gflops(n: int, repeats: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: BLAS thread pool start
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best / 1e9


def measure_in_process(threads: int, repeats: int = 5, copy_bytes: int = COPY_BYTES) -> HostPerf:
    return HostPerf(threads, _copy_bandwidth(threads, copy_bytes, repeats), _gemm_gflops(GEMM_N, repeats))


def measure(threads: int, repeats: int = 5, copy_bytes: int = COPY_BYTES) -> HostPerf:
    """Bandwidth and GEMM ceilings with ``threads`` threads, in a child process."""
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    job = json.dumps({"threads": threads, "repeats": repeats, "copy_bytes": copy_bytes})
    proc = subprocess.run([sys.executable, "-m", "edgekd.device.hostperf"], input=job, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"host measurement failed: {proc.stderr.strip()[-400:]}")
    return HostPerf(**json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    args = json.loads(sys.stdin.read())
    print(json.dumps(measure_in_process(args["threads"], args["repeats"], args["copy_bytes"]).to_dict()))
