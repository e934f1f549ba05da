"""edgekd: compress a language model for an edge device.

Public API (cheap to import: torch, transformers and onnx load only when a function needs them)::

    import edgekd
    report = edgekd.compress(teacher=None, profile="raspberry-pi-5")
    assert report.passed, report.failures()
"""

from __future__ import annotations

from typing import Any

from .errors import EdgekdError
from .profiles import DeviceProfile, load_profile
from .report import Report
from .versions import edgekd_version

__version__ = edgekd_version()
__all__ = ["compress", "bench", "evaluate", "load_profile", "Report", "DeviceProfile", "EdgekdError", "__version__"]


def compress(*args: Any, **kwargs: Any) -> Report:
    from .pipeline.run import compress as _compress

    return _compress(*args, **kwargs)


compress.__doc__ = "Compress a teacher for a device profile; see edgekd.pipeline.run.compress."


def bench(*args: Any, **kwargs: Any) -> Any:
    from .device.bench import bench as _bench

    return _bench(*args, **kwargs)


bench.__doc__ = "Benchmark an exported model against a profile's budgets; see edgekd.device.bench.bench."


def evaluate(*args: Any, **kwargs: Any) -> Any:
    from .quality.check import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


evaluate.__doc__ = ("Score a model (GGUF, ONNX, Hugging Face directory or run directory) against its teacher: token KL "
                    "statistics and the quality budgets; see edgekd.quality.check.evaluate.")
