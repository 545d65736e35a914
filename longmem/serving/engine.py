"""The model worker behind the server: one thread owns the model and every session.

Requests are queued (FIFO) and run one at a time, start to finish, so two
requests are never interleaved inside one model state. A session's memory is
only ever read and written by requests naming that session: sessions live in a
dict keyed by name, in RAM while in use, written to disk when idle for
``session_idle_s`` or when more than ``max_live_sessions`` are open (least
recently used first), and on shutdown. On disk the folder keeps at most
``max_sessions_on_disk`` files and ``max_sessions_disk_bytes`` bytes: after each
write the least recently used files go, never one of a live session. Nothing
here imports a web framework.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from longmem.generation.chat import MessageRenderer, history_digest, messages_to_feed
from longmem.generation.decoding import Decoder
from longmem.generation.generate import TextStream
from longmem.generation.inspect import inspect_text
from longmem.generation.processors import SamplingConfig
from longmem.generation.session import Session, SessionStore, state_nbytes
from longmem.models.memory import State
from longmem.serving.config import ServeConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from longmem.runs import Run


class QueueFull(RuntimeError):
    pass


class SessionNotFound(LookupError):
    pass


@dataclass
class ChatTurn:
    """A chat request for the worker: the whole conversation as the client sent it (``{"role", "content"}``
    dicts) and how messages are rendered (``generation.chat.message_format``)."""
    messages: list[dict[str, Any]]
    renderer: MessageRenderer


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    session: dict[str, Any] | None = None        # the session's stats after this request
    memory_reset: bool = False                   # the session went past max_session_bytes and was cleared
    messages_fed: int | None = None              # chat: the messages of the request fed to the memory


@dataclass
class _Job:
    prompt: str | None
    sampling: SamplingConfig | None
    session: str | None
    on_piece: Callable[[str], None] | None
    chat: ChatTurn | None = None
    options: dict[str, Any] = field(default_factory=dict)      # inspect: top, layers
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    action: str = "complete"                     # or "flush", "inspect", "sessions"


class Engine:
    def __init__(self, run: Run, config: ServeConfig):
        self.run = run
        self.config = config
        self.store = SessionStore(Path(config.sessions_dir) if config.sessions_dir else Path(run.path) / "sessions",
                                  model=run.model, max_files=config.max_sessions_on_disk,
                                  max_bytes=config.max_sessions_disk_bytes)
        self.decoder = Decoder(run.model, attention_sink=config.attention_sink)
        self.live: OrderedDict[str, Session] = OrderedDict()
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=config.max_queue)
        self.served = 0
        self._thread = threading.Thread(target=self._work, name="longmem-model", daemon=True)
        self._thread.start()

    # -- called from the web threads ----------------------------------------------
    def submit(self, prompt: str | None, sampling: SamplingConfig, *, session: str | None = None,
               on_piece: Callable[[str], None] | None = None, chat: ChatTurn | None = None) -> _Job:
        """Queue a completion of ``prompt``, or with ``chat`` (prompt None) the assistant's reply to a
        conversation (fed by the session rule, ``generation.chat.messages_to_feed``); ``job.future`` gets a
        :class:`Completion`, ``on_piece`` each text piece."""
        job = _Job(prompt=prompt, sampling=sampling, session=session, on_piece=on_piece, chat=chat)
        self._put(job)
        return job

    def inspect(self, text: str, *, session: str | None = None, top: int = 5,
                layers: list[int] | None = None) -> Future:
        """Queue an inspection of ``text`` (after ``session``'s memory, which stays as it is); the future gets
        ``generation.inspect.inspect_text``'s data, or SessionNotFound."""
        job = _Job(prompt=text, sampling=None, session=session, on_piece=None, action="inspect",
                   options={"top": top, "layers": layers})
        self._put(job)
        return job.future

    def sessions(self) -> Future:
        """Queue a listing of the sessions, live and on disk: ``[{"session", "live"}]``."""
        job = _Job(prompt=None, sampling=None, session=None, on_piece=None, action="sessions")
        self._put(job)
        return job.future

    def flush(self) -> Future:
        """Write every live session to disk (in the worker, between requests)."""
        job = _Job(prompt=None, sampling=None, session=None, on_piece=None, action="flush")
        self._put(job)
        return job.future

    def _put(self, job: _Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.config.max_queue} requests are already waiting; try again later") from None

    def close(self) -> None:
        """Finish the queued requests, write the live sessions, stop the worker."""
        self.queue.put(None)
        self._thread.join()

    def stats(self) -> dict[str, int]:
        return {"queued": self.queue.qsize(), "live_sessions": len(self.live), "served": self.served}

    # -- the worker ------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                job = self.queue.get(timeout=min(self.config.session_idle_s, 5.0))
            except queue.Empty:
                self._evict(idle_only=True)
                continue
            if job is None:
                break
            try:
                work = {"flush": lambda _: self._flush(), "inspect": self._inspect, "sessions": lambda _: self._list(),
                        "complete": self._complete}[job.action]
                job.future.set_result(work(job))
            except BaseException as e:                       # reported to the request, the worker goes on
                job.future.set_exception(e)
            self._evict(idle_only=True)
        self._flush()

    def _session(self, name: str) -> Session:
        if name in self.live:
            self.live.move_to_end(name)
            return self.live[name]
        sess = self.store.load(name)
        self.live[name] = sess
        self._evict(idle_only=False)                        # make room: least recently used first
        return sess

    def _complete(self, job: _Job) -> Completion:
        sess = self._session(job.session) if job.session else None
        state = sess.state if sess else None
        prompt, fed = job.prompt, None
        if job.chat is not None:                             # the session rule: only what the memory lacks
            new, after = messages_to_feed(job.chat.messages, remembers=state is not None,
                                          seen=sess.messages if sess else 0, history=sess.history if sess else "")
            prompt, fed = job.chat.renderer.render(new, after=after), len(new)
        assert prompt is not None and job.sampling is not None
        stream = TextStream(self.run.model, self.run.tokenizer, prompt, sampling=job.sampling, state=state,
                            decoder=self.decoder)
        for piece in stream:
            if job.on_piece is not None:
                job.on_piece(piece)
            if job.cancelled.is_set():                       # the client went away
                stream.tokens.stop()
        self.served += 1
        reset = False
        if sess is not None:
            sess.state = stream.state
            sess.messages, sess.history = 0, ""              # a completion: the memory holds no known chat
            if job.chat is not None:
                closing = job.chat.renderer.closing(stream.stopped_by)
                if closing:                                  # the memory ends where the turn ends
                    ids = torch.tensor([self.run.tokenizer.encode(closing)], device=self.decoder.device)
                    sess.state = self.decoder.feed(ids, sess.state)[1]
                conversation = [*job.chat.messages, {"role": "assistant", "content": stream.text}]
                sess.messages, sess.history = len(conversation), history_digest(conversation)
            sess.turns += 1
            sess.tokens += stream.prompt_tokens + stream.completion_tokens
            sess.updated = time.time()
            if state_nbytes(sess.state) > self.config.max_session_bytes:
                log.warning("session %r went past max_session_bytes (%s bytes); its memory is cleared", sess.name,
                            f"{state_nbytes(sess.state):,}")
                sess.reset()
                reset = True
        return Completion(text=stream.text, finish_reason="stop" if stream.finish_reason == "stop" else "length",
                          prompt_tokens=stream.prompt_tokens, completion_tokens=stream.completion_tokens,
                          session=sess.stats() if sess else None, memory_reset=reset, messages_fed=fed)

    def _inspect(self, job: _Job) -> dict[str, Any]:
        assert job.prompt is not None
        state = None
        if job.session:
            if job.session not in self.live and not self.store.exists(job.session):
                raise SessionNotFound(f"no session named {job.session!r}")
            sess = self._session(job.session)
            # a copy: memories may write their state in place (retrieval), and this one must stay as it is
            state = None if sess.state is None else State.from_state_dict(
                {k: v.clone() for k, v in sess.state.state_dict().items()})
        return inspect_text(self.decoder, self.run.tokenizer, job.prompt, state=state, **job.options)

    def _list(self) -> list[dict[str, Any]]:
        on_disk = {p.stem for p in self.store.folder.glob("*.safetensors")} if self.store.folder.is_dir() else set()
        return [{"session": name, "live": name in self.live} for name in sorted(on_disk | set(self.live))]

    def _evict(self, *, idle_only: bool) -> None:
        now, saved = time.time(), False
        for name in list(self.live):
            sess = self.live[name]
            idle = now - sess.updated > self.config.session_idle_s and name != next(reversed(self.live))
            over = len(self.live) > self.config.max_live_sessions
            if not (idle or (over and not idle_only)):
                continue
            self.store.save(sess)
            del self.live[name]
            saved = True
        if saved:
            self.store.prune(keep=self.live)

    def _flush(self) -> int:
        for sess in self.live.values():
            self.store.save(sess)
        self.store.prune(keep=self.live)
        return len(self.live)
