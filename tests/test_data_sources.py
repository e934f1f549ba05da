"""Distillation data beyond the corpus: the sampler, the teacher's samples, the batch mixture, on-policy rows."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

import edgekd
from edgekd import EdgekdError
from edgekd.cli import main
from edgekd.methods import generate as gen
from edgekd.methods import sampling
from edgekd.methods.distill import DistillConfig, distill
from edgekd.methods.logit_cache import blocks_read
from edgekd.methods.losses import logit_divergence
from edgekd.methods.mixture import Mixture, OnPolicy
from edgekd.methods.on_policy import on_policy_losses, student_samples
from edgekd.methods.sampling import next_tokens, torch_continue

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


# ---------------------------------------------------------------- the sampler


def test_sampler_is_seeded_greedy_at_zero_and_keeps_to_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    a = next_tokens(logits, np.random.default_rng(3), 1.0, 1.0)
    assert np.array_equal(a, next_tokens(logits, np.random.default_rng(3), 1.0, 1.0))
    assert np.allclose(np.bincount(a, minlength=4) / len(a), [0.5, 0.3, 0.15, 0.05], atol=0.04)
    nucleus = next_tokens(logits, np.random.default_rng(3), 1.0, 0.7)  # 0.5 + 0.3 reach 0.7: two tokens
    assert set(nucleus) == {0, 1} and abs((nucleus == 0).mean() - 0.5 / 0.8) < 0.04
    assert set(next_tokens(logits, np.random.default_rng(0), 0.0)) == {0}


def test_nucleus_draws_equal_a_row_by_row_reference_at_every_candidate_tier():
    rng = np.random.default_rng(0)  # peaked rows to flat ones: nuclei of a few tokens up to nearly the whole vocabulary
    logits = rng.normal(size=(48, 12000)) * np.geomspace(12.0, 0.05, 48)[:, None]
    for top_p, temperature in ((0.95, 1.0), (0.6, 0.7), (0.999, 1.3)):
        p = np.exp(logits / temperature - (logits / temperature).max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        u = np.random.default_rng(4).random(len(p))
        want = []
        for row, draw in zip(p, u):  # the definition: sort, keep while the mass before is short of top_p, invert the CDF
            order = np.argsort(-row, kind="stable")
            mass = row[order] * (np.cumsum(row[order]) - row[order] < top_p)
            want.append(order[min(int((np.cumsum(mass) < draw * mass.sum()).sum()), len(order) - 1)])
        assert np.array_equal(next_tokens(logits, np.random.default_rng(4), temperature, top_p), want)


def test_kv_cache_decoding_equals_recomputing_every_step(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    prompts = np.array([[5, 9, 30, 7], [11, 12, 13, 14]])
    cached = torch_continue(model, prompts, 6, np.random.default_rng(0), temperature=0.0)
    seq = torch.from_numpy(prompts)
    with torch.no_grad():
        for _ in range(6):  # greedy by full forward passes
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert np.array_equal(cached, seq.numpy())


def test_the_kv_cache_is_written_in_place_not_copied_at_every_step(tiny_tokenizer, monkeypatch):
    from edgekd.methods import kv_cache

    model = make_tiny_llama(len(tiny_tokenizer))
    made, decode_cache = [], kv_cache.decode_cache  # the cache the sampler makes, kept to look at
    monkeypatch.setattr(kv_cache, "decode_cache", lambda capacity: made.append(decode_cache(capacity)) or made[-1])
    storages = []  # after each forward pass: where each layer's keys live
    hook = model.register_forward_hook(lambda *_: storages.append(tuple(layer.keys.untyped_storage().data_ptr()
                                                                        for layer in made[-1].layers)))
    out = torch_continue(model, np.array([[5, 9, 30, 7], [11, 12, 13, 14]]), 6, np.random.default_rng(0), temperature=0.0)
    hook.remove()
    assert len(storages) == 6 and len(set(storages)) == 1  # one allocation a layer for the whole decode
    assert made[-1].get_seq_length() == out.shape[1] - 1  # the last token drawn is never fed
    monkeypatch.setattr(kv_cache, "decode_cache", lambda capacity: kv_cache.PreallocatedCache(capacity - 2))
    with pytest.raises(ValueError, match="holds 8 positions"):  # a decode longer than the cache is refused, not cut short
        torch_continue(model, np.array([[5, 9, 30, 7]]), 6, np.random.default_rng(0), temperature=0.0)


def test_prompts_of_different_lengths_run_as_one_padded_batch_with_each_rows_own_tokens(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    prompts = [[5, 9, 30, 7], [11, 12], [40, 41, 42, 43, 44, 45]]  # a prompt file's rows: three lengths
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    settings = gen.Generation(tokens=64, prompt_tokens=4, new_tokens=6, temperature=0.0, top_p=1.0, engine="torch", batch_size=3, seed=0)
    rows = gen._engine(settings, model, None)(prompts, np.random.default_rng(0), ())
    hook.remove()
    assert len(calls) == 6  # one batch: a forward pass per new token, not one per prompt length
    for p, row in zip(prompts, rows):  # each row as it is sampled alone: the padding is masked, the positions its own
        assert row == torch_continue(model, np.array([p]), 6, np.random.default_rng(0), temperature=0.0)[0].tolist()


def test_hybrid_sampling_starts_greedy_then_samples(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    prompts = np.array([[5, 9, 30, 7], [11, 12, 13, 14]])
    greedy = torch_continue(model, prompts, 3, np.random.default_rng(0), temperature=0.0)
    rows = [torch_continue(model, prompts, 12, np.random.default_rng(seed), temperature=5.0, greedy_first=3) for seed in range(4)]
    assert all(np.array_equal(r[:, :7], greedy) for r in rows)  # the first three new tokens are the greedy ones
    assert len({r[:, 7:].tobytes() for r in rows}) > 1  # the rest are drawn: seeds differ


def test_a_reply_opening_is_fed_after_the_first_turn_and_only_the_last_turn_stops(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    prompts = np.array([[5, 9, 30, 7], [11, 12, 13, 14]])
    end = int(torch_continue(model, prompts, 1, np.random.default_rng(0), temperature=0.0)[0, 4])  # row 0's first token ends its turn
    reply = (end, 40, 41)
    out = torch_continue(model, prompts, 10, np.random.default_rng(0), temperature=0.0, stop_ids=(end,), reply=reply)
    assert out[0, 4:7].tolist() == [end, 40, 41]
    for r in range(2):  # reference: full forward passes, the turns kept by hand
        seq, fed, replying = list(prompts[r]), [], False
        while len(seq) < 14:
            if fed:
                seq.append(fed.pop(0))
                replying = not fed
                continue
            with torch.no_grad():
                t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(t)
            if replying and t == end:
                break
            if not replying and t == end:
                fed = list(reply[1:])
        assert out[r, : len(seq)].tolist() == seq


def test_turns_feed_the_opening_and_let_only_the_last_turn_stop():
    turns = sampling.Turns(3, (9, 7, 8))
    script = [[5, 5, 9], [9, 5, 1], [1, 5, 2], [2, 5, 9], [6, 5, 3], [9, 5, 3]]  # what the sampler draws, rows side by side
    got = [turns.take(np.array(step)) for step in script]
    assert [t.tolist() for t, _ in got] == [[5, 5, 9], [9, 5, 7], [7, 5, 8], [8, 5, 9], [6, 5, 3], [9, 5, 3]]
    assert [m.tolist() for _, m in got] == [[False] * 3, [False] * 3, [False] * 3, [False, False, True], [True, False, True],
                                            [True, False, True]]
    plain = sampling.Turns(2)
    assert plain.take(np.array([9, 1]))[1].tolist() == [True, True]  # without a reply every row is in its last turn


def test_bf16_held_linears_sample_what_autocast_alone_samples(tiny_tokenizer, monkeypatch):
    """The teacher's sampling under bf16 holds its linear weights as bf16 copies (no cast at every decode
    step): the same logits bit for bit, the same tokens, and the fp32 weights and the tied head put back."""
    import functools

    from edgekd.methods import precision

    model = make_tiny_llama(len(tiny_tokenizer))
    autocast = functools.partial(precision.forward_precision, "bf16", "cpu")
    prompts = np.array([[5, 9, 30, 7], [11, 12, 13, 14]])
    weights = {n: p for n, p in model.named_parameters()}
    with torch.no_grad(), autocast():
        alone = model(torch.from_numpy(prompts)).logits
    with precision.bf16_linear_weights(model):
        assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.float32
        with torch.no_grad(), autocast():
            held = model(torch.from_numpy(prompts)).logits
        sampled_held = torch_continue(model, prompts, 8, np.random.default_rng(3), 1.0, 0.95, autocast)
    assert torch.equal(alone, held)
    assert np.array_equal(sampled_held, torch_continue(model, prompts, 8, np.random.default_rng(3), 1.0, 0.95, autocast))
    assert all(p is weights[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert precision.bf16_linear_copy_bytes(model) == 2 * linears
    # the engine takes that path with precision bf16, and a seed still fixes its samples
    s = _settings(precision="bf16")
    src = gen.prompt_source("none", tiny_tokenizer, s)
    held: list[int] = []  # the copies the engine holds while it samples
    spy = precision.bf16_linear_weights
    monkeypatch.setattr(gen, "bf16_linear_weights", lambda m, c=None: (held.append(1), spy(m, c))[1])
    runs = [gen._engine(s, model, None)(src(0, 3), np.random.default_rng(0), (2,)) for _ in range(2)]
    assert runs[0] == runs[1] and all(p.dtype == torch.float32 for p in model.parameters())
    assert held == [1, 1]  # the copies held for each call
    gen._engine(_settings(), model, None)(src(0, 3), np.random.default_rng(0), (2,))
    assert held == [1, 1]  # fp32: no copies


# ---------------------------------------------------------------- the teacher's samples


def _settings(**kw):
    base = dict(tokens=200, prompt_tokens=4, new_tokens=12, temperature=1.0, top_p=0.95, engine="torch", batch_size=3, seed=7)
    return gen.Generation(**{**base, **kw})


def test_samples_are_deterministic_resume_from_their_shards_and_cut_at_eos(tmp_path, tiny_tokenizer):
    teacher = make_tiny_llama(len(tiny_tokenizer))
    blocks = np.random.default_rng(0).integers(3, len(tiny_tokenizer), size=(10, 32)).astype(np.int32)
    s = _settings()
    prompts = gen.prompt_source("corpus", tiny_tokenizer, s, blocks)
    first = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "a")
    assert first.shards == gen.shard_count(s) == 5 and first.generated_now == 5 and first.tokens_per_s > 0
    again = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "b")
    assert np.array_equal(first.stream, again.stream)  # a seed fixes the samples
    (tmp_path / "a" / "shard-00002.npy").unlink()  # a run killed before its third shard
    resumed = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "a")
    assert resumed.generated_now == 1 and np.array_equal(resumed.stream, first.stream)
    reused = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "a")
    assert reused.generated_now == 0 and np.array_equal(reused.stream, first.stream)  # the cache is reused
    other = gen.generate(teacher, tiny_tokenizer, prompts, _settings(seed=8), tmp_path / "a")
    assert other.generated_now == 5 and not np.array_equal(other.stream, first.stream)  # other settings: sampled anew
    elsewhere = gen.prompt_source("none", tiny_tokenizer, _settings(seed=8))
    assert gen.generate(teacher, tiny_tokenizer, elsewhere, _settings(seed=8), tmp_path / "a").generated_now == 5  # other prompts too
    # every sample starts with a corpus block's opening and ends with EOS, and EOS only ends them
    eos = tiny_tokenizer.eos_token_id
    ends = np.flatnonzero(first.stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    openings = {tuple(b[:4]) for b in blocks}
    assert first.stream[-1] == eos and all(tuple(first.stream[a:a + 4]) in openings for a in starts)


class _Clock:
    """``time`` for edgekd.methods.generate with every shard taking one second."""

    def __init__(self):
        self.calls = 0

    def perf_counter(self):
        self.calls += 1
        return self.calls // 2  # t0 and the shard's end: one second apart


def test_a_time_share_fills_past_the_settings_with_the_same_seeded_stream(tmp_path, tiny_tokenizer, monkeypatch):
    teacher = make_tiny_llama(len(tiny_tokenizer))
    s = _settings()
    prompts = gen.prompt_source("none", tiny_tokenizer, s)
    plain = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "plain")
    monkeypatch.setattr(gen, "time", _Clock())
    totals = []
    filled = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "fill", fill_s=7.0,
                          progress=lambda n=1, status=None, total=None: totals.append(total))
    # 5 shards asked for, then one more while the shards so far and the next fit 7 s: 6 s, 7 s, not 8 s
    assert plain.shards == 5 and filled.shards == filled.generated_now == 7
    assert np.array_equal(filled.stream[: plain.stream.size], plain.stream) and filled.stream.size > plain.stream.size
    assert [t for t in totals if t is not None] == [7, 7]  # the bar's end projected from the pace
    again = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "fill")  # resumed: what was sampled is kept
    assert again.generated_now == 0 and np.array_equal(again.stream, filled.stream)


@pytest.mark.parametrize("share, train_shards", [(0.5, 5), (0.0, 2)])
def test_a_data_free_run_under_a_time_budget_fills_its_share_with_samples(tmp_path, tiny_tokenizer, monkeypatch, share,
                                                                          train_shards):
    from types import SimpleNamespace

    from edgekd.pipeline.context import RunContext, RunInputs
    from edgekd.pipeline.rundir import RunDir
    from edgekd.pipeline.timebudget import MIN_RESERVE_S, TimeBudget
    from edgekd.progress import Reporter
    from edgekd.report import Report
    from edgekd.stages.samples import teacher_samples

    profile = edgekd.load_profile("raspberry-pi-5", ["compression.data.block_len=16", "compression.data.generation.tokens=96",
                                                     "compression.data.generation.prompt_tokens=4",
                                                     "compression.data.generation.new_tokens=12",
                                                     "compression.data.generation.batch_size=3",
                                                     f"compression.data.generation.time_share={share}"])
    teacher = SimpleNamespace(model=make_tiny_llama(len(tiny_tokenizer)), tokenizer=tiny_tokenizer,
                              source=SimpleNamespace(kind="hf", path=None))
    ctx = RunContext(profile, RunDir(tmp_path), Report("r", str(tmp_path), {}), Reporter(quiet=True), RunInputs(data="teacher"),
                     teacher=teacher)
    ctx.time_budget = TimeBudget(MIN_RESERVE_S + 11.0)  # 11 s of training time: a 0.5 share fills about 5.5 s
    monkeypatch.setattr(gen, "time", _Clock())  # each shard one second
    record = teacher_samples(ctx)
    # 2 shards asked for (96 tokens, 48 a shard), then more while they fit the share; the held-out split is not filled
    assert record.metrics["train_shards"] == train_shards and record.metrics["heldout_shards"] == 1
    assert ("fill_s" in record.metrics) == (share > 0) and len(ctx.corpus.train) * 16 <= 48 * train_shards


def test_chat_prompts_go_through_the_chat_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "What is a list?"}]}) + "\n"
                    + json.dumps({"prompt": "def main"}) + "\n")
    prompts = gen.read_prompt_file(path, tok)
    rendered = tok("<s>user\nWhat is a list?</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"]
    assert prompts[0] == rendered and prompts[1] == tok("def main")["input_ids"]
    teacher = make_tiny_llama(len(tok))
    from_file = gen.prompt_source("file", tok, _settings(), prompt_file=path)
    samples = gen.generate(teacher, tok, from_file, _settings(), tmp_path / "s")
    assert list(samples.stream[: len(rendered)]) == rendered
    # the memory check sizes the padded batch's KV cache by the file's longest prompt
    assert from_file.longest == len(rendered)
    long = replace(_settings(), prompt_tokens=1)  # 4x prompt_tokens is shorter than the rendered chat prompt
    assert gen.predict_generation_peak(teacher.config, long, 0, from_file.longest) > gen.predict_generation_peak(teacher.config, long)
    assert gen.prompt_source("chat", tok, _settings())(0, 2) == [tok("<s>user\n</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"]] * 2
    # query: the template cut where the user's message begins, so the teacher writes that message, then answers it (Magpie)
    query = gen.prompt_source("query", tok, _settings())
    assert query(0, 2) == [tok("<s>user\n", add_special_tokens=False)["input_ids"]] * 2
    assert query.reply == tuple(tok("</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"]) and query.reply[0] == tok.eos_token_id
    opening, eos = query(0, 1)[0], tok.eos_token_id
    asked = [*opening, 40, 41, *query.reply, 50, eos, 60, 61]  # a message, the opening fed, an answer, the model starting over
    unanswered = [*opening, 40, 41, 42]  # the message ran to the token limit
    starts = [gen._last_turn_start(r, len(opening), query.reply) for r in (asked, unanswered)]
    assert gen._join([asked, unanswered], starts, eos).tolist() == asked[: asked.index(50) + 2] + unanswered + [eos]
    samples = gen.generate(teacher, tok, query, _settings(), tmp_path / "q")
    assert list(samples.stream[: len(opening)]) == opening
    with pytest.raises(EdgekdError, match="no chat template"):
        gen.prompt_source("query", tiny_tokenizer, _settings())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(EdgekdError, match="neither a 'messages' list"):
        gen.read_prompt_file(bad, tok)
    # a template that refuses the messages (Llama 3's and Gemma's raise_exception on roles out of order): the row named
    strict = copy.copy(tok)
    strict.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with the user') }}"
                            "{% endif %}" + CHAT_TEMPLATE)
    bad.write_text(json.dumps({"prompt": "def main"}) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}) + "\n")
    with pytest.raises(EdgekdError, match=r"bad.jsonl:2: the teacher's chat template refused these messages: Conversation must start"):
        gen.read_prompt_file(bad, strict)
    with pytest.raises(EdgekdError, match="no chat template"):
        gen.read_prompt_file(path, tiny_tokenizer)


# A system header with today's date, read the two ways real templates do: Llama 3.x's (a date_string
# argument, else strftime_now) and SmolLM3's (strftime_now, always)
DATED_TEMPLATES = {
    "date_string, else the clock": ("{{ bos_token }}{% if not date_string is defined %}{% if strftime_now is defined %}"
                                    "{% set date_string = strftime_now('%d %b %Y') %}{% else %}{% set date_string = 'none' %}"
                                    "{% endif %}{% endif %}<s>system\nToday Date: {{ date_string }}</s>\n" + CHAT_TEMPLATE,
                                    "Today Date: 26 Jul 2024"),
    "the clock": ("<s>system\nToday Date: {{ strftime_now('%-d %B %Y') }}</s>\n" + CHAT_TEMPLATE, "Today Date: 26 July 2024"),
}


@pytest.mark.parametrize("reads", DATED_TEMPLATES)
def test_a_chat_template_that_writes_todays_date_renders_one_fixed_date(tmp_path, tiny_tokenizer, reads):
    """Llama 3.x and SmolLM3 templates date every prompt: pinned, a seed fixes the samples and a run
    resumed on another day keeps its shards."""
    import re

    from edgekd.methods import chat_template

    template, header = DATED_TEMPLATES[reads]
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    user = [{"role": "user", "content": "What is a list?"}]
    as_is = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    pinned = chat_template.render(tok, user, tokenize=False)
    assert pinned != as_is and pinned == re.sub("Today Date: [^<]*", header, as_is)  # on its own the template reads the clock
    assert gen.chat_prompt(tok, user) == tok(pinned, add_special_tokens=False)["input_ids"]
    opening, reply = gen.pre_query_prompt(tok)
    assert header in tok.decode(opening) and reply == tuple(tok("</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"])
    # a template that never asks for the date is rendered as it is
    assert chat_template.pinned_template(CHAT_TEMPLATE) == CHAT_TEMPLATE


def test_chat_template_args_reach_the_template(tmp_path, tiny_tokenizer):
    """Qwen3's and SmolLM3's templates open the reply with an empty reasoning block when enable_thinking is false."""
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE.replace("<s>assistant\n{% endif %}", "<s>assistant\n{% if enable_thinking is defined and "
                                              "enable_thinking is false %}<think></think>\n{% endif %}{% endif %}")
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "What is a list?"}]}) + "\n")
    off = {"enable_thinking": False}
    for kind, file in (("chat", None), ("file", path)):
        thinking = tok.decode(gen.prompt_source(kind, tok, _settings(), prompt_file=file)(0, 1)[0])
        plain = tok.decode(gen.prompt_source(kind, tok, _settings(), prompt_file=file, template_args=off)(0, 1)[0])
        assert thinking.endswith("assistant\n") and plain == thinking + "<think></think>\n"
    assert gen.prompt_source("query", tok, _settings(), template_args=off).reply[-3:] != gen.prompt_source("query", tok, _settings()).reply[-3:]
    with pytest.raises(EdgekdError, match="chat_template_args names tokenize"):
        edgekd.load_profile("raspberry-pi-5", ["compression.data.generation.chat_template_args.tokenize=false"])


def test_a_sample_ends_at_every_stop_token_the_generation_config_lists(tmp_path, tiny_tokenizer):
    """Gemma 3 ends an assistant's turn with <end_of_turn>, Phi-4-mini with <|end|>: neither is their tokenizer's EOS."""
    from edgekd.methods.chat_template import stop_ids

    teacher = make_tiny_llama(len(tiny_tokenizer))
    blocks = np.random.default_rng(0).integers(3, len(tiny_tokenizer), size=(10, 32)).astype(np.int32)
    s = _settings(temperature=0.0)
    prompts = gen.prompt_source("corpus", tiny_tokenizer, s, blocks)
    eos, first = tiny_tokenizer.eos_token_id, prompts(0, s.batch_size)[0]
    assert stop_ids(teacher, tiny_tokenizer) == (eos,)
    plain = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "s")
    end = int(plain.stream[len(first)])  # the first sample's first new token: made the end of a turn
    assert end != eos and plain.stream[len(first) + 1] != eos
    teacher.generation_config.eos_token_id = [eos, end]
    assert stop_ids(teacher, tiny_tokenizer) == (eos, end)
    ended = gen.generate(teacher, tiny_tokenizer, prompts, s, tmp_path / "s")
    assert ended.generated_now == ended.shards  # other stop tokens: other samples
    assert ended.stream[: len(first) + 2].tolist() == [*first, end, eos]  # cut after the turn's end, then the separator
    assert len(ended.stream) < len(plain.stream)
    # a config converted from a GGUF lists only the EOS: the end-of-turn token is also found by its text
    gemma_like = copy.deepcopy(tiny_tokenizer)
    gemma_like.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    assert stop_ids(make_tiny_llama(len(gemma_like)), gemma_like) == (eos, gemma_like.convert_tokens_to_ids("<end_of_turn>"))


def test_prompts_from_nothing_are_one_drawn_token():
    class Tok:
        all_special_ids = [0, 1, 2]

        def __len__(self):
            return 50

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1] if add_special_tokens else []}
    rows = gen.prompt_source("none", Tok(), _settings())(0, 200)
    assert all(len(r) == 2 and r[0] == 1 and r[1] > 2 for r in rows) and len({r[1] for r in rows}) > 20
    assert rows == gen.prompt_source("none", Tok(), _settings())(0, 200)


# ---------------------------------------------------------------- the batch mixture


def test_mixture_splits_a_batch_by_shares_and_reads_each_pool_in_its_own_order():
    cfg = DistillConfig(steps=1, batch_size=4, seed=3)
    m = Mixture((10, 6), (0.5, 0.25), 0.25, OnPolicy())
    assert m.slots(4) == ([2, 1], 1) and Mixture((10,), (0.7,), 0.3).slots(4) == ([3], 1)
    offline, prompts = m.indices(5, 0, cfg, 0, 1)
    assert len(offline) == 3 and offline[0] < 10 and offline[1] < 10 and 10 <= offline[2] < 16
    assert len(prompts) == 1 and prompts[0] < 10  # on-policy prompts: the corpus's blocks
    assert all(np.array_equal(a, b) for a, b in zip(m.indices(5, 0, cfg, 0, 1), (offline, prompts)))
    # one pool: the order a corpus-only run always had (epoch after epoch of permutation([seed, epoch]))
    single = np.concatenate([Mixture.single(7).indices(s, 0, cfg, 0, 1)[0] for s in range(7)])
    want = np.concatenate([np.random.default_rng([3, e]).permutation(7) for e in range(4)])[:28]
    assert np.array_equal(single, want)
    assert m.row_tokens(4, 256) == 3 * 256 + 32 + 64


def test_on_policy_rows_join_after_their_start_and_each_pool_reads_on_where_it_stopped():
    cfg = DistillConfig(steps=10, batch_size=4, seed=3)
    m = Mixture((40, 12), (0.5, 0.0), 0.5, OnPolicy(start=0.4))
    assert m.on_policy_from(10) == 4 and [m.on_policy_at(s, 10) for s in (3, 4)] == [False, True]
    rows = [m.indices(s, 0, cfg, 0, 1) for s in range(10)]
    assert [len(o) for o, _ in rows] == [4] * 4 + [2] * 6 and [len(p) for _, p in rows] == [0] * 4 + [2] * 6
    # the corpus stream goes on without a gap or a repeat: 16 blocks before the join, 12 after, 28 of 40 distinct
    corpus = np.concatenate([o for o, _ in rows])
    assert len(corpus) == 28 and len(set(corpus.tolist())) == 28
    assert np.array_equal(corpus, np.random.default_rng([3, 0]).permutation(40)[:28])
    # prompts start their own stream at the join, as a run with on-policy rows from step 0 starts it at step 0
    cold = replace(m, policy=OnPolicy(start=0.0))
    assert np.array_equal(np.concatenate([p for _, p in rows]), np.concatenate([cold.indices(s, 0, cfg, 0, 1)[1] for s in range(6)]))
    assert m.row_tokens(4, 256, on_policy=False) == 4 * 256 and m.row_tokens(4, 256) == 2 * 256 + 2 * 96
    # the blocks a shorter (time-fitted) stage reads are among those its planned steps read (a hidden-state cache holds these)
    planned = set(blocks_read(m, cfg, 10).tolist())
    for steps in (3, 6, 9):
        short = replace(cfg, steps=steps)
        assert {int(b) for s in range(steps) for b in m.indices(s, 0, short, 0, 1)[0]} <= planned


def test_the_step_probe_weights_each_phase_by_its_share_of_the_steps(monkeypatch):
    import edgekd.methods.step_probe as probe_module

    seen = []

    def fake_probe(student, teacher, blocks, cfg, layer_map, cache, probes, mixture):
        seen.append((mixture.on_policy, mixture.on_policy_from(cfg.steps)))
        return 3.0 if mixture.on_policy else 1.0  # an on-policy step three times an offline one

    monkeypatch.setattr(probe_module, "_probe", fake_probe)
    blocks, cfg = np.zeros((8, 16), dtype=np.int32), DistillConfig(steps=100)
    warm = Mixture((8,), (0.5,), 0.5, OnPolicy(start=0.25))
    assert probe_module.probe_step_seconds(None, None, blocks, cfg, [], mixture=warm) == pytest.approx(0.25 * 1 + 0.75 * 3)
    assert seen == [(0.0, 0), (0.5, 0)]  # the offline steps, then on-policy steps from the first
    assert probe_module.probe_step_seconds(None, None, blocks, cfg, [], mixture=replace(warm, policy=OnPolicy())) == 3.0


# ---------------------------------------------------------------- on-policy rows


def test_on_policy_loss_and_gradients_match_the_full_logit_divergence(tiny_tokenizer):
    teacher, student = make_tiny_llama(len(tiny_tokenizer)), make_tiny_llama(len(tiny_tokenizer), layers=2, seed=1)
    prompts = np.random.default_rng(0).integers(3, len(tiny_tokenizer), size=(3, 6))
    for kl in ("reverse", "jsd", "forward"):
        policy = OnPolicy(prompt_tokens=6, new_tokens=10, kl=kl)
        seq = student_samples(student, prompts, policy, np.random.default_rng(1))
        assert seq.shape == (3, 16) and np.array_equal(seq, student_samples(student, prompts, policy, np.random.default_rng(1)))
        cfg = DistillConfig(steps=1, precision="fp32")
        student.train()
        ids = torch.from_numpy(seq)
        terms = on_policy_losses(student, teacher, ids, 6, policy, cfg)
        terms["loss"].backward()
        got = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        with torch.no_grad():
            t_logits = teacher(ids).logits
        # positions 5 .. 14 predict the ten sampled tokens; the prompt carries no loss
        ref = logit_divergence(student(ids).logits[:, 5:-1], t_logits[:, 5:-1], kl, 1.0)
        ref.backward()
        assert torch.allclose(terms["loss"].detach(), ref.detach(), rtol=1e-5)
        assert all(torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7) for g, p in zip(got, student.parameters()))
        student.zero_grad()


@pytest.mark.parametrize("steps_per_generation,start", [(1, 0.0), (3, 0.0), (3, 0.5)])
def test_a_mixed_run_killed_mid_way_resumes_to_identical_weights(tmp_path, tiny_tokenizer, steps_per_generation, start):
    """With 3 steps a generation the kill at step 2 falls inside one: the checkpoint carries its rows.
    With ``start`` 0.5 the on-policy rows join at step 2, where the run is killed and resumed."""
    teacher = make_tiny_llama(len(tiny_tokenizer))
    blocks = np.random.default_rng(0).integers(3, len(tiny_tokenizer), size=(12, 24)).astype(np.int32)
    m = Mixture((8, 4), (0.5, 0.25), 0.25,
                OnPolicy(prompt_tokens=8, new_tokens=8, steps_per_generation=steps_per_generation, start=start))

    def train(run_dir, stop_at=None):
        student = make_tiny_llama(len(tiny_tokenizer), layers=2, seed=1)
        cfg = DistillConfig(steps=4, batch_size=4, checkpoint_every=2, precision="fp32", on_policy_share=m.on_policy_share)

        def on_step(done):
            if done == stop_at:
                raise KeyboardInterrupt
        try:
            out = distill(student, teacher, blocks, cfg, [0, 1], run_dir=run_dir, mixture=m, on_step=on_step)
        except KeyboardInterrupt:
            return None, None
        return student, out

    full, outcome = train(tmp_path / "full")
    summary = outcome.summary()
    assert summary["final_on_policy_kd"] > 0 and summary["sampling_tokens_per_s"] > 0 and 0 < summary["sampling_share"] < 1
    first = m.on_policy_from(4)
    sampled_at = [h["step"] - 1 for h in outcome.history if h.get("sampling_s", 0) > 0]
    assert sampled_at == list(range(first, 4, steps_per_generation))  # one batch of rows a generation, from the join
    assert [("on_policy_kd" in h) for h in outcome.history] == [s >= first for s in range(4)]
    assert train(tmp_path / "killed", stop_at=2)[0] is None
    resumed, again = train(tmp_path / "killed")
    assert again.resumed_from_step == 2
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    if steps_per_generation == 3:  # step 2's rows came from the checkpoint, or open the first generation at the join
        assert [h["sampling_s"] > 0 for h in again.history[2:]] == ([False, True] if first == 0 else [True, False])
    with pytest.raises(ValueError, match="on_policy_share"):
        distill(make_tiny_llama(len(tiny_tokenizer), layers=2), teacher, blocks, DistillConfig(steps=1), [0, 1], mixture=m)


# ---------------------------------------------------------------- through the pipeline


def test_data_free_run_end_to_end(tmp_path, tiny_model_dir, tiny_profile_overrides):
    overrides = tiny_profile_overrides + ["compression.data.generation.tokens=1200", "compression.data.generation.new_tokens=60",
                                          "compression.data.generation.batch_size=4", "compression.data.mixture.on_policy=0.5",
                                          "compression.data.on_policy.new_tokens=16", "compression.data.on_policy.prompt_tokens=8",
                                          # the exit code checked below must not hang on this machine's speed or load
                                          "budgets.min_decode_tokens_per_s=0.01", "budgets.max_ttft_ms=1e9",
                                          "budgets.max_energy_mj_per_token=1e9"]
    report = edgekd.compress(teacher=tiny_model_dir, profile="raspberry-pi-5", data="teacher", output=tmp_path,
                             run_name="free", overrides=overrides, quiet=True)
    assert report.plan[:3] == ["load_teacher", "load_corpus", "teacher_samples"] and report.status == "complete"
    samples = report.stage("teacher_samples")
    assert samples.settings["prompts"] == "none" and samples.settings["data_free"] is True
    assert samples.metrics["train_blocks"] >= 4 and samples.metrics["heldout_blocks"] >= 2
    assert report.corpus["source"] == "teacher samples"
    qat = report.stage("qat")
    assert qat.settings["batch_rows"] == {"corpus": 1, "on_policy": 1} and qat.metrics["final_on_policy_kd"] is not None
    # on-policy rows join after the profile's start (0.5) of the 2 QAT steps; the first trains on the samples alone
    assert qat.settings["on_policy"]["start"] == 0.5 and qat.settings["on_policy_from_step"] == 1
    assert qat.settings["batch_rows_before_on_policy"] == {"corpus": 2}
    assert report.stage("distill").settings["on_policy"]["new_tokens"] == 16
    assert any("on-policy rows at" in note for note in report.notes)
    assert any(note.startswith("data-free run: the held-out split is the teacher's own samples") and "(--prompts)" in note
               for note in report.notes), report.notes
    assert any(note.startswith("qat: the student sampled its on-policy rows at") and "tokens/s (from step 2 of 2)," in note
               for note in report.notes), report.notes
    # the same run from the command line, resumed: every stage reused, the samples not drawn again
    sets = [a for o in overrides for a in ("--set", o)]
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", "teacher", "--output", str(tmp_path),
                 "--run-name", "free", "--resume", "--quiet", *sets])
    assert code == 0
    assert json.loads((tmp_path / "free" / "report.json").read_text())["corpus"]["source"] == "teacher samples"


def test_a_run_killed_while_sampling_resumes_to_the_same_corpus(tmp_path, tiny_model_dir, tiny_profile_overrides, monkeypatch):
    overrides = tiny_profile_overrides + ["compression.data.generation.tokens=1200", "compression.data.generation.new_tokens=60",
                                          "compression.data.generation.batch_size=4", "compression.distill.steps=0",
                                          "compression.qat.steps=0"]
    kw = dict(teacher=tiny_model_dir, profile="raspberry-pi-5", data="teacher", output=tmp_path, overrides=overrides, quiet=True)
    whole = edgekd.compress(run_name="whole", **kw)
    real_join, calls = gen._join, []

    def dies_on_the_third_shard(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would: the first two shards are on disk
        return real_join(*a)
    monkeypatch.setattr(gen, "_join", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        edgekd.compress(run_name="killed", **kw)
    monkeypatch.undo()
    resumed = edgekd.compress(run_name="killed", resume=True, **kw)
    assert resumed.stage("teacher_samples").metrics["train_shards_reused"] == 2
    for split in ("train", "heldout"):
        assert np.array_equal(np.load(tmp_path / "whole" / "corpus" / f"{split}.npy"), np.load(tmp_path / "killed" / "corpus" / f"{split}.npy"))
    same = lambda r: {k: v for k, v in r.stage("qat").metrics["heldout"].items() if k != "seconds"}  # noqa: E731
    assert same(whole) == same(resumed)


def test_teacher_samples_join_the_corpus_and_the_logit_cache(tmp_path, tiny_model_dir, small_corpus_file, tiny_profile_overrides):
    overrides = tiny_profile_overrides + ["compression.data.generation.tokens=600", "compression.data.generation.new_tokens=40",
                                          "compression.data.mixture.teacher_samples=0.5", "compression.distill.logit_cache.k=4",
                                          "compression.distill.logit_cache.kind=sample"]
    report = edgekd.compress(teacher=tiny_model_dir, profile="raspberry-pi-5", data=small_corpus_file, output=tmp_path,
                             run_name="mixed", overrides=overrides, quiet=True)
    samples = report.stage("teacher_samples")
    assert samples.settings["prompts"] == "corpus" and samples.metrics["engine"] == "torch"
    n_corpus = report.corpus["train_blocks"]
    cache = np.load(tmp_path / "mixed" / "teacher-logits" / "indices.npy", mmap_mode="r")
    assert len(cache) == n_corpus + samples.metrics["train_blocks"]  # the cache covers the samples' positions too
    assert report.stage("distill").settings["batch_rows"] == {"corpus": 1, "teacher_samples": 1, "on_policy": 0}


def test_cli_prompt_file_errors_exit_2(tmp_path, tiny_model_dir, capsys):
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", "teacher", "--prompts", str(tmp_path / "none.jsonl"),
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "prompt file not found" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # query prompts need a chat template: one message with the fix, exit 2
    code = main(["compress", "--teacher", str(tiny_model_dir), "--data", "teacher", "--output", str(tmp_path / "q"), "--quiet",
                 "--set", "compression.data.generation.prompts=query"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "has no chat template" in err and "prompts to none" in err and "Traceback" not in err
    # a prompt file for a run that samples nothing from the teacher (a corpus, no teacher_samples in the mixture)
    (tmp_path / "p.jsonl").write_text('{"prompt": "def main"}\n')
    code = main(["compress", "--teacher", str(tiny_model_dir), "--prompts", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "unused")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "trains on none of them" in err and "--data teacher" in err and not (tmp_path / "unused").exists()


def test_llama_cpp_engine_samples_the_gguf_teacher_deterministically(tmp_path, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekd.exporters.gguf import export_gguf
    from edgekd.formats import FormatPlan

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    path = export_gguf(model, tok, tmp_path / "t.gguf", FormatPlan.uniform("f16"), source_name="tiny")
    blocks = np.random.default_rng(0).integers(3, len(tok), size=(6, 16)).astype(np.int32)
    greedy = _settings(temperature=0.0, tokens=100)
    src = gen.prompt_source("corpus", tok, greedy, blocks)
    by_llama = gen.generate(model, tok, src, replace_engine(greedy, "llama.cpp"), tmp_path / "l", gguf_path=path)
    from edgekd.methods.qat import convert

    in_f16 = convert(copy.deepcopy(model), FormatPlan.uniform("f16"))  # what the file holds
    by_torch = gen.generate(in_f16, tok, src, greedy, tmp_path / "t")
    assert by_llama.engine == "llama.cpp" and len(by_llama.stream) == len(by_torch.stream)
    assert (by_llama.stream == by_torch.stream).mean() > 0.9  # the same weights; sums in another order
    sampled = _settings(tokens=100)
    a = gen.generate(model, tok, src, replace_engine(sampled, "llama.cpp"), tmp_path / "a", gguf_path=path)
    b = gen.generate(model, tok, src, replace_engine(sampled, "llama.cpp"), tmp_path / "b", gguf_path=path)
    assert np.array_equal(a.stream, b.stream)
    with pytest.raises(EdgekdError, match="needs the teacher as a GGUF"):
        gen.generate(model, tok, src, replace_engine(sampled, "llama.cpp"), tmp_path / "c")
    # a reply opening (query prompts) is fed the same way by both engines
    first = int(by_torch.stream[4])  # the first sample's first new token ends its turn

    def with_reply(shard, n):
        return src(shard, n)
    with_reply.reply = (first, 5, 6)
    replied = {engine: gen.generate(model if engine == "llama.cpp" else in_f16, tok, with_reply, replace_engine(greedy, engine),
                                    tmp_path / f"r-{engine}", gguf_path=path) for engine in ("llama.cpp", "torch")}
    assert all(r.stream[4:7].tolist() == [first, 5, 6] for r in replied.values())
    assert len(replied["torch"].stream) == len(replied["llama.cpp"].stream)
    assert (replied["torch"].stream == replied["llama.cpp"].stream).mean() > 0.9


def replace_engine(settings, engine):
    from dataclasses import replace

    return replace(settings, engine=engine)


def test_sampling_past_the_time_budget_is_refused_and_its_shards_kept(tmp_path, tiny_tokenizer):
    teacher = make_tiny_llama(len(tiny_tokenizer))
    blocks = np.random.default_rng(0).integers(3, len(tiny_tokenizer), size=(10, 32)).astype(np.int32)
    s = _settings()
    with pytest.raises(EdgekdError, match="PROJECTION") as err:
        gen.generate(teacher, tiny_tokenizer, gen.prompt_source("corpus", tiny_tokenizer, s, blocks), s, tmp_path,
                     seconds_left=lambda: 0.0)
    assert "generation.tokens" in err.value.fix and len(list(tmp_path.glob("shard-*.npy"))) == 1


def test_a_stage_that_cannot_fit_in_memory_is_refused_before_it_allocates(tmp_path, tiny_model_dir, small_corpus_file,
                                                                           tiny_profile_overrides, capsys):
    from edgekd.methods.memory import refuse_over_limit

    with pytest.raises(EdgekdError) as err:
        refuse_over_limit(5e9, 1.0, "sampling the teacher", "lower compression.data.generation.batch_size")
    assert "needs about 5.0 GB (PROJECTION), but this run may use 1.0 GB" in str(err.value) and "5.6 GB free" in str(err.value)
    refuse_over_limit(0.5e9, 1.0, "sampling the teacher", "")
    # through the pipeline: the logit cache's stage refuses before the cache is built
    sets = [a for o in tiny_profile_overrides + ["compression.distill.logit_cache.k=4", "compression.distill.logit_cache.kind=sample", "compression.memory_gb=0.01"]
            for a in ("--set", o)]
    assert main(["compress", "--teacher", str(tiny_model_dir), "--data", str(small_corpus_file), "--output", str(tmp_path),
                 "--run-name", "small", "--quiet", *sets]) == 2
    assert "caching the teacher's logits needs about" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "small" / "teacher-logits").exists()


def test_data_free_notes_point_a_run_without_a_prompt_file_to_one():
    from edgekd.report import StageRecord
    from edgekd.stages.samples import data_free_notes

    def record(prompts, data_free=True):
        return StageRecord("teacher_samples", settings={"prompts": prompts, "data_free": data_free})
    (none,) = data_free_notes([StageRecord("load_teacher"), record("none")])
    assert "teacher's own samples" in none and "prompts: none seldom reach" in none and "(--prompts)" in none
    (from_file,) = data_free_notes([record("file")])
    assert "teacher's own samples" in from_file and "--prompts" not in from_file
    assert data_free_notes([record("corpus", data_free=False)]) == []
