"""Import edgekd's public API, CLI and every module of edgekd.device with the training and export
stack unimportable; print what was imported. Run as a script (by the device-side tests)."""

import importlib
import importlib.abc
import pkgutil
import sys

BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "accelerate", "datasets", "safetensors", "torchao")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the device side must not import it")
        return None


sys.meta_path.insert(0, Block())
import edgekd  # noqa: E402
import edgekd.device  # noqa: E402

modules = ["edgekd", "edgekd.cli", "edgekd.formats", "edgekd.families", "edgekd.profiles", "edgekd.report"]
modules += [f"edgekd.device.{m.name}" for m in pkgutil.iter_modules(edgekd.device.__path__)]
# bench --against: the KL statistics of two runtime files, held-out text tokenized by llama.cpp
modules += ["edgekd.quality.check", "edgekd.quality.sources", "edgekd.methods.kl_stats", "edgekd.methods.data"]
for name in modules:
    importlib.import_module(name)
edgekd.load_profile("raspberry-pi-5")
print(" ".join(modules))
