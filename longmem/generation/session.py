"""Per-session memory on disk: the memory state after each turn, restored next time.

A session file ``NAME.safetensors`` is a tensor file (``longmem.io``): the tensors of
``State.state_dict()`` (whatever memory parts the model has: XL, kNN, memory tokens; or the
decoding cache of a model without memory), the fingerprint of the weights it was made with, and
turn and token counts as its info. Files are written atomically; a session made by another
model, or whose tensors do not fit this model's memory (other names, dtypes or sizes, NaN,
negative counts), is refused. A store may be bounded (``max_files``, ``max_bytes``): after a
write, the least recently used files (by modification time, set on every save and load) are
deleted until it fits.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from longmem.generation.decoding import Decoder
from longmem.models import MemoryLM
from longmem.models.memory import State
from longmem.io import read_tensor_file, weights_fingerprint, write_tensor_file

SESSION_FORMAT, SESSION_VERSION = "longmem-session", "1"
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")          # the whole name (fullmatch)


def state_nbytes(state: State | None) -> int:
    return 0 if state is None else sum(t.numel() * t.element_size() for t in state.state_dict().values())


def check_session_name(name: str) -> str:
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name):
        raise ValueError(f"invalid session name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit")
    return name


@dataclass
class Session:
    """One conversation's memory; ``state`` None means nothing remembered yet."""
    name: str
    state: State | None = None
    turns: int = 0
    tokens: int = 0                                   # prompt + output tokens the memory has seen
    messages: int = 0                                 # chat messages the memory holds (server chat API)
    history: str = ""                                 # sha256 of those messages (generation.chat.history_digest)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def reset(self) -> None:
        self.state, self.turns, self.tokens, self.updated = None, 0, 0, time.time()
        self.messages, self.history = 0, ""

    def stats(self) -> dict[str, Any]:
        return {"session": self.name, "turns": self.turns, "tokens": self.tokens, "messages": self.messages,
                "memory_bytes": state_nbytes(self.state),
                "memory_parts": self.state.parts() if self.state is not None else []}


class SessionStore:
    """Session files in one folder, checked against the fingerprint of the model's weights;
    ``max_files`` / ``max_bytes`` (0: no cap) bound the folder, see :meth:`prune`."""

    def __init__(self, folder: str | Path, *, model: MemoryLM, fingerprint: str | None = None, max_files: int = 0,
                 max_bytes: int = 0):
        self.folder = Path(folder)
        self.model = model
        self.fingerprint = fingerprint or weights_fingerprint(model)
        self.max_files, self.max_bytes = max_files, max_bytes
        self._layout: tuple[list[frozenset], dict[str, tuple[torch.dtype, tuple]]] | None = None
        self._clock = 0                                    # last mtime stamped (ns), strictly increasing

    def path(self, name: str) -> Path:
        return self.folder / f"{check_session_name(name)}.safetensors"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> Session:
        """The saved session, or a new empty one when there is no file yet."""
        path = self.path(name)
        if not path.is_file():
            return Session(name=name)
        tensors, info = read_tensor_file(path, format=SESSION_FORMAT, versions=(SESSION_VERSION,),
                                         fingerprint=self.fingerprint, what="session file")
        device = self.model.embed.weight.device
        state = None
        if set(tensors) != {"batch_size"}:                  # only batch_size: nothing remembered yet
            tensors = self._adopt(path, tensors)
            self._check_layout(path, tensors)
            state = State.from_state_dict({k: v.to(device) for k, v in tensors.items()})
        self._touch(path)
        return Session(name=name, state=state, turns=int(info.get("turns", 0)), tokens=int(info.get("tokens", 0)),
                       messages=int(info.get("messages", 0)), history=str(info.get("history", "")),
                       created=float(info.get("created", time.time())), updated=float(info.get("updated", 0)))

    def save(self, session: Session) -> Path:
        path = self.path(session.name)
        tensors = session.state.state_dict() if session.state is not None else {"batch_size": torch.tensor(1)}
        info = {"turns": session.turns, "tokens": session.tokens, "messages": session.messages,
                "history": session.history, "created": session.created, "updated": session.updated}
        write_tensor_file(path, tensors, format=SESSION_FORMAT, version=SESSION_VERSION, fingerprint=self.fingerprint,
                          info=info)
        self._touch(path)
        return path

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def prune(self, *, keep: Iterable[str] = ()) -> list[str]:
        """Delete the least recently used session files until at most ``max_files`` files and ``max_bytes``
        bytes remain, never the sessions named in ``keep``; returns the names deleted."""
        if not (self.max_files or self.max_bytes):
            return []
        files = []
        for path in self.folder.glob("*.safetensors"):
            try:
                st = path.stat()
            except FileNotFoundError:                      # deleted meanwhile
                continue
            files.append((st.st_mtime_ns, path, st.st_size))
        files.sort(key=lambda f: f[0])                     # least recently used first
        count, total, deleted = len(files), sum(f[2] for f in files), []
        for _, path, size in files:
            if (not self.max_files or count <= self.max_files) and (not self.max_bytes or total <= self.max_bytes):
                break
            if path.stem in keep:
                continue
            path.unlink(missing_ok=True)
            count, total = count - 1, total - size
            deleted.append(path.stem)
        return deleted

    def _adopt(self, path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sessions of longmem 0.1 kept XL hidden states, which decoding now keeps as keys and values: convert
        them (exact, with this model's weights)."""
        if not any(k.startswith("xl.") for k in tensors) or any(k.startswith("xl.") for k in self._reference_layout()[1]):
            return tensors
        try:
            state = State.from_state_dict(tensors)
        except ValueError as e:
            raise ValueError(f"session file {path} does not fit this model's memory: {e}; use another session "
                             f"name or delete the file") from None
        adopted = Decoder(self.model).adopt(state)
        assert adopted is not None                                  # adopt keeps a state a state
        return adopted.state_dict()

    def _touch(self, path: Path) -> None:
        """Mark ``path`` as just used: its mtime orders :meth:`prune` (strictly increasing within a process,
        so uses closer together than the clock's resolution keep their order)."""
        self._clock = max(time.time_ns(), self._clock + 1)
        os.utime(path, ns=(self._clock, self._clock))

    def _reference_layout(self) -> tuple[list[frozenset], dict[str, tuple[torch.dtype, tuple]]]:
        """The sets of names a one-lane memory of this model has, and per name (dtype, shape with
        None for a length that grows), read off the states after decoding 1, 2, W + 2 and 2W + 2 tokens
        (W = segment_len: some memories write once per segment)."""
        if self._layout is None:
            decoder, W = Decoder(self.model), self.model.config.segment_len
            tokens = torch.zeros(1, 2 * W + 2, dtype=torch.long, device=self.model.embed.weight.device)
            states, state = [], None
            for a, b in ((0, 1), (1, 2), (2, W + 2), (W + 2, 2 * W + 2)):
                _, state = decoder.feed(tokens[:, a:b], state)
                states.append(state.state_dict())
            seen: dict[str, list[torch.Tensor]] = {}
            for d in states:
                for k, v in d.items():
                    seen.setdefault(k, []).append(v)
            layout = {k: (vs[0].dtype,
                          tuple(n if all(v.shape[i] == n for v in vs) else None for i, n in enumerate(vs[0].shape)))
                      for k, vs in seen.items()}
            self._layout = [frozenset(d) for d in states], layout
        return self._layout

    def _check_layout(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """ValueError naming the file unless ``tensors`` have the names, dtypes and sizes of this model's
        memory for one lane, with finite values and no negative counts."""
        (key_sets, want), problems = self._reference_layout(), []
        names = frozenset(tensors)
        if "kv.seen" not in names and names | {"kv.seen"} in key_sets:
            names = names | {"kv.seen"}                           # a cache of keys before rotary positions (0.2)
        if names not in key_sets:                                 # names against those of a full memory
            missing, extra = sorted(key_sets[-1] - set(tensors)), sorted(set(tensors) - key_sets[-1])
            if missing:
                problems.append(f"missing tensors {missing[:5]}")
            if extra:
                problems.append(f"unexpected tensors {extra[:5]}")
        for k in sorted(set(want) & set(tensors)):
            t, (dtype, shape) = tensors[k], want[k]
            if t.dtype != dtype or t.dim() != len(shape) or any(
                    n is not None and n != m for n, m in zip(shape, t.shape)):
                expected = ", ".join("*" if n is None else str(n) for n in shape)
                problems.append(f"{k} is {t.dtype} of shape {tuple(t.shape)}, this model keeps "
                                f"{dtype} of shape ({expected})")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                problems.append(f"{k} holds NaN or inf")
            elif not t.is_floating_point() and t.numel() and int(t.min()) < 0:
                problems.append(f"{k} holds a negative count")
        if not problems and int(tensors["batch_size"]) != 1:
            problems.append(f"batch_size is {int(tensors['batch_size'])}, a session has 1 lane")
        if problems:
            raise ValueError(f"session file {path} does not fit this model's memory: {'; '.join(problems[:5])}; "
                             f"use another session name or delete the file")
