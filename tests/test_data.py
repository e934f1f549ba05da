import json

import numpy as np
import pytest

from edgekd import EdgekdError
from edgekd.methods.data import (
    Corpus,
    default_documents,
    load_corpus,
    read_documents,
    split_documents,
)


def test_default_corpus_is_python_docs_and_split_is_deterministic():
    docs = default_documents()
    assert len(docs) > 50 and sum(len(d.text) for d in docs) > 400_000
    train1, held1 = split_documents(docs, 0.1)
    train2, held2 = split_documents(list(reversed(docs)), 0.1)  # file order must not matter
    assert {d.key for d in held1} == {d.key for d in held2}
    assert not {d.key for d in held1} & {d.key for d in train1}
    held_chars = sum(len(d.text) for d in held1)
    total = sum(len(d.text) for d in docs)
    assert 0.1 <= held_chars / total < 0.3


def test_blocks_are_packed_and_heldout_is_disjoint(tiny_tokenizer, small_corpus_file):
    corpus = load_corpus(small_corpus_file, tiny_tokenizer, block_len=64, heldout_fraction=0.1)
    assert corpus.train.shape[1] == 64 and corpus.heldout.shape[1] == 64
    assert corpus.train.dtype == np.int32
    assert corpus.stats["split"] == "document-level"
    train_rows = {r.tobytes() for r in corpus.train}
    assert not any(r.tobytes() in train_rows for r in corpus.heldout)
    # EOS separates documents in the packed stream
    assert (corpus.train == tiny_tokenizer.eos_token_id).sum() > 0


def test_corpus_save_load_round_trip(tiny_tokenizer, small_corpus_file, tmp_path):
    corpus = load_corpus(small_corpus_file, tiny_tokenizer, block_len=64)
    corpus.save(tmp_path)
    again = Corpus.load(tmp_path)
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.heldout, corpus.heldout)
    assert again.stats == corpus.stats


def test_jsonl_corpus(tiny_tokenizer, small_corpus_file, tmp_path):
    text = small_corpus_file.read_text()
    path = tmp_path / "c.jsonl"
    paras = [p for p in text.split("\n\n") if p.strip()]
    path.write_text("\n".join(json.dumps({"body": p, "id": i}) for i, p in enumerate(paras)))
    corpus = load_corpus(path, tiny_tokenizer, block_len=64, text_field="body")
    assert corpus.stats["documents"] == len(paras) and len(corpus.heldout) >= 1


def test_jsonl_missing_field_names_fix(tiny_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(EdgekdError) as exc:
        load_corpus(path, tiny_tokenizer, block_len=64)
    assert "has no 'text' field (found: ['body'])" in str(exc.value) and "--text-field" in str(exc.value)


def test_jsonl_bad_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(EdgekdError, match=r"c.jsonl:2 is not valid JSON"):
        load_corpus(path, tiny_tokenizer, block_len=64)


def test_directory_of_text_files(tiny_tokenizer, small_corpus_file, tmp_path):
    paras = small_corpus_file.read_text().split("\n\n")
    for i in range(0, len(paras), 40):
        (tmp_path / f"part{i:04d}.txt").write_text("\n\n".join(paras[i : i + 40]))
    name, docs, _ = read_documents(tmp_path)
    assert name.startswith("text-dir:") and len(docs) >= 3
    corpus = load_corpus(tmp_path, tiny_tokenizer, block_len=64)
    assert len(corpus.train) > len(corpus.heldout) >= 1


def test_hf_datasets_directory_uses_its_validation_split(tiny_tokenizer, small_corpus_file, tmp_path):
    datasets = pytest.importorskip("datasets")
    paras = [p for p in small_corpus_file.read_text().split("\n\n") if p.strip()]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": paras[:-40]}),
        "validation": datasets.Dataset.from_dict({"text": paras[-40:]}),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(tmp_path / "ds", tiny_tokenizer, block_len=32)
    assert corpus.name.startswith("datasets:")
    assert corpus.stats["heldout_documents"] == 40


def test_a_hub_dataset_id_is_downloaded_and_read_by_datasets(tiny_tokenizer, small_corpus_file, tmp_path, monkeypatch):
    """A local stand-in for the Hub: a dataset repository of parquet files (train and validation
    splits, named as on the Hub), fetched through snapshot_download and read by datasets."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    from edgekd.methods.data import check_corpus_spec

    paras = [p for p in small_corpus_file.read_text().split("\n\n") if p.strip()]
    repo_dir = tmp_path / "hub" / "someone--docs"
    (repo_dir / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"body": paras[:-30]}).to_parquet(str(repo_dir / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"body": paras[-30:]}).to_parquet(str(repo_dir / "data" / "validation-00000-of-00001.parquet"))
    asked = []

    def fake_snapshot(repo, revision=None, allow_patterns=None, repo_type="model"):
        asked.append((repo, revision, repo_type, "*.parquet" in allow_patterns))
        return str(repo_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    check_corpus_spec("someone/docs@v1")
    corpus = load_corpus("someone/docs@v1", tiny_tokenizer, block_len=32, text_field="body")
    assert asked == [("someone/docs", "v1", "dataset", True)] * 2
    assert corpus.name == "hub-dataset:someone/docs@v1" and corpus.stats["heldout_documents"] == 30
    with pytest.raises(EdgekdError, match="no 'text' column"):
        load_corpus("someone/docs", tiny_tokenizer, block_len=32)


def test_empty_corpus_error(tiny_tokenizer, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("   \n\n  ")
    with pytest.raises(EdgekdError, match="is empty"):
        load_corpus(path, tiny_tokenizer, block_len=64)


def test_corpus_smaller_than_a_block(tiny_tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words")
    with pytest.raises(EdgekdError) as exc:
        load_corpus(path, tiny_tokenizer, block_len=64)
    assert "too few for one training block and one held-out block" in str(exc.value)
    assert "compression.data.block_len" in str(exc.value)


def test_missing_corpus(tiny_tokenizer):
    with pytest.raises(EdgekdError, match="corpus not found"):
        load_corpus("/no/such/corpus.txt", tiny_tokenizer, block_len=64)


def test_single_small_document_falls_back_to_stream_split(tiny_tokenizer, small_corpus_file, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(small_corpus_file.read_text()[:3000])
    corpus = load_corpus(path, tiny_tokenizer, block_len=32)
    assert corpus.stats["split"].startswith("token-stream tail")
    assert len(corpus.heldout) >= 1 and len(corpus.train) >= 1
