"""Sparse local + global attention (Longformer, Beltagy et al. 2020 §3.1) as a memory, for causal language models.

Legend: B lanes, T segment tokens, M cached positions, L positions the blocks process (here T).

Longformer replaces full attention by a sliding window of ``w`` tokens around each token plus "global attention"
on a few chosen positions, which attend to everything and are attended to by everything. The causal variant
here keeps the past half of the window and makes the chosen positions the first ``n_global`` positions of each
lane's stream (a causal model cannot let an early token attend to later ones, so "global" means: seen by every
later token): a token at stream position p attends to positions p - window .. p and to positions
0 .. n_global - 1. Unlike attention sinks (``kind sinks``), the global positions stay at their true distance:
with rotary keys stored with their positions (``memory/kv.py``) they are read as the stream placed them, so
feeding a stream in pieces of any size equals one pass with the banded mask (tested). Models with smeared keys
read their cache at its slots, as ``KVMemory`` does; the globals then sit right before the window.

Across segments the memory is a key/value cache (:class:`KVMemory` with ``n_sinks = n_global``): the global
positions for good and the last ``window`` positions, so a stream of any length runs in ``window + n_global``
slots per layer. Inside a segment the banded mask goes to the attention through ``Segment.extra_mask``.
It adds no weights (training-free: it runs on any model), but a model trained with full attention over longer
contexts meets a narrower one; like Longformer, it is best trained with the window it will read with.
"""
from __future__ import annotations

import torch

from longmem.models.memory.base import Segment
from longmem.models.memory.kv import KVMemory
from longmem.models.memory.state import KVState, register_part


class LocalGlobalMemory(KVMemory):
    name = "local_global"

    def __init__(self, *, window: int, n_global: int, n_layers: int):
        if window < 1 or n_global < 0:
            raise ValueError(f"local + global attention needs window >= 1 and n_global >= 0, got window={window}, "
                             f"n_global={n_global}")
        super().__init__(window=window + n_global, n_layers=n_layers, n_sinks=n_global)
        self.local, self.n_global = window, n_global

    @property
    def stateful(self) -> bool:
        return True

    def set_mem_len(self, mem_len: int) -> bool:
        return False                        # its reach is memory.local_global.window, not memory.mem_len

    def begin(self, seg: Segment, part: KVState) -> KVState:
        part = super().begin(seg, part)
        if seg.rotated_from is not None:
            seg.rotated_sinks, seg._rotated = 0, None          # globals at their true positions: never turned
        M, L = seg.memory_len, seg.x.shape[1]
        if M + L - 1 > self.local:                             # some key is beyond some query's window
            seg.extra_mask = self.band(part.valid.to(seg.x.device), memory_len=M, length=L)
        return part

    def band(self, valid: torch.Tensor, *, memory_len: int, length: int) -> torch.Tensor:
        """(B, 1, L, M + L) bool: keys within ``window`` tokens before the query, or global positions (causality
        and the valid slots are the base mask's). Slot j of a lane holding ``valid`` positions is its position
        j - (M - valid) when it evicted nothing; once it did, its first n_global slots hold the globals and the
        rest its last positions, so in both cases slot j is global iff j - (M - valid) < n_global, and a
        non-global slot is M + t - j tokens before query t."""
        M, L, dev = memory_len, length, valid.device
        t = torch.arange(L, device=dev)
        j = torch.arange(M, device=dev)
        slot_global = (j.unsqueeze(0) - (M - valid).unsqueeze(1)) < self.n_global              # (B, M)
        slot_near = (M + t.unsqueeze(1) - j.unsqueeze(0)) <= self.local                        # (L, M)
        # the segment's key s is position valid + s of a lane that evicted nothing (one that did holds more
        # than n_global positions, so none of its segment is global)
        seg_global = (valid.unsqueeze(1) + t.unsqueeze(0)) < self.n_global                     # (B, L)
        seg_near = (t.unsqueeze(1) - t.unsqueeze(0)) <= self.local                             # (L, L) query, key
        mem = slot_global.unsqueeze(1) | slot_near.unsqueeze(0)                                # (B, L, M)
        own = seg_global.unsqueeze(1) | seg_near.unsqueeze(0)                                  # (B, L, L)
        return torch.cat([mem, own], dim=-1).unsqueeze(1)                                      # (B, 1, L, M+L)


register_part(LocalGlobalMemory.name, KVState)
