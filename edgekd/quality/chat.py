"""Chat side by side: the same prompts, greedy, through the teacher (torch) and each shipped file (its runtime).

A user's first look at a compressed model is a chat with it; the KL statistics can stay small
while the replies go wrong (a broken chat template, a stop token lost in export). Every prompt
goes through the teacher's chat template (plain text where the tokenizer has none), is decoded
greedily to ``new_tokens`` or the end-of-turn token, and each file's reply is compared token by
token with the teacher's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

Greedy = Callable[[list[int], int], list[int]]  # (prompt ids, new tokens) -> continuation ids, stop token included


def prompt_ids(tokenizer: Any, prompts: list[str], prompts_file: Any = None) -> list[tuple[str, list[int]]]:
    """(shown text, token ids) per prompt: the profile's strings as one user turn each, then a JSONL
    file's (``{"messages": [...]}`` or ``{"prompt": "..."}``, as ``--prompts`` reads them)."""
    from ..methods.chat_template import chat_prompt
    from ..methods.generate import read_prompt_file

    out = []
    for text in prompts:
        if getattr(tokenizer, "chat_template", None):
            out.append((text, chat_prompt(tokenizer, [{"role": "user", "content": text}])))
        else:
            out.append((text, list(tokenizer(text, add_special_tokens=True)["input_ids"])))
    if prompts_file is not None:
        for ids in read_prompt_file(prompts_file, tokenizer):
            out.append((tokenizer.decode(ids, skip_special_tokens=True).strip()[-200:], list(ids)))
    return out


def until_stop(tokens: list[int], stop_ids: Collection[int]) -> list[int]:
    """``tokens`` up to and without the first of ``stop_ids``."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stop_ids), list(tokens))


def torch_greedy(model: Any, stop_ids: tuple[int, ...]) -> Greedy:
    import torch

    def run(prompt: list[int], new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=list(stop_ids) or None, pad_token_id=stop_ids[0] if stop_ids else None)
        return out[0, len(prompt):].tolist()

    return run


def runtime_greedy(path: Path, threads: int, context: int, stop_ids: tuple[int, ...]) -> Greedy:
    """Greedy decoding in the runtime that ships ``path`` (llama.cpp, onnxruntime-genai, onnxruntime)."""
    from .sources import kind_of

    kind = kind_of(path)
    if kind == "gguf":
        from ..device import llamacpp

        llm = llamacpp.load(path, n_ctx=context, threads=threads)
        return llamacpp.Owned(llm, lambda prompt, n: llamacpp.greedy(llm, prompt, n, stop_ids))
    if kind == "onnx-genai":
        from ..device.onnxgenai import GenaiModel, folder_of

        model = GenaiModel(folder_of(path), threads)
        return lambda prompt, n: model.greedy(np.asarray(prompt), n)
    if kind == "onnx":
        from ..device.onnxrt import Decoder

        decoder = Decoder(path, threads)
        return lambda prompt, n: decoder.greedy(np.asarray(prompt), n)
    raise ValueError(f"{path} is not a shipped file")


def side_by_side(teacher: Greedy, files: dict[str, Greedy], prompts: list[tuple[str, list[int]]], new_tokens: int,
                 tokenizer: Any, stop_ids: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per prompt: the teacher's reply and each file's, with how many leading tokens match the teacher's."""
    out = []
    for text, ids in prompts:
        ref = until_stop(teacher(ids, new_tokens), stop_ids)
        row = {"prompt": text, "prompt_tokens": len(ids), "teacher": tokenizer.decode(ref, skip_special_tokens=True),
               "teacher_tokens": len(ref), "files": {}}
        for name, greedy in files.items():
            got = until_stop(greedy(ids, new_tokens), stop_ids)
            same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            row["files"][name] = {"reply": tokenizer.decode(got, skip_special_tokens=True), "tokens": len(got),
                                  "same_prefix_tokens": same, "identical": got == ref}
        out.append(row)
    return out


def markdown_cell(text: str, limit: int = 400) -> str:
    """One table cell: pipes escaped, line breaks kept as <br>, long replies cut."""
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def report_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    table = []
    for r in rows:
        table.append([markdown_cell(r["prompt"], 120), "teacher (torch)", markdown_cell(r["teacher"]), f"{r['teacher_tokens']} tokens"])
        for name, f in r["files"].items():
            verdict = "identical" if f["identical"] else f"first {f['same_prefix_tokens']} of {f['tokens']} the same"
            table.append(["", name, markdown_cell(f["reply"]), verdict])
    return {"headers": ["prompt", "model", "greedy reply", "tokens against the teacher's"], "rows": table}
