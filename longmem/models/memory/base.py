"""The memory protocol and the registry of memory kinds.

Legend: B lanes, T tokens of a segment, L positions the blocks process (T plus what memories add),
M memory slots in front of them, D model width, G key/value heads, Dh head size.

A :class:`Memory` is an ``nn.Module`` with a name (its part of the :class:`State` and its attribute on
the model, so its weights keep their names). For every segment ``MemoryLM`` calls, for each of its
memories in order:

1. ``begin(seg, part) -> part``: shape the segment before the blocks: put tokens around it
   (memory tokens), past context in front of it (XL hidden states or cached keys/values), or hooks
   on some layers' attention (kNN retrieval, recording keys and values);
2. the blocks run, each layer's attention seeing ``seg.view(i)``;
3. ``end(seg, part, h) -> (part, aux_loss | None)``: write the new part from what the segment left
   (``seg.inputs``, the recorded keys and values, the final-norm outputs ``h``); ``aux_loss`` is an
   unweighted training loss term (a sum over lanes), which the trainer weighs (``train.aux_weight``).
4. only while the model is traced (``models/inspect.py``; ``seg.inspecting`` is then true from before
   ``begin``): ``inspect(seg, before, after, h) -> dict | None``, what the memory did in the segment
   (tensors with the lanes first), e.g. the entries a kNN memory retrieved or how much memory tokens changed.

A kind is a list of memories built from the model config: :func:`register_kind` maps its name to a
builder. ``kind: knn`` is XL + kNN, ``kind: tokens`` is XL + memory tokens. A new memory is one file
(its part, its module) plus one ``register_kind`` line; ``MemoryLM``, ``State``, the decoder and the
trainer know this protocol, never a kind by name.
"""
from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn

from longmem.config import MEMORY_KINDS
from longmem.models.attention import GroupedPositions, LayerView, RotatedCache, prefix_mask


class Memory(nn.Module):
    """Base class of the memories of a MemoryLM (see the module docstring)."""
    name: str = ""                   # the part's key in State and the model attribute holding this module
    whole_segments: bool = False     # writes once per full segment: the model keeps an unfinished one pending

    @property
    def stateful(self) -> bool:
        """Whether it carries anything from one call to the next (decoders then feed tokens with the state)."""
        return True

    @property
    def added_positions(self) -> int:
        """Positions it adds to every segment (memory tokens: read + write)."""
        return 0

    def init(self, batch_size: int, *, device, dtype):
        """The part of a fresh state."""
        raise NotImplementedError

    def begin(self, seg: "Segment", part):
        """Shape ``seg`` before the blocks; returns the part ``end`` will receive (e.g. trimmed)."""
        return part

    def end(self, seg: "Segment", part, h: torch.Tensor):
        """(new part, unweighted auxiliary training loss or None); ``h``: (B, L, D) final-norm outputs."""
        return part, None

    def inspect(self, seg: "Segment", before: Any, after: Any, h: torch.Tensor) -> dict[str, Any] | None:
        """What this memory did during ``seg`` (``before`` / ``after``: its part; ``h`` as in ``end``), for
        inspection; called only while the model is traced. None: nothing to show beyond the attention."""
        return None

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        """About how many bytes the part takes for ``batch_size`` lanes (a check before allocating)."""
        return 0

    def set_mem_len(self, mem_len: int) -> bool:
        """Keep ``mem_len`` past positions from now on (evaluation may use more than training); False if this
        memory keeps no past positions."""
        return False

    def no_weight_decay(self) -> list[nn.Parameter]:
        """Parameters the optimizer must not decay (e.g. a learned initial memory)."""
        return []

    def for_decoding(self) -> "Memory":
        """An equivalent memory for token-by-token decoding (e.g. XL hidden states -> a key/value cache)."""
        return self


class Segment:
    """One segment's pass through the blocks, as its memories shape it.

    x: (B, L, D) the block inputs; the segment's T tokens are ``x[:, start:start + T]``.
    Past context in front (one memory provides it): ``hidden`` (per layer (B, M, D), projected by the
    layer: Transformer-XL) or ``kv`` (per layer (keys, values), each (B, G, M, Dh): a cache), with
    ``valid`` (B,) the right-aligned slots that hold real history. ``hooks[i]``: callables run on layer
    i's attention (see ``attention.AttentionHook``). ``inputs[i]``: layer i's input of the T tokens,
    kept when a memory sets ``keep_inputs``.
    """

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.start, self.n_tokens = 0, x.shape[1]
        self.memory_len = 0
        self.valid: torch.Tensor | None = None
        self.hidden: list[torch.Tensor] | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.hooks: dict[int, list] = defaultdict(list)
        self.keep_inputs = False
        self.inputs: list[torch.Tensor] = []
        self.scratch: dict[str, Any] = {}               # per memory name: what its hooks recorded
        self.inspecting = False                         # traced: memories record what ``inspect`` reports
        self._mask: torch.Tensor | None = None
        self._mask_known = False
        # set by a memory that narrows what positions see (``memory/local_global.py``: a banded window plus global
        # positions): (B, 1, L, M + L) bool, ANDed into the mask built here (valid slots, causal positions)
        self.extra_mask: torch.Tensor | None = None
        # set by the model: its rotary positions, and whether a cache may store keys with their rotation (no
        # smeared keys, no positions added around the tokens); set by a cache that does: the positions each lane
        # has read before this segment, (B,), and its attention sinks
        self.rope: Any = None
        self.plain_positions = False
        self.rotated_from: torch.Tensor | None = None
        self.rotated_sinks = 0
        self._rotated: Any = None
        # set by a cache that stores keys with their rotation, without gradients: join(i, (keys, values), k, v)
        # -> [cache; segment] of layer i, written behind the cache instead of concatenated (``memory/kv.py``)
        self.join: Callable | None = None

    def close(self) -> None:
        """Drop what the memories hung on the segment once it has run: hooks and context readers are closures
        over the segment and the memory state, a reference cycle that would keep the state (a retrieval store:
        gigabytes) alive after the caller dropped it, until Python's cyclic collector happens to run."""
        self.hooks.clear()
        self.scratch.clear()
        self.inputs = []
        self.hidden = self.kv = self.join = self.valid = None
        self._mask = self.extra_mask = self._rotated = None
        self._mask_known = False

    def surround(self, front: torch.Tensor, back: torch.Tensor) -> None:
        """Put (B, R, D) vectors before and after the positions so far (memory tokens)."""
        self.x = torch.cat([front, self.x, back], dim=1)
        self.start += front.shape[1]
        self._mask_known = False

    def set_context(self, *, valid: torch.Tensor | None, hidden=None, kv=None, length: int | None = None) -> None:
        """Past context in front of the segment, per layer: hidden states (B, M, D), (keys, values) (B, G, M, Dh)
        with ``valid`` (B,) right-aligned slots of history, or functions of the queries (see ``LayerView.kv``)
        that return M = ``length`` slots."""
        if self.hidden is not None or self.kv is not None:
            raise ValueError("two memories of this model put past context in front of the segment; "
                             "a kind may have one (xl or a key/value cache)")
        self.hidden, self.kv, self.valid = hidden, kv, valid
        self._mask_known = False
        if length is None:
            length = (hidden[0].shape[1] if hidden is not None else kv[0][0].shape[2]) if (hidden or kv) else 0
        self.memory_len = length

    def mask(self) -> torch.Tensor | None:
        """(B, 1, L, M + L) bool: valid memory slots plus causal attention over the positions, ANDed with
        ``extra_mask`` when a memory set one; None when there is no memory and no ``extra_mask`` (plain causal) or
        a memory chooses its keys from the queries (the layer builds it)."""
        if self._mask_known:                                         # once per segment, not once per layer
            return self._mask
        self._mask_known = True
        if self.extra_mask is not None:
            return self._narrowed()
        if self.memory_len == 0 or self.valid is None:
            return None
        if self.x.shape[1] == 1 and bool((self.valid >= self.memory_len).all()):
            return None                                              # one new token, every slot real: no mask
        self._mask = prefix_mask(self.valid.to(self.x.device), self.memory_len, self.x.shape[1])
        return self._mask

    def _narrowed(self) -> torch.Tensor:
        extra = self.extra_mask
        assert extra is not None
        B, L, M = self.x.shape[0], self.x.shape[1], self.memory_len
        if self.kv is not None and callable(self.kv[0]):
            raise ValueError("a memory that narrows the mask (extra_mask) cannot be combined with one that chooses "
                             "its keys from the queries")
        if tuple(extra.shape) != (B, 1, L, M + L):
            raise ValueError(f"extra_mask must be (B, 1, L, M + L) = {(B, 1, L, M + L)}, got {tuple(extra.shape)}")
        valid = self.valid if self.valid is not None else torch.full((B,), M, dtype=torch.long)
        self._mask = prefix_mask(valid.to(self.x.device), M, L) & extra.to(self.x.device)
        return self._mask

    def rotated(self) -> RotatedCache | None:
        """The rotation of a cache that stores keys with their rotary positions (see ``RotatedCache``)."""
        if self.rotated_from is None:
            return None
        if self._rotated is None:
            seen, s = self.rotated_from.to(self.x.device), self.rotated_sinks
            pos = seen.unsqueeze(1) + torch.arange(self.x.shape[1], device=seen.device)          # (B, L)
            cos, sin = self.rope.at(pos, dtype=self.x.dtype)
            sink_cos = sink_sin = None
            if s and self.memory_len and self.valid is not None and bool((seen > self.valid).any()):
                shift = torch.where(seen > self.valid.to(seen.device), seen - self.memory_len, 0)   # (B,)
                sink_cos, sink_sin = self.rope.at(shift.unsqueeze(1), dtype=self.x.dtype)
            self._rotated = RotatedCache(cos=cos, sin=sin, n_sinks=s, sink_cos=sink_cos, sink_sin=sink_sin)
        return self._rotated

    def view(self, i: int, cos: torch.Tensor, sin: torch.Tensor, *,
             grouped: GroupedPositions | None = None) -> LayerView:
        kv = self.kv[i] if self.kv is not None and self.memory_len else None
        return LayerView(mask=self.mask(), cos=cos, sin=sin, grouped=grouped,
                         hidden=self.hidden[i] if self.hidden is not None and self.memory_len else None,
                         kv=kv, hooks=self.hooks.get(i, []), rotated=self.rotated(),
                         join=partial(self.join, i, kv) if self.join is not None and kv is not None else None)

    def tokens_of(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The segment tokens' slice of a tensor over the L positions (along ``dim``)."""
        return t.narrow(dim, self.start, self.n_tokens)


def slide(old: torch.Tensor | None, new: torch.Tensor, valid: torch.Tensor, *, capacity: int, n_sinks: int = 0,
          dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``new`` (T slots along ``dim``) to a right-aligned buffer ``old`` whose last ``valid[b]``
    slots hold lane b's history, and keep at most ``capacity`` slots (:func:`keep_last`). Returns the
    buffer (oldest first) and the new ``valid`` (B,)."""
    buf = new if old is None or old.shape[dim] == 0 else torch.cat([old, new], dim=dim)
    return keep_last(buf, valid + new.shape[dim], capacity=capacity, n_sinks=n_sinks, dim=dim)


def keep_last(buf: torch.Tensor, valid: torch.Tensor, *, capacity: int, n_sinks: int = 0,
              dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``capacity`` slots of a right-aligned buffer whose last ``valid[b]`` slots hold lane b's
    history: the most recent, and with ``n_sinks`` each lane's first ``n_sinks`` positions for good
    (attention sinks, Xiao et al. 2023). Returns the buffer and ``valid`` (B,) clamped to it."""
    src = kept_slots(buf.shape[dim], valid, capacity=capacity, n_sinks=n_sinks)
    return take_slots(buf, src, capacity=capacity, dim=dim), valid.clamp(max=min(buf.shape[dim], capacity))


def kept_slots(n: int, valid: torch.Tensor, *, capacity: int, n_sinks: int = 0) -> torch.Tensor | None:
    """Which of ``n`` right-aligned slots :func:`keep_last` keeps: None for the last ``min(n, capacity)``
    (a view, no copy), else (B, keep) source slots per lane; computed once for the many tensors of a state."""
    keep = min(n, capacity)
    if n_sinks == 0 or not bool((valid > capacity).any()):
        return None
    # slot j of the result comes from slot n - keep + j (right-aligned), except that a lane past capacity
    # takes its first n_sinks slots from where its history starts, n - valid (its sinks)
    j = torch.arange(keep, device=valid.device)
    src = (n - keep + j).expand(len(valid), keep).clone()                # (B, keep)
    sinks = (n - valid).unsqueeze(1) + j[:n_sinks]                       # (B, n_sinks)
    over = (valid > capacity).unsqueeze(1)
    src[:, :n_sinks] = torch.where(over, sinks, src[:, :n_sinks])
    return src


def take_slots(buf: torch.Tensor, src: torch.Tensor | None, *, capacity: int, dim: int = 1) -> torch.Tensor:
    """The slots :func:`kept_slots` chose of ``buf`` (lanes first, slots along ``dim``)."""
    n = buf.shape[dim]
    keep = min(n, capacity)
    if src is None:
        return buf.narrow(dim, n - keep, keep)
    src = src.to(buf.device)
    shape = [1] * buf.dim()
    shape[0], shape[dim] = src.shape[0], keep
    index = src.view(shape).expand(*[shape[d] if d in (0, dim) else buf.shape[d] for d in range(buf.dim())])
    return buf.gather(dim, index)


# -- the registry of kinds -------------------------------------------------------
TRAINING_FREE: set[str] = set()


def register_kind(name: str, build: Callable, *, training_free: bool = False) -> None:
    """Make ``memory.kind: name`` build ``build(model_config) -> list[Memory]`` (in the order they run).
    ``training_free``: the kind adds no weights and works on any trained or imported model as it is."""
    if not name or not isinstance(name, str) or "." in name:
        raise ValueError(f"a memory kind needs a name without dots, got {name!r}")
    MEMORY_KINDS[name] = build
    if training_free:
        TRAINING_FREE.add(name)


def build_memories(config) -> list[Memory]:
    """The memories of ``memory.kind`` for a ModelConfig; a ValueError names the registered kinds."""
    kind = config.memory.kind
    if kind not in MEMORY_KINDS:
        raise ValueError(f"memory.kind={kind!r} is not a registered memory kind; available: "
                         f"{', '.join(MEMORY_KINDS)}")
    memories = list(MEMORY_KINDS[kind](config))
    names = [m.name for m in memories]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"memory.kind={kind!r} builds memories with missing or repeated names {names}")
    return memories
