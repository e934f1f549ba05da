"""The teacher's chat turns: chat prompts and Magpie's pre-query part rendered the same on every day,
the template's own variables (``enable_thinking``) passed through, and the tokens that end a reply.

Some templates write today's date into every prompt through transformers' ``strftime_now``: Llama
3.x's system header ("Today Date: 26 Jul 2024" where the clock is not available), SmolLM3's metadata
block. Rendered as they are, a seed would not fix the teacher's samples (the prompts differ from one
day to the next), and a run resumed the next day would find its sampled shards made from other
prompts and sample them all again. So every render here defines ``strftime_now`` in the template
itself, returning one fixed date: Llama 3.x templates' own fallback. transformers passes only plain
data to a template (a function given as a template argument arrives as its text), so the definition
is a Jinja macro put in front of the template; it shadows the renderer's global. The shipped files
keep the template as it came (edgekd.exporters.gguf).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..errors import EdgekdError

PINNED_DATE = datetime(2024, 7, 26)  # the date Llama 3.x templates write when they cannot read the clock
_DIRECTIVES = ("%d", "%-d", "%b", "%B", "%m", "%-m", "%Y", "%y", "%a", "%A", "%j", "%H", "%M", "%S", "%p")
_SENTINEL = "\x00edgekd-user-message\x00"


def _strftime(directive: str) -> str:
    """:data:`PINNED_DATE` in one strftime directive (``%-d``: no leading zero)."""
    text = PINNED_DATE.strftime(directive.replace("-", ""))
    return str(int(text)) if "-" in directive else text


def _pin_macro() -> str:
    # Jinja's sandbox has no datetime, but has str.replace: the fixed date's value of each directive
    calls = "".join(f".replace({d!r}, {_strftime(d)!r})" for d in _DIRECTIVES)
    return "{% macro strftime_now(format) %}{{ format" + calls + " }}{% endmacro %}"


def pinned_template(template: str) -> str:
    """``template`` with ``strftime_now`` answering :data:`PINNED_DATE`; unchanged when it never asks for the date."""
    return _pin_macro() + template if "strftime_now" in template else template


# the end-of-turn tokens of the families edgekd reads (Gemma, Phi-3/4, Llama 3.x, ChatML): llama.cpp ends
# generation at these by their text too, whatever a GGUF's metadata names as its EOS
END_OF_TURN = ("<end_of_turn>", "<|end|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>")


def stop_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end a reply: the tokenizer's EOS first (it also separates samples), then the
    others of the model's generation config, then the tokenizer's special end-of-turn tokens. Gemma 3
    ends an assistant's turn with ``<end_of_turn>``, Phi-4-mini with ``<|end|>``, neither of them its
    tokenizer's EOS: transformers' ``generate`` stops at every id a checkpoint's generation config lists,
    but a config converted from a GGUF lists only the EOS, so the turn's end is also found by its text."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [config] if isinstance(config, int) else list(config or [])
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    added = {token.content: i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()}  # never plain text
    turns = [added[t] for t in END_OF_TURN if t in added]
    return tuple(dict.fromkeys(int(t) for t in first + listed + turns))


# apply_chat_template's own parameters: a template argument of one of these names would not reach the template
CALL_PARAMETERS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                             "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                             "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})


def render(tokenizer: Any, messages: list[dict[str, str]], tokenize: bool, template_args: dict[str, Any] | None = None) -> Any:
    """``messages`` through the tokenizer's chat template with the assistant's turn opened: the text,
    or with ``tokenize`` the token ids (the template's own special tokens, no others added).
    ``template_args``: variables the template reads (``enable_thinking``)."""
    args = dict(template_args or {})
    # a tokenizer may hold several named templates: the one a plain chat renders with
    template = pinned_template(tokenizer.get_chat_template() if hasattr(tokenizer, "get_chat_template") else tokenizer.chat_template)
    if not tokenize:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True, **args)
    ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, add_generation_prompt=True,
                                        **args)
    return list(ids["input_ids"])


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]], template_args: dict[str, Any] | None = None) -> list[int]:
    """``messages`` through the tokenizer's chat template, ending with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise EdgekdError("the teacher's tokenizer has no chat template, so chat messages cannot be rendered",
                          fix='give the prompts as plain text ({"prompt": "..."} lines), or use a teacher with a chat template')
    return render(tokenizer, messages, tokenize=True, template_args=template_args)


def pre_query_prompt(tokenizer: Any, template_args: dict[str, Any] | None = None) -> tuple[list[int], tuple[int, ...]]:
    """The chat template up to where the user's message begins (its system prompt included), so the
    teacher's continuation is a user's message, and what the template writes after that message (its
    end-of-turn token, then the assistant's turn opened), so the teacher then answers it: Magpie's
    two steps (Xu et al. 2024), sampled as one sequence (edgekd.methods.sampling.Turns)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EdgekdError("generation.prompts is 'query' but the teacher's tokenizer has no chat template",
                          fix="set compression.data.generation.prompts to none, or use a teacher with a chat template")
    text = render(tokenizer, [{"role": "user", "content": _SENTINEL}], tokenize=False, template_args=template_args)
    if _SENTINEL not in text:
        raise EdgekdError("the teacher's chat template does not show the user's message, so it has no pre-query part",
                          fix="set compression.data.generation.prompts to none or chat")
    before, after = text.split(_SENTINEL, 1)
    # the rendered text carries its own BOS where the template writes one: no second one added
    opening = list(tokenizer(before, add_special_tokens=False)["input_ids"])
    reply = tuple(tokenizer(after, add_special_tokens=False)["input_ids"])
    if not reply or reply[0] not in set(tokenizer.all_special_ids):
        raise EdgekdError("the teacher's chat template ends a user's message with no special token, so the end of a "
                          "sampled message cannot be told", fix="set compression.data.generation.prompts to none or chat")
    return opening, reply
