"""The teacher's own text: prompts, sampled continuations written to the run directory, packed into blocks.

Sequence-level KD (Kim & Rush 2016) trains the student on what the teacher generates, so an
instruct teacher's student keeps the teacher's behaviour instead of adapting to reference text;
with no corpus at all the samples are the whole training set (data-free QAT: LLM-QAT, Liu et al.
2023, found generated data better than real text for 4-bit QAT).

Prompts: the first tokens of corpus blocks, a JSONL file (chat messages rendered by the
tokenizer's chat template, or plain text), nothing (a first token drawn from the vocabulary, as
LLM-QAT starts its samples), the chat template's empty turn, or the chat template opened at the
user's turn, so that the teacher writes a user's message and then answers it (Magpie, Xu et al.
2024: an aligned model's pre-query template alone draws instructions like those it was tuned on).
Generation runs in shards of one batch each, written atomically; shard i is sampled with the seed
``(seed, i)``, so a killed run resumes with the shards it has and ends with the same samples as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgekdError
from ..fileio import atomic_write_bytes, atomic_write_json
from .chat_template import chat_prompt, pre_query_prompt, stop_ids
from .data import _npy_bytes, jsonl_records, pack
from .precision import bf16_linear_weights, forward_precision
from .sampling import left_padded, llama_cpp_continue, torch_continue

PROMPT_KINDS = ("corpus", "none", "chat", "query", "file")


@dataclass(frozen=True)
class Generation:
    """What one set of samples is made with (edgekd.profiles.GenerationSettings, resolved)."""

    tokens: int
    prompt_tokens: int
    new_tokens: int
    temperature: float
    top_p: float
    engine: str  # "torch" or "llama.cpp"
    batch_size: int
    seed: int
    greedy_tokens: int = 0  # the first new tokens of a sample taken greedily (LLM-QAT's hybrid sampling)
    precision: str = "fp32"  # the torch engine's arithmetic: "bf16" (autocast, the linears held in bf16) or "fp32"

    @classmethod
    def from_settings(cls, s: Any, precision: str = "fp32") -> Generation:
        """``precision``: resolved (edgekd.methods.precision.resolve_precision)."""
        return cls(s.tokens, s.prompt_tokens, s.new_tokens, s.temperature, s.top_p,
                   "torch" if s.engine == "auto" else s.engine, s.batch_size, s.seed, s.greedy_tokens, precision)

    @classmethod
    def of_profile(cls, profile: Any) -> Generation:
        """A run's samples: its generation settings, in its forward passes' precision (``compression.distill.precision``)."""
        from .precision import resolve_precision

        return cls.from_settings(profile.compression.data.generation, resolve_precision(profile.compression.distill.precision))


# ---------------------------------------------------------------- prompts


def resolve_prompt_kind(kind: str, has_corpus: bool, prompt_file: Any = None) -> str:
    if prompt_file is not None:
        return "file"
    if kind == "auto":
        return "corpus" if has_corpus else "none"
    if kind == "corpus" and not has_corpus:
        raise EdgekdError("generation.prompts is 'corpus' but this run has no corpus (--data teacher)",
                          fix="set compression.data.generation.prompts to none, chat or query, or pass --prompts FILE")
    return kind


def prompt_source(kind: str, tokenizer: Any, settings: Generation, corpus_blocks: np.ndarray | None = None,
                  prompt_file: Any = None, template_args: dict[str, Any] | None = None) -> Callable[[int, int], list[list[int]]]:
    """``prompts(shard, n)``: the shard's ``n`` prompts (token ids), a pure function of the shard. For
    ``query`` it has a ``reply`` attribute: the tokens that close the user's message and open the answer.
    ``template_args``: the chat template's own variables (chat, query and a file's messages)."""
    if kind == "corpus":
        if corpus_blocks is None or len(corpus_blocks) == 0:
            raise EdgekdError("no corpus blocks to take prompts from", fix="pass --data, or --prompts FILE")
        p = min(settings.prompt_tokens, corpus_blocks.shape[1] - 1)

        def from_corpus(shard: int, n: int) -> list[list[int]]:
            rows = np.random.default_rng([settings.seed, shard, 1]).choice(len(corpus_blocks), n)
            return [corpus_blocks[r, :p].astype(np.int64).tolist() for r in rows]
        return from_corpus
    if kind == "none":
        ordinary = np.setdiff1d(np.arange(len(tokenizer)), np.asarray(tokenizer.all_special_ids, dtype=np.int64))
        start = tokenizer("", add_special_tokens=True)["input_ids"]  # the tokenizer's own BOS, if it adds one

        def from_nothing(shard: int, n: int) -> list[list[int]]:
            firsts = np.random.default_rng([settings.seed, shard, 1]).choice(ordinary, n)
            return [[*start, int(t)] for t in firsts]
        return from_nothing
    if kind == "chat":
        turn = chat_prompt(tokenizer, [{"role": "user", "content": ""}], template_args)
        return lambda shard, n: [list(turn) for _ in range(n)]
    if kind == "query":
        opening, reply = pre_query_prompt(tokenizer, template_args)

        def from_the_user_turn(shard: int, n: int) -> list[list[int]]:
            return [list(opening) for _ in range(n)]
        from_the_user_turn.reply = reply  # type: ignore[attr-defined]  # generate() feeds it after the user's message
        return from_the_user_turn
    if kind == "file":
        prompts = read_prompt_file(prompt_file, tokenizer, template_args)

        def from_file(shard: int, n: int) -> list[list[int]]:
            return [prompts[(shard * n + i) % len(prompts)] for i in range(n)]
        from_file.longest = max(len(p) for p in prompts)  # type: ignore[attr-defined]  # a batch is padded to it
        return from_file
    raise ValueError(f"unknown prompt kind {kind!r}")


def check_prompt_file(path: Any) -> None:
    """Up-front check (before a run directory is made) that the prompt file exists."""
    if not Path(path).expanduser().is_file():
        raise EdgekdError(f"prompt file not found: {path}", fix='pass a JSONL file with one {"messages": [...]} or {"prompt": "..."} per line')


def read_prompt_file(path: Any, tokenizer: Any, template_args: dict[str, Any] | None = None) -> list[list[int]]:
    """Prompts from a JSONL file: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat
    template applied) or ``{"prompt": "text"}`` per line."""
    check_prompt_file(path)
    path = Path(path).expanduser()
    prompts = []
    for n, row in jsonl_records(path):
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(_rendered(tokenizer, row["messages"], template_args, f"{path}:{n}"))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(tokenizer(row["prompt"], add_special_tokens=True)["input_ids"])
        else:
            raise EdgekdError(f"{path}:{n} has neither a 'messages' list nor a 'prompt' string",
                              fix='write {"messages": [{"role": "user", "content": "..."}]} or {"prompt": "..."}')
    if not prompts or not any(prompts):
        raise EdgekdError(f"{path} holds no prompts", fix="add at least one line")
    return [p for p in prompts if p]


def _rendered(tokenizer: Any, messages: list[Any], template_args: dict[str, Any] | None, where: str) -> list[int]:
    """One prompt file row's messages through the chat template; a template that refuses them (its
    ``raise_exception``: roles that do not alternate, a system turn it does not take) names the row."""
    from jinja2.exceptions import TemplateError

    try:
        return chat_prompt(tokenizer, messages, template_args)
    except TemplateError as exc:
        raise EdgekdError(f"{where}: the teacher's chat template refused these messages: {str(exc)[:200]}",
                          fix='write the messages as the template expects them ({"role": "user", "content": "..."} first, '
                          "then alternating turns), or give the prompt as plain text ({\"prompt\": \"...\"})") from None


# ---------------------------------------------------------------- sampling in shards


@dataclass
class Samples:
    stream: np.ndarray  # every sample (prompt + continuation, cut after its first EOS) followed by EOS, int32
    shards: int
    generated_now: int  # shards generated by this call (the rest were on disk)
    tokens_per_s: float | None  # of the shards generated now
    engine: str

    def blocks(self, block_len: int) -> np.ndarray:
        return pack(self.stream, block_len)


def shard_count(settings: Generation) -> int:
    per_shard = settings.batch_size * (settings.prompt_tokens + settings.new_tokens)
    return max(1, math.ceil(settings.tokens / per_shard))


def generate(teacher: Any, tokenizer: Any, prompts: Callable[[int, int], list[list[int]]], settings: Generation,
             directory: Path, gguf_path: Any = None, progress: Callable[..., None] | None = None,
             seconds_left: Callable[[], float] | None = None, fill_s: float | None = None) -> Samples:
    """The teacher's samples under ``directory``: shards already there (same settings) are reused.
    ``seconds_left()``: the time a budget leaves for sampling; once the first shard has measured the
    pace, a projection past it is refused (the shards made so far are kept for ``--resume``).
    ``fill_s``: after the ``settings.tokens`` the settings ask for, go on sampling shards (the same
    seeded stream) while those sampled in this call and the next one at their pace fit in ``fill_s``
    seconds: a time budget's share turned into distinct samples rather than repeats of fewer."""
    directory = Path(directory)
    reply = getattr(prompts, "reply", ())
    # the first shard's prompts stand for where the prompts come from: other prompts, other samples
    fingerprint = hashlib.sha256(json.dumps([prompts(0, settings.batch_size), list(reply)]).encode()).hexdigest()
    stops = stop_ids(teacher, tokenizer)
    meta = {**asdict(settings), "eos": tokenizer.eos_token_id, "stops": list(stops), "prompts_sha256": fingerprint}
    meta_path = directory / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        for old in directory.glob("shard-*.npy"):  # made with other settings: not these samples
            old.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)
    engine = _engine(settings, teacher, gguf_path, reply)
    n_shards, pieces, made, t_gen, n_gen = shard_count(settings), [], 0, 0.0, 0

    def another(shard: int) -> bool:
        """Past the settings' shards: one on disk (a resumed fill), or one more that fits ``fill_s``."""
        if (directory / f"shard-{shard:05d}.npy").exists():
            return True
        return bool(fill_s) and made > 0 and t_gen + t_gen / made <= fill_s

    shard = 0
    while shard < n_shards or another(shard):
        path = directory / f"shard-{shard:05d}.npy"
        if shard >= n_shards and progress and made:  # the fill's projected end: this shard and those after it that fit
            progress(0, total=shard + max(1, int((fill_s - t_gen) / (t_gen / made))))
        if path.exists():
            pieces.append(np.load(path))
        else:
            rng = np.random.default_rng([settings.seed, shard])
            t0 = time.perf_counter()
            shard_prompts = prompts(shard, settings.batch_size)
            rows = engine(shard_prompts, rng, stops)
            t_gen += time.perf_counter() - t0
            stream = _join(rows, [_last_turn_start(r, len(p), reply) for r, p in zip(rows, shard_prompts)], tokenizer.eos_token_id, stops)
            n_gen += sum(len(r) - len(p) for r, p in zip(rows, shard_prompts))  # sampled tokens, not prompts
            atomic_write_bytes(path, _npy_bytes(stream))
            pieces.append(stream)
            made += 1
            if seconds_left is not None and made == 1 and shard < n_shards:
                _check_pace(t_gen, n_shards - shard - 1, seconds_left())
        if progress:
            progress(1, **({"status": f"{n_gen / max(t_gen, 1e-9):.0f} tok/s"} if made else {}))
        shard += 1
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return Samples(stream, shard, made, n_gen / t_gen if t_gen else None, settings.engine)


def _engine(settings: Generation, teacher: Any, gguf_path: Any, reply: tuple[int, ...] = ()) -> Callable[..., list[list[int]]]:
    """``run(prompts, rng, stops)``: each prompt continued by up to ``settings.new_tokens`` sampled tokens
    (``reply``: see edgekd.methods.sampling.torch_continue)."""
    temperature, top_p, new, greedy = settings.temperature, settings.top_p, settings.new_tokens, settings.greedy_tokens
    if settings.engine == "llama.cpp":
        if gguf_path is None:
            raise EdgekdError("generation.engine llama.cpp needs the teacher as a GGUF file",
                              fix="pass --teacher model.gguf, or set compression.data.generation.engine=torch")
        from ..device import llamacpp
        from ..versions import usable_threads

        opened: dict[str, Any] = {}

        def run_llama_cpp(prompts: list[list[int]], rng: np.random.Generator, stops: tuple[int, ...]) -> list[list[int]]:
            need = max(len(p) for p in prompts) + new
            if opened.get("n_ctx", 0) < need:  # a context that holds the longest prompt and its continuation
                if "llm" in opened:
                    opened["llm"].close()
                opened.update(n_ctx=need, llm=llamacpp.load(gguf_path, n_ctx=need, threads=usable_threads(1 << 10)))
            return [llama_cpp_continue(opened["llm"], p, new, rng, temperature, top_p, stops, greedy, reply) for p in prompts]
        return run_llama_cpp

    bf16, held = settings.precision == "bf16", {}  # held: the bf16 copies, made at the first shard for all of them
    autocast = functools.partial(forward_precision, settings.precision, next(teacher.parameters()).device.type)

    def run_torch(prompts: list[list[int]], rng: np.random.Generator, stops: tuple[int, ...]) -> list[list[int]]:
        # one batch: prompts of different lengths (a prompt file's) padded on the left and masked
        batch, pads = left_padded(prompts)
        with bf16_linear_weights(teacher, held) if bf16 else contextlib.nullcontext():
            done = torch_continue(teacher, batch, new, rng, temperature, top_p, autocast, stop_ids=stops,
                                  greedy_first=greedy, reply=reply, pads=pads)
        return [row[n:].tolist() for row, n in zip(done, pads)]
    return run_torch


def _check_pace(first_shard_s: float, shards_left: int, seconds: float) -> None:
    projected = first_shard_s * shards_left
    if projected > seconds:
        raise EdgekdError(
            f"sampling the teacher would take about {projected / 60:.0f} more minutes at the pace measured "
            f"({first_shard_s:.1f} s per shard; PROJECTION), more than the {max(seconds, 0) / 60:.0f} minutes the time budget leaves it",
            fix="lower compression.data.generation.tokens (or new_tokens), raise the time budget, "
            "or rerun with --resume and no budget to finish the shards kept so far")


def predict_generation_peak(config: Any, settings: Generation, held_bytes: float = 0.0, longest_prompt: int | None = None) -> float:
    """The sampling stage's predicted peak resident bytes: the prompts' forward pass, the KV cache of a
    full batch (fp32: on the default teacher the keys and values leave the rotary embedding in fp32 under
    bf16 autocast too, measured; allocated once, edgekd.methods.kv_cache), the sampler's float64 copies of a batch of last-position
    logits (x6), and ``held_bytes`` (the bf16 copies of the linear weights under bf16). ``longest_prompt``:
    a prompt file's longest prompt in tokens (the batch is padded to it); else 4x ``prompt_tokens``, room
    for a chat template's turn."""
    from .memory import kv_cache_bytes, predict_forward_peak

    kv = kv_cache_bytes(config, settings.batch_size, (longest_prompt or settings.prompt_tokens * 4) + settings.new_tokens, 4)
    sampler = settings.batch_size * config.vocab_size * 8 * 6
    return predict_forward_peak(config, settings.batch_size, longest_prompt or settings.prompt_tokens, logit_copies=0.0,
                                extra_bytes=kv + sampler + held_bytes)


def predict_sampling_peak(teacher: Any, settings: Generation, longest_prompt: int | None = None) -> float:
    """:func:`predict_generation_peak` for ``teacher`` sampled with ``settings``: the bf16 copies counted
    where the torch engine holds them."""
    from .precision import bf16_linear_copy_bytes

    held = bf16_linear_copy_bytes(teacher) if settings.engine == "torch" and settings.precision == "bf16" else 0
    return predict_generation_peak(teacher.config, settings, held, longest_prompt)


def _last_turn_start(row: list[int], prompt_length: int, reply: tuple[int, ...]) -> int:
    """Where the row's last turn begins: after the prompt, or after the reply's opening the row was fed."""
    if reply and reply[0] in row[prompt_length:]:
        return row.index(reply[0], prompt_length) + len(reply)
    return prompt_length


def _join(rows: list[list[int]], starts: list[int], eos: int | None, stops: tuple[int, ...] = ()) -> np.ndarray:
    """Each row cut after its first stop token (EOS or another of ``stops``) past ``starts`` (its last
    turn: the rest is the model starting over), EOS-separated."""
    ends = {eos, *stops} - {None}
    stream: list[int] = []
    for row, p in zip(rows, starts):
        cut = next((i for i in range(p, len(row)) if row[i] in ends), None)
        if cut is not None:
            row = row[: cut + 1]
        stream.extend(row)
        if eos is not None and row[-1] != eos:
            stream.append(eos)
    return np.asarray(stream, dtype=np.int32)
