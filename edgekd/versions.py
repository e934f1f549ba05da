"""Versions of edgekd and the libraries it drives, for reports (read from metadata, no imports)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

TRACKED = [
    "torch", "transformers", "accelerate", "tokenizers", "datasets", "safetensors", "gguf",
    "onnx", "onnxruntime", "onnxscript", "torchao", "llama-cpp-python", "numpy", "pydantic",
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


def host_info() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu, "logical_cpus": os.cpu_count(), "system": platform.system()}


def usable_threads(wanted: int) -> int:
    """``wanted`` threads capped at the cores this process may run on: more threads than cores
    makes llama.cpp's and onnxruntime's decode several times slower (threads spin-wait on each other)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(wanted, cores))
