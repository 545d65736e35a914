"""A cache of keys and values: the last ``window`` positions of each lane per layer, and with
attention sinks its first ``n_sinks`` positions for good (StreamingLLM, Xiao et al. 2023).

Legend: B lanes, G key/value heads, M cached positions, T segment tokens, Dh head size.

Positions are assigned inside the cache (the StreamingLLM recipe): a query sees cached slot j at
distance M + t - j, however long the stream runs. The keys are stored with their rotary positions
(``KVState.seen``): a lane's p-th position since its reset is rotated by p once, when it is read, and
the segment's queries by their own p, so the distance to a key of the window is the distance in the
stream, which equals the slot distance; only the sinks (at 0 .. n_sinks - 1) are rotated again, by the
positions evicted since, to sit right before the window. The same attention as re-rotating the whole
cache at its slots for every token (tested), for n_sinks + T rotations instead of M + T. Angles are
computed in float64 (``Rotary.at``), so positions in the millions stay accurate. Models with smeared
keys or memory tokens store keys before rotary positions and rotate the cache at its slots (the
original recipe); so do caches written by longmem 0.2, converted on first use. Without sinks this is exactly
Transformer-XL's memory at evaluation time (the same keys and values, computed once instead of
re-projected every segment), which is how decoders use it (:meth:`XLMemory.for_decoding`). It adds
no weights: ``kind: sinks`` puts it on any trained or imported model with no training.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from longmem.models.attention import Rotary
from longmem.models.memory.base import Memory, Segment, keep_last, kept_slots, take_slots
from longmem.models.memory.state import KVState


class KVMemory(Memory):
    name = "kv"

    def __init__(self, *, window: int, n_layers: int, n_sinks: int = 0):
        super().__init__()
        if not 0 <= n_sinks < max(window, 1):
            raise ValueError(f"attention sinks must be in [0, {max(window - 1, 0)}] (the cache holds {window} "
                             f"past positions), got {n_sinks}")
        self.window, self.n_layers, self.n_sinks = window, n_layers, n_sinks

    @property
    def stateful(self) -> bool:
        return self.window > 0

    def set_mem_len(self, mem_len: int) -> bool:
        if not 0 <= self.n_sinks < max(mem_len, 1):
            raise ValueError(f"a memory of {mem_len} positions cannot keep {self.n_sinks} attention sinks")
        self.window = mem_len
        return True

    def init(self, batch_size: int, *, device, dtype) -> KVState:
        return KVState(keys=(), values=(), valid=torch.zeros(batch_size, dtype=torch.long, device=device))

    def trim(self, state: KVState) -> KVState:
        """Keep at most ``window`` slots (and the sinks) of a longer cache."""
        if state.length <= self.window:
            return state
        if self.window == 0:
            return KVState(keys=(), values=(), valid=torch.zeros_like(state.valid), seen=state.seen)
        kept_k = [keep_last(k, state.valid, capacity=self.window, n_sinks=self.n_sinks, dim=2) for k in state.keys]
        kept_v = [keep_last(v, state.valid, capacity=self.window, n_sinks=self.n_sinks, dim=2)[0]
                  for v in state.values]
        return KVState(keys=tuple(k for k, _ in kept_k), values=tuple(kept_v), valid=kept_k[0][1], seen=state.seen)

    @staticmethod
    def rotate_cache(part: KVState, rope) -> KVState:
        """A cache of keys before rotary positions (``seen`` None) as one with their rotation: slot j of a lane
        holding ``valid`` positions is its position j - (M - valid), as the attention placed it."""
        seen = part.valid.clone()
        if not part.length:
            return replace(part, seen=seen)
        M = part.length
        pos = (torch.arange(M, device=part.valid.device).unsqueeze(0) - (M - part.valid).unsqueeze(1)).clamp(min=0)
        keys = []
        for k in part.keys:
            cos, sin = rope.at(pos.to(k.device), dtype=k.dtype)
            keys.append(Rotary.rotate(k, cos, sin))
        return replace(part, keys=tuple(keys), seen=seen, room=None)

    def begin(self, seg: Segment, part: KVState) -> KVState:
        part = self.trim(part)
        if self.window == 0:
            return part
        if seg.plain_positions and seg.rope is not None:
            if part.seen is None:
                part = self.rotate_cache(part, seg.rope)
            seg.rotated_from, seg.rotated_sinks = part.seen, self.n_sinks
        elif part.seen is not None:
            raise ValueError("this key/value cache stores keys with their rotary positions, which a model with "
                             "smeared keys or memory tokens cannot read (it came from another model)")
        if part.length:
            seg.set_context(kv=list(zip(part.keys, part.values)), valid=part.valid)
        seg.scratch[self.name] = {}
        if part.length and seg.rotated_from is not None and not torch.is_grad_enabled():
            seg.join = self._join(seg, part)
        for i in range(self.n_layers):
            seg.hooks[i].append(self._recorder(seg, i))
        return part

    def _join(self, seg: Segment, part: KVState):
        """The function that puts a layer's new keys (rotated) and values (B, G, T, Dh) behind its cache: in the
        spare slots of the cache's buffers when this cache is the last one written there (a decoded token
        copies nothing), else into new buffers with spare slots (the cache copied once, as ``torch.cat``
        would). A segment that pushes a lane with sinks past the window gets buffers of its own, so ``end``
        can move the sinks up in place instead of gathering the cache again."""
        T, M = seg.n_tokens, part.length
        room, start = part.room, part.room_end - M
        over = bool(self.n_sinks) and bool((part.valid + T > self.window).any())
        if over or room is None or room.end != part.room_end or room.end + T > room.capacity:
            spare = 0 if over else min(self.window, max(256, 4 * T))
            room, start = Room(capacity=M + T + spare, n_layers=self.n_layers, owned=over), 0
        room.end = start + M + T                                     # claimed: an older cache here copies
        seg.scratch[self.name]["room"] = (room, start)
        return room.join

    def _recorder(self, seg: Segment, i: int):
        def record(*, q, k, v, y, raw_k, context, **_):
            if seg.start == 0 and seg.n_tokens == k.shape[2]:               # [cache; segment] as attended
                seg.scratch[self.name][i] = context
            else:                                                            # positions added around the tokens
                seg.scratch[self.name][i] = (seg.tokens_of(raw_k, dim=2), seg.tokens_of(v, dim=2))
            return y
        return record

    def end(self, seg: Segment, part: KVState, h: torch.Tensor):
        """The cache after the segment: the keys and values the attention already joined ([cache; segment]),
        cut to the window (and the sinks), so a decoded token copies the cache once, not twice."""
        if self.window == 0:
            return part, None
        keys, values = [], []
        T = seg.n_tokens
        grown = part.valid + T
        src, n = None, -1
        room, start = seg.scratch[self.name].get("room", (None, 0))
        for i in range(self.n_layers):
            k, v = seg.scratch[self.name][i]
            if k.shape[2] == T and part.length:                              # only the segment was recorded
                k, v = torch.cat([part.keys[i], k], dim=2), torch.cat([part.values[i], v], dim=2)
            if k.shape[2] != n:                                              # the slots kept: once, not per tensor
                n = k.shape[2]
                src = kept_slots(n, grown, capacity=self.window, n_sinks=self.n_sinks)
            if room is not None and room.owned and src is not None:          # sinks moved up in place: no gather
                keys.append(_sinks_up(k, src, n_sinks=self.n_sinks))
                values.append(_sinks_up(v, src, n_sinks=self.n_sinks))
            else:
                keys.append(take_slots(k.detach(), src, capacity=self.window, dim=2))
                values.append(take_slots(v.detach(), src, capacity=self.window, dim=2))
        valid = grown.clamp(max=min(n, self.window))
        seen = None if part.seen is None else part.seen + T
        return KVState(keys=tuple(keys), values=tuple(values), valid=valid, seen=seen, room=room,
                       room_end=start + n if room is not None else 0), None

    def inspect(self, seg: Segment, before: KVState, after: KVState, h: torch.Tensor) -> dict[str, Any]:
        return {"slots": before.valid}                                   # (B,) cached positions attended to

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        return 2 * batch_size * self.window * d_model * n_layers * bytes_per_value    # an upper bound (G <= H)


def _sinks_up(buf: torch.Tensor, src: torch.Tensor, *, n_sinks: int) -> torch.Tensor:
    """``take_slots(buf, src)`` of a buffer no other cache reads (``Room.owned``): the kept window is the tail
    of ``buf`` (B, G, n, Dh), so only the sinks are copied, to its first slots, instead of gathering it all."""
    keep = src.shape[1]
    sinks = take_slots(buf, src[:, :n_sinks], capacity=n_sinks, dim=2) if n_sinks else None
    kept = buf.narrow(2, buf.shape[2] - keep, keep)
    if sinks is not None:
        kept[:, :, :n_sinks] = sinks
    return kept


class Room:
    """Buffers (B, G, ``capacity``, Dh) per layer behind the caches of one stream, for decoding and evaluation
    (no gradients): a cache is a view of the slots [a, b) of each buffer, and ``end`` the slots taken. A
    segment appends in place only to a cache with b == end (no other cache was written after it), so a cache
    never sees its own slots change; one that was (the same state fed twice) copies into a new room.
    ``owned``: made for one segment whose cache only it reads (sinks may be moved in place)."""

    def __init__(self, *, capacity: int, n_layers: int, owned: bool = False):
        self.capacity, self.owned, self.end = capacity, owned, 0
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def join(self, i: int, cached: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cache; new] of layer i (B, G, M + T, Dh): the cache ``cached`` (M slots) and the new keys/values."""
        M, T = cached[0].shape[2], k.shape[2]
        a = self.end - M - T
        kb, vb = self.keys[i], self.values[i]
        if kb is None or vb is None or kb.dtype != k.dtype:              # a new room: copy the cache in once
            B, G, _, Dh = k.shape
            kb, vb = k.new_empty(B, G, self.capacity, Dh), v.new_empty(B, G, self.capacity, v.shape[-1])
            kb[:, :, a:a + M], vb[:, :, a:a + M] = cached
            self.keys[i], self.values[i] = kb, vb
        kb[:, :, a + M:a + M + T], vb[:, :, a + M:a + M + T] = k, v
        return kb[:, :, a:a + M + T], vb[:, :, a:a + M + T]
