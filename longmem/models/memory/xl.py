"""Transformer-XL segment recurrence (Dai et al. 2019, §3.2).

Per layer, the inputs of the last ``mem_len`` positions of each lane are kept
(detached: no gradient flows into the past) and attended to together with the
current segment, projected by the layer's current weights. Evaluation may use a
longer ``mem_len`` than training. With ``n_sinks`` the first positions of each lane
stay in memory for good (attention sinks, Xiao et al. 2023), the rest slides.

For decoding, :meth:`XLMemory.for_decoding` gives the key/value cache of the same
positions (``kv.py``): exact, since the memory is detached, and a new token then
costs one position's projections instead of the whole memory's.
"""
from __future__ import annotations

from typing import Any

import torch

from longmem.models.memory.base import Memory, Segment, keep_last, slide
from longmem.models.memory.state import XLState


class XLMemory(Memory):
    name = "xl"

    def __init__(self, *, mem_len: int, n_layers: int, n_sinks: int = 0):
        super().__init__()
        if not 0 <= n_sinks < max(mem_len, 1):
            raise ValueError(f"attention sinks must be in [0, {max(mem_len - 1, 0)}] (the memory holds "
                             f"{mem_len} past positions), got {n_sinks}")
        self.mem_len, self.n_layers, self.n_sinks = mem_len, n_layers, n_sinks
        # randomized memory lengths (train.mem_len_max): a segment reads only the last read_len of the slots kept
        self.read_len: int | None = None

    @property
    def stateful(self) -> bool:
        return self.mem_len > 0

    def set_mem_len(self, mem_len: int) -> bool:
        if not 0 <= self.n_sinks < max(mem_len, 1):
            raise ValueError(f"a memory of {mem_len} positions cannot keep {self.n_sinks} attention sinks")
        self.mem_len = mem_len
        return True

    def init(self, batch_size: int, *, device, dtype) -> XLState:
        # no slots yet: the first write creates (B, T, D) tensors in the activations' dtype
        return XLState(mems=(), valid=torch.zeros(batch_size, dtype=torch.long, device=device))

    def trim(self, state: XLState) -> XLState:
        """Keep at most mem_len slots (a state from a run with a longer memory)."""
        if state.length <= self.mem_len:
            return state
        if self.mem_len == 0:
            return XLState(mems=(), valid=torch.zeros_like(state.valid))
        kept = [keep_last(m, state.valid, capacity=self.mem_len, n_sinks=self.n_sinks, dim=1) for m in state.mems]
        return XLState(mems=tuple(m for m, _ in kept), valid=kept[0][1])

    def begin(self, seg: Segment, part: XLState) -> XLState:
        part = self.trim(part)
        if self.mem_len > 0:
            seg.keep_inputs = True
            if part.length:
                n = part.length if self.read_len is None else min(self.read_len, part.length)
                seg.set_context(hidden=[m[:, part.length - n:] for m in part.mems],     # right-aligned: the last n
                                valid=part.valid.clamp(max=n))
        return part

    def end(self, seg: Segment, part: XLState, h: torch.Tensor):
        return self.write(part, seg.inputs), None

    def write(self, state: XLState, layer_inputs: list[torch.Tensor]) -> XLState:
        """Append this segment's layer inputs (each (B, T, D)) and keep the last mem_len (and the sinks)."""
        if self.mem_len == 0:
            return state
        mems, valid = [], state.valid
        for i, h in enumerate(layer_inputs):
            m, v = slide(state.mems[i] if state.length else None, h.detach(), state.valid, capacity=self.mem_len,
                         n_sinks=self.n_sinks, dim=1)
            mems.append(m)
            valid = v
        return XLState(mems=tuple(mems), valid=valid)

    def inspect(self, seg: Segment, before: XLState, after: XLState, h: torch.Tensor) -> dict[str, Any]:
        return {"slots": before.valid}                                   # (B,) past positions attended to

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        return batch_size * self.mem_len * d_model * n_layers * bytes_per_value

    def for_decoding(self) -> Memory:
        from longmem.models.memory.kv import KVMemory
        return KVMemory(window=self.mem_len, n_sinks=self.n_sinks, n_layers=self.n_layers)
