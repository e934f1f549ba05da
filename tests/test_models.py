import json
import shutil

import pytest

from edgekd import EdgekdError
from edgekd.methods.models import inspect_gguf, load_causal_lm, resolve_model_source


def test_load_hf_directory(tiny_model_dir):
    loaded = load_causal_lm(resolve_model_source(tiny_model_dir))
    assert loaded.info["layers"] == 4 and loaded.info["hidden_size"] == 64
    assert loaded.info["architecture"] == "llama"
    assert loaded.tokenizer.pad_token_id is not None
    assert next(loaded.model.parameters()).dtype.is_floating_point


def test_missing_model_path():
    with pytest.raises(EdgekdError) as exc:
        resolve_model_source("/no/such/model")
    assert "model not found: /no/such/model" in str(exc.value)
    assert "Hub model id" in str(exc.value)


def test_a_hub_id_is_downloaded_through_huggingface_hub(tmp_path, tiny_model_dir, monkeypatch):
    """A local stand-in for the Hub: snapshot_download is asked for the repository's configs,
    safetensors and tokenizer files, and its snapshot is the teacher."""
    import huggingface_hub

    asked = {}

    def fake_snapshot(repo, revision=None, allow_patterns=None, repo_type="model"):
        asked.update(repo=repo, revision=revision, patterns=allow_patterns, repo_type=repo_type)
        snapshot = tmp_path / "hub" / repo.replace("/", "--")
        if not snapshot.exists():
            shutil.copytree(tiny_model_dir, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    src = resolve_model_source("someone/tiny-llama@main")
    assert src.kind == "hf_dir" and src.name == "someone/tiny-llama" and (src.path / "config.json").exists()
    assert asked["repo"] == "someone/tiny-llama" and asked["revision"] == "main" and "*.safetensors" in asked["patterns"]
    assert load_causal_lm(src).info["layers"] == 4


def test_hub_failures_get_one_clear_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(EdgekdError) as exc:
        resolve_model_source("Qwen/Qwen3-0.6B")
    assert "not in the local Hugging Face cache" in str(exc.value) and "connect to the internet once" in exc.value.render()


def test_offline_a_hub_id_not_in_the_cache_fails_at_once_with_the_fix(capsys):
    """The real huggingface_hub, offline (as the tests run): one message naming the id, exit 2."""
    import huggingface_hub.constants

    from edgekd.cli import main

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    assert main(["compress", "--teacher", "someone/not-cached-model", "--output", "/nonexistent/out"]) == 2
    err = capsys.readouterr().err
    assert "someone/not-cached-model is not in the local Hugging Face cache" in err and "Traceback" not in err
    assert main(["compress", "--data", "someone/not-cached-data", "--output", "/nonexistent/out"]) == 2
    err = capsys.readouterr().err
    assert "the dataset someone/not-cached-data is not in the local Hugging Face cache" in err and "local dataset directory" in err


def test_directory_without_config(tmp_path):
    with pytest.raises(EdgekdError, match="without config.json"):
        resolve_model_source(tmp_path)


def test_unsupported_architecture_names_supported_ones(tiny_model_dir, tmp_path):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgekdError) as exc:
        load_causal_lm(resolve_model_source(bad))
    text = str(exc.value)
    assert "unsupported architecture 'gpt2'" in text
    assert "Llama" in text and "Qwen2" in text and "Mistral" in text and "Qwen3" in text and "Phi-3" in text


@pytest.mark.parametrize("model_type, why", [("lfm2", "short-convolution"), ("qwen3_next", "Gated DeltaNet"),
                                             ("gemma3n", "hybrid"), ("qwen3_5", "Gated DeltaNet")])
def test_hybrids_are_refused_with_the_reason(tiny_model_dir, tmp_path, model_type, why):
    bad = tmp_path / model_type
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = model_type
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgekdError) as exc:
        load_causal_lm(resolve_model_source(bad))
    assert f"unsupported architecture {model_type!r} in " in str(exc.value) and why in str(exc.value)


def test_remote_code_needs_the_flag(tiny_model_dir, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgekdError, match="--trust-remote-code"):
        load_causal_lm(resolve_model_source(custom))


def test_missing_weights(tiny_model_dir, tmp_path):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(EdgekdError, match="could not load the model weights"):
        load_causal_lm(resolve_model_source(broken))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(EdgekdError, match="is not a GGUF file"):
        resolve_model_source(path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(EdgekdError) as exc:
        inspect_gguf(path)
    assert ("corrupt or truncated GGUF" in str(exc.value) or "can hold" in str(exc.value)) and "re-download or re-export" in str(exc.value)


def test_truncated_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(EdgekdError, match="corrupt or truncated|is truncated"):
        inspect_gguf(path)
