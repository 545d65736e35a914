"""A cache of keys and values: the last ``window`` positions of each lane per layer, and with
attention sinks its first ``n_sinks`` positions for good (StreamingLLM, Xiao et al. 2023).

Legend: B lanes, G key/value heads, M cached positions, T segment tokens, Dh head size.

Keys are cached before rotary positions and rotated at their place in the window at every
segment, so positions stay inside ``n_sinks + window + T`` however long the stream runs (the
StreamingLLM recipe: "positions assigned inside the cache"). Without sinks this is exactly
Transformer-XL's memory at evaluation time (the same keys and values, computed once instead of
re-projected every segment), which is how decoders use it (:meth:`XLMemory.for_decoding`). It adds
no weights: ``kind: sinks`` puts it on any trained or imported model with no training.
"""
from __future__ import annotations

from typing import Any

import torch

from longmem.models.memory.base import Memory, Segment, keep_last
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
            return KVState(keys=(), values=(), valid=torch.zeros_like(state.valid))
        kept_k = [keep_last(k, state.valid, capacity=self.window, n_sinks=self.n_sinks, dim=2) for k in state.keys]
        kept_v = [keep_last(v, state.valid, capacity=self.window, n_sinks=self.n_sinks, dim=2)[0]
                  for v in state.values]
        return KVState(keys=tuple(k for k, _ in kept_k), values=tuple(kept_v), valid=kept_k[0][1])

    def begin(self, seg: Segment, part: KVState) -> KVState:
        part = self.trim(part)
        if self.window == 0:
            return part
        if part.length:
            seg.set_context(kv=list(zip(part.keys, part.values)), valid=part.valid)
        seg.scratch[self.name] = {}
        for i in range(self.n_layers):
            seg.hooks[i].append(self._recorder(seg, i))
        return part

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
        keys, values, valid = [], [], part.valid
        T = seg.n_tokens
        for i in range(self.n_layers):
            k, v = seg.scratch[self.name][i]
            if k.shape[2] == T and part.length:                              # only the segment was recorded
                k, v = torch.cat([part.keys[i], k], dim=2), torch.cat([part.values[i], v], dim=2)
            k, valid_k = keep_last(k.detach(), part.valid + T, capacity=self.window, n_sinks=self.n_sinks, dim=2)
            v, _ = keep_last(v.detach(), part.valid + T, capacity=self.window, n_sinks=self.n_sinks, dim=2)
            keys.append(k)
            values.append(v)
            valid = valid_k
        return KVState(keys=tuple(keys), values=tuple(values), valid=valid), None

    def inspect(self, seg: Segment, before: KVState, after: KVState, h: torch.Tensor) -> dict[str, Any]:
        return {"slots": before.valid}                                   # (B,) cached positions attended to

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        return 2 * batch_size * self.window * d_model * n_layers * bytes_per_value    # an upper bound (G <= H)
