"""Per-session memory on disk: the memory state after each turn, restored next time.

A session file ``NAME.safetensors`` holds the tensors of ``State.state_dict()``
(whatever memory parts the model has: XL, kNN, memory tokens; or the decoding
cache of a model without memory) and JSON metadata in the safetensors header:
the fingerprint of the weights it was made with, turn and token counts. Files are
written atomically; a session made by another model is refused.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from longmem.models import MemoryLM
from longmem.models.memory import State
from longmem.models.weights import weights_fingerprint
from longmem.training.checkpoint import atomic_write_bytes, read_safetensors

SESSION_FORMAT = "longmem-session"
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def state_nbytes(state: State | None) -> int:
    return 0 if state is None else sum(t.numel() * t.element_size() for t in state.state_dict().values())


def check_session_name(name: str) -> str:
    if not isinstance(name, str) or not SESSION_NAME.match(name):
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
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def reset(self) -> None:
        self.state, self.turns, self.tokens, self.updated = None, 0, 0, time.time()

    def stats(self) -> dict:
        return {"session": self.name, "turns": self.turns, "tokens": self.tokens,
                "memory_bytes": state_nbytes(self.state),
                "memory_parts": self.state.parts() if self.state is not None else []}


class SessionStore:
    """Session files in one folder, checked against the fingerprint of the model's weights."""

    def __init__(self, folder: str | Path, *, model: MemoryLM, fingerprint: str | None = None):
        self.folder = Path(folder)
        self.model = model
        self.fingerprint = fingerprint or weights_fingerprint(model)

    def path(self, name: str) -> Path:
        return self.folder / f"{check_session_name(name)}.safetensors"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> Session:
        """The saved session, or a new empty one when there is no file yet."""
        path = self.path(name)
        if not path.is_file():
            return Session(name=name)
        tensors, meta = read_safetensors(path, what="session file")
        if meta.get("format") != SESSION_FORMAT:
            raise ValueError(f"{path} is not a longmem session (format={meta.get('format')!r})")
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"session {name!r} ({path}) was made by another model (weights fingerprint "
                             f"{meta.get('fingerprint')} vs {self.fingerprint}); use another session name "
                             f"or delete the file")
        info = json.loads(meta.get("info", "{}"))
        device = self.model.embed.weight.device
        state = None
        if tensors.get("batch_size") is not None and len(tensors) > 1:
            state = State.from_state_dict({k: v.to(device) for k, v in tensors.items()})
        return Session(name=name, state=state, turns=int(info.get("turns", 0)), tokens=int(info.get("tokens", 0)),
                       created=float(info.get("created", time.time())), updated=float(info.get("updated", 0)))

    def save(self, session: Session) -> Path:
        path = self.path(session.name)
        tensors = {k: v.detach().cpu().contiguous()
                   for k, v in (session.state.state_dict() if session.state is not None
                                else {"batch_size": torch.tensor(1)}).items()}
        info = {"turns": session.turns, "tokens": session.tokens, "created": session.created,
                "updated": session.updated}
        meta = {"format": SESSION_FORMAT, "version": "1", "fingerprint": self.fingerprint, "info": json.dumps(info)}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        return path

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
