"""The memory state carried from one call to the next, one row per lane.

A :class:`State` maps part names (``"xl"``, ``"knn"``, ``"tokens"``, ...) to *parts*: each memory of
a model keeps one part, a frozen dataclass of tensors whose first dimension is the lane, with four
methods (the :class:`Part` protocol). ``State`` itself only loops over its parts, so a new memory kind
adds a part class and one :func:`register_part` line, nothing here. The state round-trips through a
flat ``{"name.key": tensor}`` dict so it can be written with safetensors (resume, chat sessions).

A part class may also define ``stack(parts) -> part | None`` (one part whose lanes are theirs; None when
they do not fit together) and ``lane(i) -> part`` (lane i alone): :meth:`State.stack` / :meth:`State.unstack`
use them to decode the states of several streams as lanes of one batch (the server's continuous batching);
a state with a part lacking them is fed alone.

``pending`` holds the token ids of an unfinished segment when a memory writes whole segments only
(memory tokens): the next call recomputes them in front of its own tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import EllipsisType
from typing import Any, Mapping, Protocol

import torch


class Part(Protocol):
    """One memory's slice of the state; lanes are the first dimension of every tensor."""

    def reset(self, drop: torch.Tensor) -> "Part":
        """The part with the lanes where ``drop`` (B,) bool is true cleared (a new document starts there)."""

    def detach(self) -> "Part":
        """The part cut from the autograd graph (the trainer truncates backpropagation here)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; :meth:`from_tensors` reads them back."""

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> "Part":
        ...


PARTS: dict[str, type[Part]] = {}


def register_part(name: str, cls: type[Part]) -> type[Part]:
    """Make ``State.from_state_dict`` read keys ``name.*`` with ``cls.from_tensors``."""
    if name in ("batch_size", "pending") or "." in name:
        raise ValueError(f"part name {name!r} is reserved or holds a dot")
    PARTS[name] = cls
    return cls


def _keep(drop: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, ..., 1) bool of the lanes kept, shaped to broadcast over ``like``."""
    return (~drop.bool()).to(like.device).view(-1, *([1] * (like.dim() - 1)))


def _left_pad(ts: list[torch.Tensor], *, dim: int) -> torch.Tensor:
    """One lane per tensor, stacked along the lanes: shorter ones padded with zeros in front along ``dim``
    (right-aligned buffers: their last slots hold the history)."""
    n = max(t.shape[dim] for t in ts)
    padded = []
    for t in ts:
        if t.shape[dim] < n:
            shape = list(t.shape)
            shape[dim] = n - t.shape[dim]
            t = torch.cat([t.new_zeros(shape), t], dim=dim)
        padded.append(t)
    return torch.cat(padded, dim=0)


def _last(t: torch.Tensor, i: int, n: int, *, dim: int) -> torch.Tensor:
    """Lane i's last ``n`` slots along ``dim``, copied (a lane must not keep the whole batch alive)."""
    return t[i:i + 1].narrow(dim, t.shape[dim] - n, n).clone()


@dataclass(frozen=True)
class XLState:
    """Transformer-XL memory: per layer the last states of each lane.

    mems[l]: (B, M, D) inputs of layer l for the last M positions, oldest first.
    valid: (B,) how many of the M most recent slots hold real history for each
    lane (fewer after a reset or at the start of a stream).
    """
    mems: tuple[torch.Tensor, ...]
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.mems[0].shape[1] if self.mems else 0

    def reset(self, drop):
        keep = ~drop.bool().to(self.valid.device)
        return XLState(mems=tuple(torch.where(_keep(drop, m), m, 0) for m in self.mems), valid=self.valid * keep)

    def detach(self):
        return XLState(mems=tuple(m.detach() for m in self.mems), valid=self.valid)

    def to_tensors(self):
        return {"valid": self.valid, **{f"mems.{i}": m.contiguous() for i, m in enumerate(self.mems)}}

    @classmethod
    def from_tensors(cls, d):
        n = sum(1 for k in d if k.startswith("mems."))
        return cls(mems=tuple(d[f"mems.{i}"] for i in range(n)), valid=d["valid"].long())

    @classmethod
    def stack(cls, parts: list["XLState"]) -> "XLState | None":
        if len({len(p.mems) for p in parts}) > 1:
            return None
        return cls(mems=tuple(_left_pad([p.mems[i] for p in parts], dim=1) for i in range(len(parts[0].mems))),
                   valid=torch.cat([p.valid for p in parts]))

    def lane(self, i: int) -> "XLState":
        n = int(self.valid[i].clamp(max=self.length))
        return XLState(mems=tuple(_last(m, i, n, dim=1) for m in self.mems), valid=self.valid[i:i + 1].clone())


@dataclass(frozen=True)
class KVState:
    """A cache of keys and values per layer: the last positions of each lane, and with attention sinks
    its first ones (StreamingLLM, Xiao et al. 2023).

    keys[l], values[l]: (B, G, M, Dh), oldest first; valid: (B,) the most recent slots that hold real
    history (right-aligned, like :class:`XLState`). With sinks, a full lane holds its first ``n_sinks``
    positions in its first slots, then the most recent ones.
    seen: (B,) positions each lane has read since its reset, when the keys are stored with rotary
    positions (a key read as the lane's p-th position rotated by p; see ``memory/kv.py``); None when
    the keys are stored before rotary positions (models with smeared keys or memory tokens, and caches
    written by longmem 0.2 and earlier, which ``KVMemory`` converts on first use).
    room: where ``keys``/``values`` are views of buffers with spare slots behind them (``memory/kv.py``
    ``Room``: decoding and evaluation append a segment there instead of copying the cache), and ``room_end``
    the buffer slot they end at; None for tensors of their own. Not saved; reset drops it.
    """
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    valid: torch.Tensor
    seen: torch.Tensor | None = None
    room: Any = field(default=None, compare=False, repr=False)
    room_end: int = field(default=0, compare=False, repr=False)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reset(self, drop):
        keep = ~drop.bool().to(self.valid.device)
        return KVState(keys=tuple(torch.where(_keep(drop, k), k, 0) for k in self.keys),
                       values=tuple(torch.where(_keep(drop, v), v, 0) for v in self.values), valid=self.valid * keep,
                       seen=None if self.seen is None else self.seen * keep)

    def detach(self):
        return KVState(keys=tuple(k.detach() for k in self.keys), values=tuple(v.detach() for v in self.values),
                       valid=self.valid, seen=self.seen, room=self.room, room_end=self.room_end)

    def to_tensors(self):
        out = {"valid": self.valid}
        if self.seen is not None:
            out["seen"] = self.seen
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[f"keys.{i}"], out[f"values.{i}"] = k.contiguous(), v.contiguous()
        return out

    @classmethod
    def from_tensors(cls, d):
        n = sum(1 for k in d if k.startswith("keys."))
        seen = d.get("seen")
        return cls(keys=tuple(d[f"keys.{i}"] for i in range(n)), values=tuple(d[f"values.{i}"] for i in range(n)),
                   valid=d["valid"].long(), seen=None if seen is None else seen.long())

    @classmethod
    def stack(cls, parts: list["KVState"]) -> "KVState | None":
        """Lanes of different lengths right-aligned (padded in front; ``valid`` masks the padding, ``seen`` is
        per lane, so each lane's segment and sinks are rotated by its own positions). None when their layouts
        differ (keys with and without rotary positions, or caches of different depths), or when padding would
        move what a lane reads (see below). The result holds new tensors and no ``room``: the batch writes
        behind its cache in buffers of its own, never in the buffers of a stream that goes on alone."""
        if len({p.seen is None for p in parts}) > 1 or len({len(p.keys) for p in parts if p.length}) > 1:
            return None
        # a lane that evicted positions may keep attention sinks in its first slots, where the attention reads
        # (and turns) them: it stacks only with lanes no longer than it (no padding in front of it); a lane that
        # evicted nothing has no sink turned (its sink rotation is the identity), so padding in front is masked
        # by ``valid`` like any other
        n = max(p.length for p in parts)
        if any(p.seen is not None and p.length < n and bool((p.seen > p.valid).any()) for p in parts):
            return None
        # keys before rotary positions are rotated at their slots: padded, a lane's keys would be read at other
        # positions (the same distances, other roundings), so only caches of one length stack
        if parts[0].seen is None and len({p.length for p in parts}) > 1:
            return None
        filled = [p for p in parts if p.length]
        if not filled:
            return cls(keys=(), values=(), valid=torch.cat([p.valid for p in parts]), seen=cls._seen(parts))
        like = filled[0]

        def layer(i: int, kind: str) -> torch.Tensor:
            ts = [getattr(p, kind)[i] if p.length else getattr(like, kind)[i][:1, :, :0] for p in parts]
            return _left_pad(ts, dim=2)
        n = len(like.keys)
        return cls(keys=tuple(layer(i, "keys") for i in range(n)), values=tuple(layer(i, "values") for i in range(n)),
                   valid=torch.cat([p.valid for p in parts]), seen=cls._seen(parts))

    @staticmethod
    def _seen(parts: list["KVState"]) -> torch.Tensor | None:
        seen = [p.seen for p in parts if p.seen is not None]
        return torch.cat(seen) if seen else None

    def lane(self, i: int) -> "KVState":
        """Lane i alone, cut to the slots that hold its history: copies, no ``room`` (the batch's buffers stay
        the batch's, so two streams given back never share a buffer written in place)."""
        n = int(self.valid[i].clamp(max=self.length))
        return KVState(keys=tuple(_last(k, i, n, dim=2) for k in self.keys),
                       values=tuple(_last(v, i, n, dim=2) for v in self.values), valid=self.valid[i:i + 1].clone(),
                       seen=None if self.seen is None else self.seen[i:i + 1].clone())


class Ring:
    """The owner of a kNN store's buffers, which the memory writes in place (no copy of the store per segment).

    ``version`` counts the writes; a :class:`KNNState` holds the version it was made at, so the newest state of
    the buffers is the one whose version equals the ring's, and only that one is written in place; a state of
    tensors of its own (from ``init``, a file, a reset) is copied into a new ring first. An older state of the
    ring (the same state fed twice, a stream forked) is rebuilt from ``undo``: for each of the last writes the
    slots it overwrote and what they held, kept up to ``keep`` entries per lane (at least the last write); a
    state older than that raises (``KNNState.live``). ``index``: the approximate search index over the buffers
    (``memory/knn.py``), kept in step with the writes; never saved (the store is the source of truth)."""

    def __init__(self, *, keep: int = 0):
        self.version = 0
        self.index: Any = None
        self.keep = keep
        self.undo: list[tuple[int, torch.Tensor, tuple, tuple]] = []   # (version before, slots (B, T), keys, values)

    def record(self, slot: torch.Tensor, keys: tuple, values: tuple) -> None:
        """Before write ``version`` -> ``version + 1``: the slots (B, T) it overwrites and their keys and values
        per layer (B, G, T, Dh)."""
        self.undo.append((self.version, slot, keys, values))
        while len(self.undo) > 1 and sum(u[1].shape[1] for u in self.undo) > self.keep:
            self.undo.pop(0)

    def restore(self, state: "KNNState") -> "KNNState | None":
        """``state`` (an older state of this ring) in buffers of its own, or None when the undo records no longer
        reach back to it."""
        need = self.version - state.version
        if need <= 0 or len(self.undo) < need or self.undo[-need][0] != state.version:
            return None
        keys = [k.clone() for k in state.keys]
        values = [v.clone() for v in state.values]
        for _, slot, old_k, old_v in reversed(self.undo[-need:]):
            B, T = slot.shape
            for bufs, olds in ((keys, old_k), (values, old_v)):
                for buf, old in zip(bufs, olds):
                    buf.scatter_(2, slot.view(B, 1, T, 1).expand(old.shape), old)
        return KNNState(keys=tuple(keys), values=tuple(values), written=state.written, ring=Ring(keep=self.keep))


@dataclass(frozen=True)
class KNNState:
    """kNN long-term memory (Wu et al. 2022): per retrieving layer a FIFO ring of past keys and values.

    keys[l], values[l]: (B, G, C, Dh) entries of the l-th retrieving layer, detached.
    written: (B,) entries written to each lane since its last reset; the next one goes to
    slot ``written % C`` (overwriting the oldest once full), and slot s holds a real entry
    iff s < min(written, C). Slots of a reset lane are zeroed.
    ring, version: the :class:`Ring` whose buffers ``keys``/``values`` are, written in place, and the write
    this state was made at; None for tensors of their own (copied before the first write). Not saved. Read a
    state through :meth:`live` (the memory does): an older state of a ring is rebuilt from its undo records.
    """
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    written: torch.Tensor
    ring: Any = field(default=None, compare=False, repr=False)
    version: int = field(default=0, compare=False, repr=False)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def count(self) -> torch.Tensor:
        """(B,) entries each lane holds now."""
        return self.written.clamp(max=self.capacity)

    @property
    def current(self) -> bool:
        """False once a later call wrote over this state's buffers in place (:meth:`live` rebuilds it)."""
        return self.ring is None or self.ring.version == self.version

    def live(self) -> "KNNState":
        """This state, or, when a later call wrote its ring in place, a copy of it rebuilt from the ring's undo
        records (raises when they no longer reach back to it)."""
        if self.current:
            return self
        back = self.ring.restore(self)
        if back is None:
            raise ValueError("this kNN memory state was used up: later calls wrote its store in place "
                             f"(write {self.ring.version}, this state was made at write {self.version}, and the "
                             f"ring keeps the overwritten entries of its last {self.ring.keep} only); pass the "
                             "newest state (out.state of the last call), or keep a copy to come back to with "
                             "state.clone() before passing it on")
        return back

    def clone(self) -> "KNNState":
        """A copy with tensors of its own, unaffected by later writes to this state's ring."""
        src = self.live()
        return KNNState(keys=tuple(k.clone() for k in src.keys), values=tuple(v.clone() for v in src.values),
                        written=src.written.clone())

    def reset(self, drop):
        src = self.live()                                            # new tensors: the ring is left alone
        keep = ~drop.bool().to(src.written.device)
        return KNNState(keys=tuple(torch.where(_keep(drop, k), k, 0) for k in src.keys),
                        values=tuple(torch.where(_keep(drop, v), v, 0) for v in src.values),
                        written=src.written * keep)

    def detach(self):
        return KNNState(keys=tuple(k.detach() for k in self.keys), values=tuple(v.detach() for v in self.values),
                        written=self.written, ring=self.ring, version=self.version)

    def to_tensors(self):
        src = self.live()
        out = {"written": src.written}
        own = src.ring is not None                                   # a ring is written in place later: copy it
        for i, (k, v) in enumerate(zip(src.keys, src.values)):
            out[f"keys.{i}"], out[f"values.{i}"] = (k.clone(), v.clone()) if own else (k.contiguous(), v.contiguous())
        return out

    @classmethod
    def from_tensors(cls, d):
        n = sum(1 for k in d if k.startswith("keys."))
        return cls(keys=tuple(d[f"keys.{i}"] for i in range(n)), values=tuple(d[f"values.{i}"] for i in range(n)),
                   written=d["written"].long())


@dataclass(frozen=True)
class TokensState:
    """Recurrent memory tokens (Bulatov et al. 2022, ``memory/tokens.py``).

    mem: (B, R, D) the R memory vectors each lane carries into its next segment, not detached
    (the trainer detaches beyond its bptt window). fresh: (B,) bool, lanes that start from the
    learned initial memory (a new state or a reset); their ``mem`` rows are zero and unused.
    """
    mem: torch.Tensor
    fresh: torch.Tensor

    def reset(self, drop):
        drop = drop.bool().to(self.fresh.device)
        return TokensState(mem=torch.where(drop.view(-1, 1, 1), 0, self.mem), fresh=self.fresh | drop)

    def detach(self):
        return TokensState(mem=self.mem.detach(), fresh=self.fresh)

    def to_tensors(self):
        return {"mem": self.mem.detach().contiguous(), "fresh": self.fresh}

    @classmethod
    def from_tensors(cls, d):
        return cls(mem=d["mem"], fresh=d["fresh"].bool())


@dataclass(frozen=True)
class LSTMState:
    """Hidden and cell state of a stacked LSTM (the LSTM baseline, ``classic/lstm.py``).

    h, c: (B, L, D), lane first like every part (nn.LSTM wants (L, B, D): see LSTMLM).
    """
    h: torch.Tensor
    c: torch.Tensor

    def reset(self, drop):
        return LSTMState(h=torch.where(_keep(drop, self.h), self.h, 0), c=torch.where(_keep(drop, self.c), self.c, 0))

    def detach(self):
        return LSTMState(h=self.h.detach(), c=self.c.detach())

    def to_tensors(self):
        return {"h": self.h.contiguous(), "c": self.c.contiguous()}

    @classmethod
    def from_tensors(cls, d):
        return cls(h=d["h"], c=d["c"])

    @classmethod
    def stack(cls, parts: list["LSTMState"]) -> "LSTMState":
        return cls(h=torch.cat([p.h for p in parts]), c=torch.cat([p.c for p in parts]))

    def lane(self, i: int) -> "LSTMState":
        return LSTMState(h=self.h[i:i + 1].clone(), c=self.c[i:i + 1].clone())


for _name, _cls in (("xl", XLState), ("kv", KVState), ("knn", KNNState), ("tokens", TokensState),
                    ("lstm", LSTMState)):
    register_part(_name, _cls)


class State:
    """Memory of all lanes: a mapping of part names to parts (``state.xl``, ``state.knn`` ... read a part;
    ``None`` when the model keeps no such part), plus the tokens of an unfinished segment (``pending``,
    (B, P) long, only for models whose memories write whole segments)."""
    __slots__ = ("batch_size", "_parts", "pending")

    def __init__(self, batch_size: int, parts: Mapping[str, object] | None = None, *,
                 pending: torch.Tensor | None = None, **named):
        object.__setattr__(self, "batch_size", int(batch_size))
        merged = {**(parts or {}), **{k: v for k, v in named.items() if v is not None}}
        object.__setattr__(self, "_parts", merged)
        object.__setattr__(self, "pending", pending)

    def __setattr__(self, name, value):
        raise AttributeError("State is immutable; use State.with_parts(...)")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._parts.get(name)

    def __repr__(self) -> str:
        return f"State(batch_size={self.batch_size}, parts={self.parts()})"

    def part(self, name: str):
        """The part ``name``, or None."""
        return self._parts.get(name)

    def parts(self) -> list[str]:
        return list(self._parts)

    def with_parts(self, *, pending: torch.Tensor | None | EllipsisType = ..., **parts: Any) -> "State":
        """A copy with the named parts replaced (or added), and ``pending`` if given."""
        return State(self.batch_size, {**self._parts, **parts},
                     pending=self.pending if isinstance(pending, EllipsisType) else pending)

    def reset(self, mask: torch.Tensor) -> "State":
        """Clear the lanes where ``mask`` (B,) is true."""
        if mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            return self
        pending = self.pending
        if pending is not None and pending.shape[1]:
            if not bool(mask.all()):
                raise ValueError(f"cannot reset some lanes inside an unfinished segment of memory tokens "
                                 f"({pending.shape[1]} tokens pending); reset at segment boundaries or all lanes")
            pending = pending[:, :0]
        return State(self.batch_size, {name: part.reset(mask) for name, part in self._parts.items()},
                     pending=pending)

    @classmethod
    def stack(cls, states: list["State"]) -> "State | None":
        """One state whose lanes are the lanes of ``states`` in order (continuous batching: lanes of different
        streams decoded together), or None when they cannot be stacked: different parts, a part class without
        ``stack`` (kNN rings, memory tokens: fed one at a time), an unfinished segment pending, or layouts that
        differ. :meth:`unstack` gives them back. One state is given back as it is (a lone lane writes behind its
        own cache in place, as the stream alone does); several are copied into tensors of their own."""
        if len(states) == 1:
            return states[0]
        names = states[0].parts()
        if any(s.parts() != names or (s.pending is not None and s.pending.shape[1]) for s in states):
            return None
        parts = {}
        for name in names:
            group = [s.part(name) for s in states]
            stack = getattr(type(group[0]), "stack", None)
            if stack is None or any(type(p) is not type(group[0]) for p in group):
                return None
            parts[name] = stack(group)
            if parts[name] is None:
                return None
        pending = None if states[0].pending is None else torch.cat([s.pending for s in states])
        return State(sum(s.batch_size for s in states), parts, pending=pending)

    def unstack(self) -> list["State"]:
        """One state per lane (the inverse of :meth:`stack`; caches cut to each lane's own history)."""
        if self.batch_size == 1:
            return [self]
        return [State(1, {name: part.lane(i) for name, part in self._parts.items()},
                      pending=None if self.pending is None else self.pending[i:i + 1].clone())
                for i in range(self.batch_size)]

    def clone(self) -> "State":
        """A copy whose parts written in place (kNN rings) have tensors of their own: the state to come back to
        after feeding this one on (a part without ``clone`` is never written in place and is shared)."""
        return State(self.batch_size, {name: part.clone() if hasattr(part, "clone") else part
                                       for name, part in self._parts.items()}, pending=self.pending)

    def detach(self) -> "State":
        return State(self.batch_size, {name: part.detach() for name, part in self._parts.items()},
                     pending=self.pending)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"batch_size": torch.tensor(self.batch_size)}
        if self.pending is not None:
            out["pending"] = self.pending.contiguous()
        for name, part in self._parts.items():
            out.update({f"{name}.{k}": v for k, v in part.to_tensors().items()})
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "State":
        if "batch_size" not in d:
            raise ValueError("not a longmem memory state: 'batch_size' is missing")
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        pending = d.get("pending", d.get("tokens.pending"))          # files of longmem <= 0.1 kept it in tokens
        for key, value in d.items():
            name, dot, rest = key.partition(".")
            if not dot or key == "tokens.pending":
                continue
            if name not in PARTS:
                raise ValueError(f"unknown memory part {name!r} in a state (known: {', '.join(PARTS)})")
            grouped.setdefault(name, {})[rest] = value
        try:
            parts = {name: PARTS[name].from_tensors(grouped[name]) for name in PARTS if name in grouped}
        except KeyError as e:
            raise ValueError(f"a memory state lacks the tensor {e}") from None
        return cls(int(d["batch_size"]), parts, pending=pending.long() if pending is not None else None)
