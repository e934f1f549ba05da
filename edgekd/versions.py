"""Versions of edgekd and the libraries it drives, for reports (read from metadata, no imports)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

TRACKED = [
    "torch", "transformers", "accelerate", "tokenizers", "datasets", "safetensors", "gguf",
    "onnx", "onnxruntime", "onnxruntime-genai", "onnxscript", "torchao", "llama-cpp-python", "numpy", "pydantic",
]


def edgekd_version() -> str:
    try:
        return md.version("edgekd")
    except md.PackageNotFoundError:
        return "0+unknown"


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "edgekd": edgekd_version()}
    for name in TRACKED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# instruction sets that change what the kernels (torch's, llama.cpp's, onnxruntime's) can do
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "i8mm", "bf16")


def host_info() -> dict[str, object]:
    cpu, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and cpu is None:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    return {"machine": platform.machine(), "cpu": cpu, "logical_cpus": os.cpu_count(), "system": platform.system(),
            "isa": " ".join(f for f in ISA_FLAGS if f in flags)}


def usable_threads(wanted: int) -> int:
    """``wanted`` threads capped at the cores this process may run on: more threads than cores
    makes llama.cpp's and onnxruntime's decode several times slower (threads spin-wait on each other)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(wanted, cores))
