"""``longmem chat``: a conversation whose memory outlives the process.

Each user line is appended to the session's memory, formatted by the model's own chat
template (imported models; rendered one turn at a time, ``TurnRenderer``) or by ``turn_format``,
and the model answers until a stop string (the template's end-of-turn token, else a newline) or
``max_new_tokens``. After every
turn the memory state is written to ``SESSIONS/NAME.safetensors`` and restored
by the next ``longmem chat --session NAME``. Reads any text stream, so piped
stdin works for scripting (bytes that are not UTF-8 become U+FFFD, with one
warning); prompts go to stderr only on a terminal.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TextIO, Union

import torch

from longmem.generation.decoding import Decoder
from longmem.generation.generate import TextStream
from longmem.generation.processors import SamplingConfig
from longmem.generation.session import SessionStore, check_session_name, state_nbytes
from longmem.data.tokenizer import PretrainedTokenizer
from longmem.pretrained.chat_template import UNKNOWN_PAST, Past, TurnRenderer, template_variables

if TYPE_CHECKING:
    from longmem.data.tokenizer import Tokenizer
    from longmem.runs import Run

COMMANDS = {"/reset": "forget everything this session remembers",
            "/save": "write the session to disk now (also done after every turn)",
            "/stats": "turns, tokens and memory size of the session",
            "/quit": "leave (also /exit or end of input)"}


def _turns(n: int) -> str:
    return f"{n} turn" + ("" if n == 1 else "s")


def default_sessions_dir(run_path: str | Path) -> Path:
    return Path(run_path) / "sessions"


def check_turn_format(turn_format: str) -> str:
    """ValueError unless ``turn_format`` has ``{text}`` and no other replacement field ({{ and }} for braces)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(turn_format)
                  if name is not None]
    except ValueError as e:                                       # a single { or }
        fields = [(str(e), "", None)]
    if not fields or any(f != ("text", "", None) for f in fields):
        raise ValueError(f"turn_format must contain {{text}} and no other field (write {{{{ and }}}} for "
                         f"literal braces), got {turn_format!r}")
    return turn_format


def read_lines(stdin: TextIO, stderr: TextIO) -> Iterator[str]:
    """The lines of ``stdin``; bytes that are not UTF-8 become U+FFFD, with one warning on ``stderr``.

    A text stream over bytes is read through its byte buffer, so one bad line does not end the input."""
    raw, warned = getattr(stdin, "buffer", None), False
    while True:
        if raw is not None:
            data = raw.readline()
            try:
                line, bad = data.decode("utf-8"), False
            except UnicodeDecodeError:
                line, bad = data.decode("utf-8", errors="replace"), True
        else:
            line = stdin.readline()
            line, n = re.subn("[\ud800-\udfff]", "\ufffd", line)     # bytes smuggled in as surrogates
            bad = n > 0
        if bad and not warned:
            print("longmem chat: warning: the input is not all UTF-8; bytes that are not were read as U+FFFD "
                  "(said once)", file=stderr, flush=True)
            warned = True
        if not line:
            return
        yield line


def chat_format(tokenizer: Tokenizer, *, turn_format: str | None = None, system: str | None = None
                ) -> tuple[TurnRenderer | str, list[str]]:
    """How turns are fed: the model's own chat template (a :class:`TurnRenderer`) when its tokenizer has one
    and no ``turn_format`` is given, else ``turn_format`` (default ``"{text}\\n"``); and the default stop
    strings (the template's end-of-turn tokens, else a newline)."""
    if isinstance(tokenizer, PretrainedTokenizer) and tokenizer.chat_template and turn_format is None:
        return (TurnRenderer(tokenizer.chat_template, template_variables(tokenizer.config), system=system),
                list(tokenizer.end_of_turn().strings) or ["\n"])
    if system:
        raise ValueError("--system needs a model with a chat template (an imported model); prepend it to the "
                         "first line instead")
    return check_turn_format("{text}\n" if turn_format is None else turn_format), ["\n"]


class TextFormat:
    """Chat messages as plain text, for a model without a chat template (or a ``turn_format`` given).

    With ``turn_format`` (``{text}`` its only field) every message but the assistant's is fed as
    ``turn_format.format(text=content)`` and an assistant's as its text and a newline, what ``longmem chat``
    feeds; the reply follows directly. Without it each message is one line prefixed by its role
    (``User: ...``, ``System: ...``) and the reply follows ``Assistant: ``. Replies end at a newline.
    Same methods as :class:`~longmem.pretrained.chat_template.TurnRenderer`.
    """

    def __init__(self, turn_format: str | None = None):
        self.turn_format = None if turn_format is None else check_turn_format(turn_format)

    def _message(self, m: dict[str, Any]) -> str:
        text = str(m.get("content") or "")
        if self.turn_format is None:
            return f"{str(m['role']).capitalize()}: {text}\n"
        return f"{text}\n" if m["role"] == "assistant" else self.turn_format.format(text=text)

    def render(self, messages: list[dict[str, Any]], *, after: Past = None) -> str:
        """The text to feed for ``messages`` and the header of the reply (the past does not change it)."""
        return "".join(self._message(m) for m in messages) + ("Assistant: " if self.turn_format is None else "")

    def closing(self, stop: str | None) -> str:
        """What ends the reply in the memory: nothing after the newline the model wrote, else a newline."""
        return "" if stop else "\n"


MessageRenderer = Union[TurnRenderer, TextFormat]


def message_format(tokenizer: Tokenizer, *, turn_format: str | None = None) -> tuple[MessageRenderer, list[str]]:
    """How the server renders chat messages: the model's own chat template when its tokenizer has one and no
    ``turn_format`` is given (a :class:`TurnRenderer`), else a :class:`TextFormat`; and the stop strings that
    end a reply (the template's end-of-turn tokens, else a newline)."""
    if isinstance(tokenizer, PretrainedTokenizer) and tokenizer.chat_template and turn_format is None:
        return (TurnRenderer(tokenizer.chat_template, template_variables(tokenizer.config)),
                list(tokenizer.end_of_turn().strings) or ["\n"])
    return TextFormat(turn_format), ["\n"]


def history_digest(messages: list[dict[str, Any]]) -> str:
    """sha256 of the roles and contents of ``messages``: what a session remembers of the conversation it holds."""
    text = json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def messages_to_feed(messages: list[dict[str, Any]], *, remembers: bool, seen: int = 0, history: str = ""
                     ) -> tuple[list[dict[str, Any]], Past]:
    """Which of ``messages`` (the whole conversation, as OpenAI clients send it) a memory is fed, and what they
    follow (the ``after`` of ``TurnRenderer.render``). The rule of the server's chat API:

    - a fresh memory (``remembers`` false: no session, or a new or reset one): every message, after nothing;
    - a conversation that begins with the ``seen`` messages the session's memory holds (``history`` is their
      :func:`history_digest`) and goes on: the messages after those;
    - anything else (a client that sends only the new message, an edited or regenerated conversation, a
      session filled by completions): the messages after the last assistant message (at least the last one),
      after a past not at hand (the memory keeps what it holds; it is never rewound).
    """
    if not remembers:
        return list(messages), None
    if 0 < seen < len(messages) and history_digest(messages[:seen]) == history:
        return list(messages[seen:]), list(messages[:seen])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return list(messages[last + 1:] or messages[-1:]), UNKNOWN_PAST


def run_chat(run: Run, *, session: str = "default", sessions_dir: str | Path | None = None,
             sampling: SamplingConfig | None = None, turn_format: str | None = None, system: str | None = None,
             attention_sink: int = 4, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> dict:
    """Run the loop until end of input or /quit; returns the session's final stats. Turns are formatted by
    :func:`chat_format` (``sampling.stop`` empty: its default stop strings)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    check_session_name(session)
    fmt, default_stop = chat_format(run.tokenizer, turn_format=turn_format, system=system)
    sampling = sampling or SamplingConfig(max_new_tokens=200, temperature=0.8)
    if not sampling.stop:
        sampling = replace(sampling, stop=default_stop)
    store = SessionStore(sessions_dir or default_sessions_dir(run.path), model=run.model)
    sess = store.load(session)
    decoder = Decoder(run.model, attention_sink=attention_sink)
    interactive = stdin.isatty()
    print(f"session {session!r}: {_turns(sess.turns)} remembered ({store.path(session)}); "
          f"commands: {', '.join(COMMANDS)}", file=stderr)
    lines = read_lines(stdin, stderr)
    while True:
        if interactive:
            print("> ", end="", file=stderr, flush=True)
        line = next(lines, "")
        if not line:
            break
        text = line.rstrip("\n")
        cmd = text.strip()
        if cmd in ("/quit", "/exit"):
            break
        if cmd == "/reset":
            sess.reset()
            store.save(sess)
            print("[memory cleared]", file=stdout, flush=True)
            continue
        if cmd == "/save":
            print(f"[saved {store.save(sess)}]", file=stdout, flush=True)
            continue
        if cmd == "/stats":
            st = sess.stats()
            print(f"[session {st['session']}: {_turns(st['turns'])}, {st['tokens']} tokens seen, memory "
                  f"{st['memory_bytes']:,} bytes ({', '.join(st['memory_parts']) or 'empty'}), at most "
                  f"{decoder.cache_positions()} past positions per layer]", file=stdout, flush=True)
            continue
        if cmd.startswith("/") and " " not in cmd:
            print(f"[unknown command {cmd}; commands: {', '.join(COMMANDS)}]", file=stdout, flush=True)
            continue
        if not text:
            continue
        prompt = (fmt.format(text=text) if isinstance(fmt, str)
                  else fmt.user_turn(text, first=sess.turns == 0 or sess.state is None))
        stream = TextStream(run.model, run.tokenizer, prompt,
                            sampling=replace(sampling, seed=(sampling.seed + sess.turns) % 2**63), state=sess.state,
                            decoder=decoder)
        for piece in stream:
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        sess.state = stream.state
        if not isinstance(fmt, str) and (closing := fmt.closing(stream.stopped_by)):
            sess.state = decoder.feed(torch.tensor([run.tokenizer.encode(closing)], device=decoder.device),
                                      sess.state)[1]                   # the memory ends where the turn ends
        sess.turns += 1
        sess.tokens += stream.prompt_tokens + stream.completion_tokens
        store.save(sess)
    store.save(sess)
    st = sess.stats()
    print(f"session {session!r} saved: {_turns(st['turns'])}, memory {state_nbytes(sess.state):,} bytes", file=stderr)
    return st
