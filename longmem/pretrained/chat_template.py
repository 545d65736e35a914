"""Chat templates: a model's own Jinja template turned into the prompt text, and the tokens that end
a turn.

A chat template (``tokenizer_config.json``'s ``chat_template``, ``chat_template.jinja`` or a GGUF
file's ``tokenizer.chat_template``) is code from the model's publisher. It is rendered the way
transformers' ``apply_chat_template`` renders it (``utils/chat_template_utils.py``), so prompts match
what the model was trained on, but without transformers: ``jinja2``'s immutable sandbox (no attribute
of Python internals, no mutation of the caller's objects), ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, and the helpers templates call: ``raise_exception``, ``strftime_now`` and a
``tojson`` that keeps non-ASCII text and does not HTML-escape.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

# End-of-turn markers of common chat formats: ChatML (SmolLM2, Qwen), Llama 3, Gemma, Phi-3, Mistral.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "</s>",
                       "<|endoftext|>")


class ChatTemplateError(ValueError):
    """The template refused the conversation (``raise_exception``) or does not render."""


@lru_cache(maxsize=16)
def compile_template(template: str):
    """A compiled ``jinja2.Template``; raises ChatTemplateError if it does not parse."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore attributes, a way out of the sandbox (as transformers)."""
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message}).") from None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of plain dicts, each with a string ``role`` and a ``content``."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                         f"{type(messages).__name__}.")
    out = []
    for i, m in enumerate(list(messages)):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"message {i} must be a dict with a string 'role' (system, user, assistant, ...) and "
                             f"a 'content'; got {m!r}.")
        out.append({k: v for k, v in m.items() if v is not None})     # as transformers: None fields dropped
    return out


def render_chat(template: str, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **kw: Any) -> str:
    """The prompt text ``template`` makes of ``messages``.

    messages: [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...].
    add_generation_prompt: end with the header that opens the assistant's turn.
    bos_token, eos_token, **kw: further template variables (transformers passes the special tokens
        ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``; templates may read ``tools``,
        ``documents``, ``enable_thinking`` ...).
    Returns the same string as transformers' ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)``. Raises ValueError (ChatTemplateError) for malformed messages, a
    template that does not parse, or one that refuses the conversation (e.g. roles not alternating).
    """
    import jinja2
    compiled = compile_template(template)
    # transformers always passes tools and documents (None when absent) and only the special tokens it has.
    variables = {"tools": None, "documents": None,
                 **{k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}, **kw}
    try:
        return compiled.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               **variables)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused these messages: {e}") from None


def template_variables(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The special-token variables transformers hands a template (``bos_token`` ... as strings)."""
    keys = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {k: tokenizer_config[k] for k in keys if isinstance(tokenizer_config.get(k), str)}


@dataclass(frozen=True)
class StopTokens:
    """Where generation ends a turn: token ids and their spellings (same order)."""
    ids: tuple[int, ...]
    strings: tuple[str, ...]


def end_of_turn(tokenizer, tokenizer_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None
                ) -> StopTokens:
    """The tokens that end an assistant turn: the generation config's ``eos_token_id`` (int or list),
    the tokenizer config's ``eos_token``, and the known end-of-turn markers
    (:data:`END_OF_TURN_MARKERS`) that the chat template writes, when the vocabulary has them.

    tokenizer: a ``tokenizers.Tokenizer`` (for ``token_to_id`` / ``id_to_token``).
    """
    ids: list[int] = []
    eos = (generation_config or {}).get("eos_token_id")
    ids += [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    template = tokenizer_config.get("chat_template") or ""
    for s in [tokenizer_config.get("eos_token")] + [m for m in END_OF_TURN_MARKERS if m in template]:
        if isinstance(s, str) and (i := tokenizer.token_to_id(s)) is not None:
            ids.append(i)
    ids = list(dict.fromkeys(ids))
    return StopTokens(ids=tuple(ids), strings=tuple(tokenizer.id_to_token(i) for i in ids))


class UnknownPast:
    """``TurnRenderer.render(..., after=UNKNOWN_PAST)``: the memory holds a conversation whose messages are
    not at hand."""


UNKNOWN_PAST = UnknownPast()
Past = list[dict[str, Any]] | UnknownPast | None       # what new messages follow: known ones, unknown, nothing


class TurnRenderer:
    """A conversation rendered a few messages at a time, for a model whose memory holds the past ones.

    A chat template renders a whole conversation; a model with memory is fed only what is new. New
    messages are rendered as the text the template adds for them, the difference between the conversation
    with and without them, so the tokens fed over all turns are those of one rendering of the whole
    conversation (for templates whose rendering of a prefix is a prefix of the whole, as ChatML's,
    Llama 3's and most are; a template that is not gets the new messages rendered alone).

    ``render(messages, after=...)`` -> the text to feed for ``messages`` and the header of the assistant's
    reply: ``after`` None for a fresh memory (the system prompt and whatever the template puts first come
    with it), the past messages when they are known, or :data:`UNKNOWN_PAST` when the memory holds a
    conversation whose text is not at hand (placeholders stand for it). ``user_turn(text, first=...)`` is
    one user message. ``closing(stop)`` -> the text that ends the assistant's turn, less the stop string
    the model already wrote (e.g. ``"\n"`` after ``<|im_end|>``).
    """
    _U, _A = "\x00user\x00", "\x00assistant\x00"

    def __init__(self, template: str, variables: Mapping[str, str] | None = None, *, system: str | None = None):
        self.template, self.variables, self.system = template, dict(variables or {}), system

    def _render(self, messages: list[dict[str, Any]], generation: bool) -> str:
        return render_chat(self.template, messages, add_generation_prompt=generation, **self.variables)

    def _past(self) -> list[dict[str, Any]]:
        start = [{"role": "system", "content": self.system}] if self.system else []
        return start + [{"role": "user", "content": self._U}, {"role": "assistant", "content": self._A}]

    def render(self, messages: list[dict[str, Any]], *, after: Past = None) -> str:
        """The text to feed for ``messages`` after ``after`` (None: nothing, a list: those messages,
        :data:`UNKNOWN_PAST`: a conversation not at hand), ending with the header of the assistant's reply."""
        if after is None:
            start = [{"role": "system", "content": self.system}] if self.system else []
            return self._render(start + list(messages), True)
        past = self._past() if isinstance(after, UnknownPast) else list(after)
        before, whole = self._render(past, False), self._render(past + list(messages), True)
        return whole[len(before):] if whole.startswith(before) else self._render(list(messages), True)

    def user_turn(self, text: str, *, first: bool) -> str:
        """The text to feed for the next user message (and the header of the assistant's reply)."""
        return self.render([{"role": "user", "content": text}], after=None if first else UNKNOWN_PAST)

    def closing(self, stop: str | None) -> str:
        """What the template writes after an assistant's reply, less ``stop`` (the stop string the model
        wrote and the memory holds; None when the reply ended at the token limit)."""
        text = self._render(self._past(), False)
        closing = text.split(self._A, 1)[-1] if self._A in text else ""
        return closing[len(stop):] if stop and closing.startswith(stop) else closing
