"""Hostile and broken input gets exit 2 and one clear message: never a crash, a hang or a traceback.

GGUF files broken in every section (and a seeded fuzz of the header reader), ONNX files cut short
or missing their external data, YAML profiles that are huge, deeply nested or anchor bombs,
``--set`` values of the wrong type, run names that escape the output root.
"""

import shutil
import struct

import numpy as np
import pytest

from edgekd.cli import main
from edgekd.device.gguf_check import check_gguf, read_gguf
from edgekd.errors import EdgekdError

FUZZ_FILES = 3000


@pytest.fixture(scope="module")
def tiny_gguf(tiny_gguf_of):
    return tiny_gguf_of("q8_0")


def _layout(path):
    """Byte positions of the GGUF sections: end of the fixed header, of the key-values, of the tensor infos; data start."""
    reader = read_gguf(path)
    base = reader.data.__array_interface__["data"][0]
    where = lambda a: a.__array_interface__["data"][0] - base  # noqa: E731
    kv_end = max(where(f.parts[-1]) + f.parts[-1].nbytes for f in reader.fields.values() if not f.name.startswith("GGUF."))
    first_tensor = reader.tensors[0].field
    offset_part = first_tensor.parts[-1]  # the tensor's data offset (uint64)
    return {"header": 24, "kv_end": kv_end, "infos_end": reader.data_offset, "first_offset_at": where(offset_part),
            "size": path.stat().st_size}


def _broken(src, tmp_path):
    """name -> bytes of a GGUF broken one way."""
    good = src.read_bytes()
    lay = _layout(src)
    cases = {
        "wrong magic": b"GGML" + good[4:],
        "empty": b"",
        "cut in the magic": good[:2],
        "cut in the counts": good[:12],
        "cut in the key-values": good[: (24 + lay["kv_end"]) // 2],
        "cut in the tensor infos": good[: (lay["kv_end"] + lay["infos_end"]) // 2],
        "cut in the tensor data": good[: (lay["infos_end"] + lay["size"]) // 2],
        "absurd key-value count": good[:16] + struct.pack("<Q", 1 << 40) + good[24:],
        "absurd tensor count": good[:8] + struct.pack("<Q", 1 << 40) + good[16:],
        "version 99": good[:4] + struct.pack("<I", 99) + good[8:],
        "a tensor's data past the end": good[: lay["first_offset_at"]] + struct.pack("<Q", 1 << 40) + good[lay["first_offset_at"] + 8:],
    }
    # a key's length past the end of the file: the first key-value's length field, at byte 24
    cases["a key longer than the file"] = good[:24] + struct.pack("<Q", 1 << 50) + good[32:]
    return cases


def test_every_broken_gguf_is_refused_by_bench_eval_and_compress(tiny_gguf, tmp_path, capsys):
    for name, data in _broken(tiny_gguf, tmp_path).items():
        bad = tmp_path / (name.replace(" ", "-").replace("'", "") + ".gguf")
        bad.write_bytes(data)
        with pytest.raises(EdgekdError):
            check_gguf(bad)
        for argv in (["bench", str(bad), "--repeats", "1"], ["eval", str(bad)],
                     ["compress", "--teacher", str(bad), "--output", str(tmp_path / "out"), "--quiet"]):
            assert main(argv) == 2, (name, argv)
            err = capsys.readouterr().err
            assert "Traceback" not in err and ("GGUF" in err or "gguf" in err), (name, argv, err)
        assert not (tmp_path / "out").exists()  # nothing half-made


def test_a_chat_template_that_is_not_jinja_is_refused(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan
    from edgekd.methods.models import resolve_model_source

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }"  # an unclosed block
    out = export_gguf(model, tok, tmp_path / "bad-template.gguf", FormatPlan.uniform("q8_0"), source_name="tiny")
    with pytest.raises(EdgekdError, match="not a valid Jinja template"):
        resolve_model_source(out)
    assert main(["compress", "--teacher", str(out), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert "chat template" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_hugging_face_teacher_with_a_broken_chat_template_is_refused_before_training(tiny_model_dir, tmp_path, capsys):
    import json

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] "  # an unclosed expression
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["compress", "--teacher", str(teacher), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a valid Jinja template" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_spans_longer_than_the_teachers_positions_are_refused(tiny_model_dir, tmp_path, capsys):
    """A rotary teacher computes past its positions without an error, its logits (the student's targets) off
    what it was trained on: a training block or a teacher sample longer than them is refused (the tiny model: 512)."""
    import json

    code = main(["compress", "--teacher", str(tiny_model_dir), "--output", str(tmp_path / "block"), "--quiet",
                 "--set", "compression.data.block_len=1024"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "(compression.data.block_len=1024) is 1024 tokens, longer than the teacher's context of 512 positions" in err
    assert "Traceback" not in err and not (tmp_path / "block").exists()
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": " ".join(["the attribute of the object"] * 200)}) + "\n")
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", "teacher", "--prompts", str(tmp_path / "long.jsonl"),
                 "--output", str(tmp_path / "long"), "--quiet"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "longer than the teacher's context of 512 positions" in err and "shorten the prompts" in err
    assert "Traceback" not in err and not (tmp_path / "long").exists()


def mutate(good: bytes, head: int, i: int, rng) -> bytes:
    """The i-th mutation of a GGUF whose header and tensor infos end at ``head``: byte flips, runs of
    0xff (huge lengths and counts), a cut anywhere, a 64-bit integer overwritten."""
    data = bytearray(good)
    kind = i % 4
    if kind == 0:
        for pos in rng.integers(0, head, size=int(rng.integers(1, 8))):
            data[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:
        pos = int(rng.integers(0, head - 8))
        data[pos: pos + 8] = b"\xff" * 8
    elif kind == 2:
        data = data[: int(rng.integers(0, len(data)))]
    else:
        pos = int(rng.integers(0, head - 8))
        data[pos: pos + 8] = struct.pack("<Q", int(rng.integers(0, 1 << 62)))
    return bytes(data)


def test_fuzzed_gguf_headers_never_escape_as_anything_but_a_clear_error(tiny_gguf, tmp_path):
    """FUZZ_FILES mutations (seeded: a failure reproduces) of the header and infos: byte flips, runs of
    0xff, random cuts, integers overwritten; the reader either accepts the file or raises EdgekdError."""
    good = tiny_gguf.read_bytes()
    head = _layout(tiny_gguf)["infos_end"]
    rng = np.random.default_rng(20261202)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(FUZZ_FILES):
        data = mutate(good, head, i, rng)
        path.write_bytes(data)
        try:
            read_gguf(path)  # uncached: every mutation read afresh
            outcomes["accepted"] += 1
        except EdgekdError:
            outcomes["refused"] += 1
    print(f"GGUF header fuzz: {FUZZ_FILES} mutated files, {outcomes['refused']} refused with a message, "
          f"{outcomes['accepted']} accepted (still well-formed), 0 other exceptions")
    assert outcomes["refused"] > FUZZ_FILES // 2


def test_broken_onnx_files_are_refused(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(b"\x08\x07\x12\x04test" + b"\xff" * 5)
    assert main(["bench", str(cut), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cut.onnx" in err


def test_an_onnx_file_without_its_external_data_is_refused(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("onnxruntime")
    import onnx
    from transformers import AutoModelForCausalLM

    from edgekd.exporters.onnx import export_onnx
    from edgekd.formats import FormatPlan

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    path = export_onnx(model, tmp_path / "m" / "model-q4_0.onnx", FormatPlan.uniform("q4_0"))
    # every weight in the external file, as a large model has them, then the external file lost
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model-q4_0.onnx.data", size_threshold=0)
    (path.parent / "model-q4_0.onnx.data").unlink()
    assert main(["bench", str(path), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model-q4_0.onnx" in err


@pytest.mark.parametrize("name, text, message", [
    ("huge", "description: " + "x" * (2 << 20) + "\n", "a profile is a few kB"),
    ("nested", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
             "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "anchors"),
    ("binary", None, "not a UTF-8 text file"),
])
def test_hostile_profiles_are_refused(tmp_path, capsys, name, text, message):
    path = tmp_path / f"{name}.yaml"
    if text is None:
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(text)
    for argv in (["profiles", "check", str(path)], ["compress", "--profile", str(path), "--output", str(tmp_path / "o"), "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--set", "deployment.threads=many"], "deployment.threads"),
    (["--set", "budgets.max_model_mb=[1, 2]"], "budgets.max_model_mb"),
    (["--set", "compression.distill={steps: x}"], "compression.distill"),
    (["--run-name", "../../x"], "bad run name"),
    (["--run-name", "/etc"], "bad run name"),
    (["--run-name", ".hidden"], "bad run name"),
])
def test_bad_values_and_escaping_names_exit_2(tmp_path, capsys, argv, message):
    assert main(["compress", "--output", str(tmp_path / "o"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "x").exists()


def test_a_copied_gguf_is_checked_again_after_it_changes(tiny_gguf, tmp_path):
    """The check is cached per (path, size, mtime): a file replaced under the same name is read again."""
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, path)
    check_gguf(path)
    path.write_bytes(tiny_gguf.read_bytes()[:100])
    with pytest.raises(EdgekdError, match="truncated|corrupt|can hold"):
        check_gguf(path)
