"""The model worker behind the server: one thread owns the model and every session.

Completions run as lanes of one batch (continuous batching): a request's prompt is fed alone, then the
request joins the lanes decoding one token each per step (``generation.decoding.Lanes``: the one-lane
states stacked, caches right-aligned), and leaves when it is done; requests join and leave between steps.
At most ``max_batch`` lanes run together (1: one request at a time, start to finish). Each lane draws its
tokens with its own sampling settings and generator, and with ``batch_math="exact"`` computes bit for bit
what the request alone would, so a session's answers and memory do not depend on which other requests ran
beside it. Two requests of one session never run together: a request waits while an earlier one of its
session is queued or running. Inspections of a session wait the same way; listings and flushes wait until
every earlier request is done. Jobs waiting for the model (queued, not yet running) are at most
``max_queue``; more are refused (QueueFull).

A session's memory is only ever read and written by requests naming that session: sessions live in a dict
keyed by name, in RAM while in use, written to disk when idle for ``session_idle_s`` or when more than
``max_live_sessions`` are open (least recently used first, never one with a request running), and on
shutdown. On disk the folder keeps at most ``max_sessions_on_disk`` files and ``max_sessions_disk_bytes``
bytes: after each write the least recently used files go, never one of a live session. Nothing here imports
a web framework.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from longmem.generation.chat import MessageRenderer, history_digest, messages_to_feed
from longmem.generation.decoding import Decoder, Lanes
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


@dataclass
class _Lane:
    """A completion decoding in the batch. While it is there its memory lives in ``Engine.lanes``; it is
    written back to ``stream.tokens.state`` when the lane leaves."""
    job: _Job
    session: Session | None
    stream: TextStream
    fed: int | None                              # chat: the messages of the request fed to the memory


class Engine:
    def __init__(self, run: Run, config: ServeConfig):
        self.run = run
        self.config = config
        self.store = SessionStore(Path(config.sessions_dir) if config.sessions_dir else Path(run.path) / "sessions",
                                  model=run.model, max_files=config.max_sessions_on_disk,
                                  max_bytes=config.max_sessions_disk_bytes)
        self.decoder = Decoder(run.model, attention_sink=config.attention_sink)
        self.live: OrderedDict[str, Session] = OrderedDict()
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.waiting: deque[_Job] = deque()          # taken from the queue, not started yet (worker only)
        self.lanes = Lanes(self.decoder, exact=config.batch_math == "exact")
        self.running: list[_Lane] = []               # the lanes, in the order of self.lanes
        self.busy: set[str] = set()                  # sessions with a request running
        self._queued = 0                             # jobs submitted and not started (bounded by max_queue)
        self._lock = threading.Lock()
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
        with self._lock:
            if self._queued >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting; try again later")
            self._queued += 1
        self.queue.put(job)

    def close(self) -> None:
        """Finish the queued requests, write the live sessions, stop the worker."""
        self.queue.put(None)
        self._thread.join()

    def stats(self) -> dict[str, int]:
        return {"queued": self._queued, "running": len(self.running), "live_sessions": len(self.live),
                "served": self.served}

    # -- the worker ------------------------------------------------------------
    def _work(self) -> None:
        closing = False
        while True:
            idle = not self.running and not self.waiting and not closing
            try:                                             # take what is queued; wait only when idle
                job = self.queue.get(timeout=min(self.config.session_idle_s, 5.0)) if idle else self.queue.get_nowait()
                while True:
                    if job is None:
                        closing = True
                    else:
                        self.waiting.append(job)
                    job = self.queue.get_nowait()
            except queue.Empty:
                pass
            self._start()
            if self.running:
                self._step()
            elif closing and not self.waiting:
                break
            else:
                self._evict(idle_only=True)
        self._flush()

    def _started(self, job: _Job) -> None:
        with self._lock:
            self._queued -= 1

    def _run(self, job: _Job) -> None:
        """A job that is not a completion, run now whole."""
        self._started(job)
        try:
            work = {"flush": lambda _: self._flush(), "inspect": self._inspect, "sessions": lambda _: self._list()}
            job.future.set_result(work[job.action](job))
        except BaseException as e:                           # reported to the request, the worker goes on
            job.future.set_exception(e)

    def _start(self) -> None:
        """Start the waiting jobs that may start, in order: a completion joins the lanes if one is free and its
        session has no earlier request waiting or running; listings and flushes wait for every earlier job."""
        kept: deque[_Job] = deque()
        blocked = set(self.busy)
        joined: list[_Lane] = []
        barrier = False
        for job in self.waiting:
            whole = job.action in ("flush", "sessions")
            if barrier or (whole and (self.running or joined or kept)) or (job.session and job.session in blocked):
                barrier = barrier or whole
                kept.append(job)
            elif job.action != "complete":
                self._run(job)
            elif len(self.running) + len(joined) < self.config.max_batch:
                lane = self._begin(job)
                if lane is not None:
                    joined.append(lane)
            else:
                kept.append(job)
            if job.session:
                blocked.add(job.session)
        self.waiting = kept
        if joined:
            fresh = [lane.stream.state for lane in joined]            # not None: the prompt was fed
            self.lanes.set([*self.lanes.states(), *(st for st in fresh if st is not None)])
            self.running += joined

    def _session(self, name: str) -> Session:
        if name in self.live:
            self.live.move_to_end(name)
            return self.live[name]
        sess = self.store.load(name)
        self.live[name] = sess
        self._evict(idle_only=False, keep=name)              # make room: least recently used first
        return sess

    def _begin(self, job: _Job) -> _Lane | None:
        """Load the session, feed the prompt alone; the lane, ready to join (None: done or failed already)."""
        self._started(job)
        try:
            sess = self._session(job.session) if job.session else None
            state = sess.state if sess else None
            prompt, fed = job.prompt, None
            if job.chat is not None:                         # the session rule: only what the memory lacks
                new, after = messages_to_feed(job.chat.messages, remembers=state is not None,
                                              seen=sess.messages if sess else 0, history=sess.history if sess else "")
                prompt, fed = job.chat.renderer.render(new, after=after), len(new)
            assert prompt is not None and job.sampling is not None
            stream = TextStream(self.run.model, self.run.tokenizer, prompt, sampling=job.sampling, state=state,
                                decoder=self.decoder)
            stream.tokens.begin()
        except BaseException as e:
            job.future.set_exception(e)
            return None
        lane = _Lane(job=job, session=sess, stream=stream, fed=fed)
        if sess is not None:
            self.busy.add(sess.name)
        if stream.tokens.finished:                           # max_tokens 0: nothing to decode
            self._finish(lane)
            return None
        return lane

    def _step(self) -> None:
        """Every lane draws a token (its pieces go out), the tokens are fed as one batch; finished lanes leave."""
        tokens, failed = [], []
        for i, lane in enumerate(self.running):
            try:
                tok = lane.stream.tokens.draw()
                piece = lane.stream.push(tok)
                if piece and lane.job.on_piece is not None:
                    lane.job.on_piece(piece)
                if lane.job.cancelled.is_set():               # the client went away: this token is the last
                    lane.stream.tokens.stop()
                tokens.append(tok)
            except BaseException as e:
                failed.append(i)
                self._fail(lane, e)
        if failed:                                           # they leave before the feed
            states = self.lanes.states()
            self.running = [lane for i, lane in enumerate(self.running) if i not in failed]
            self.lanes.set([st for i, st in enumerate(states) if i not in failed])
        if not self.running:
            return
        try:
            logits = self.lanes.step(tokens)
        except BaseException as e:                           # not expected: every lane fails, sessions unchanged
            for lane in self.running:
                self._fail(lane, e)
            self.running = []
            self.lanes.set([])
            return
        for lane, lg in zip(self.running, logits):
            lane.stream.tokens.advance(lg, lane.stream.tokens.state)      # the state stays in the batch
        done = [i for i, lane in enumerate(self.running) if lane.stream.tokens.finished]
        if done:
            states = self.lanes.states()
            for i in done:
                self.running[i].stream.tokens.state = states[i]
                self._finish(self.running[i])
            self.running = [lane for i, lane in enumerate(self.running) if i not in done]
            self.lanes.set([st for i, st in enumerate(states) if i not in done])
            self._evict(idle_only=False)                     # sessions over the cap, held while running

    def _fail(self, lane: _Lane, e: BaseException) -> None:
        if lane.session is not None:
            self.busy.discard(lane.session.name)
        lane.job.future.set_exception(e)

    def _finish(self, lane: _Lane) -> None:
        try:
            lane.job.future.set_result(self._complete(lane))
        except BaseException as e:
            lane.job.future.set_exception(e)
        finally:
            if lane.session is not None:
                self.busy.discard(lane.session.name)

    def _complete(self, lane: _Lane) -> Completion:
        job, sess, stream = lane.job, lane.session, lane.stream
        tail = stream.close()
        if tail and job.on_piece is not None:
            job.on_piece(tail)
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
                          session=sess.stats() if sess else None, memory_reset=reset, messages_fed=lane.fed)

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

    def _evict(self, *, idle_only: bool, keep: str | None = None) -> None:
        now, saved = time.time(), False
        for name in list(self.live):
            sess = self.live[name]
            if name in self.busy or name == keep:            # a request is running on it, or it was just loaded
                continue
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
