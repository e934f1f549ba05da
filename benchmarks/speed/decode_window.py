"""A decoding process for the decode benchmarks: load a GGUF, decode 64-token sequences from
``start`` until ``stop`` (Unix times; start 0: right after loading), print the rate.

    python benchmarks/speed/decode_window.py FILE.gguf THREADS START STOP [MAPS_OUT]

MAPS_OUT: where to write this process's /proc/self/maps, for naming a profiler's addresses.
"""

import sys
import time

from edgekd.device import llamacpp


def main() -> None:
    gguf, threads, start, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    maps_out = sys.argv[5] if len(sys.argv) > 5 else ""
    llm = llamacpp.load(gguf, n_ctx=256, threads=threads, n_batch=32)
    toks = [(i * 7919) % llm.n_vocab() for i in range(64)]
    llm.eval(toks[:8])  # warm-up
    start = start or time.time()
    while time.time() < start:
        time.sleep(0.001)
    n = 0
    while time.time() < stop:
        llm.reset()
        for t in toks:
            llm.eval([t])
            n += 1
    print(f"decode_tokens_per_s={n / (time.time() - start)}")  # over the window
    if maps_out:
        with open("/proc/self/maps") as src, open(maps_out, "w") as dst:
            dst.write(src.read())


if __name__ == "__main__":
    main()
