"""Looking inside the memory: where each token's attention goes, and what each memory did, segment by segment.

Legend: B lanes, H query heads, T tokens of a segment, L positions the blocks process (T plus what memories
add around it, e.g. memory tokens), M memory slots in front of them (XL memory, a key/value cache), S = M + L
keys, K distance bins.

``with trace(model) as tracer: model(tokens, state=state)`` records one :class:`SegmentTrace` per segment the
model processes (any memory kind, any number of calls). The tracer is one more attention hook
(``Segment.hooks``, the memory protocol's): SDPA does not return attention probabilities, so on the traced
layers the hook recomputes ``softmax(q k^T / sqrt(Dh))`` with the mask (``attention.attention_probs``) and
keeps only per-token summaries: the attention mass on the memory slots, on positions the memories added
(memory tokens) and on the segment's own tokens, and the mass by distance in the text in powers of two.
Each memory adds what it did (``Memory.inspect``: the entries a kNN memory retrieved, how much memory tokens
changed). Nothing of this runs outside ``trace``: an untraced model never computes the probabilities.

Distances count tokens back in the text: memory slot j of M is M - j tokens before the segment's first token,
which holds for XL memory and key/value caches without attention sinks (a sink slot is further back than
that; a retrieval memory's packed blocks too).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from longmem.models.memory.base import Segment

if TYPE_CHECKING:
    from longmem.models.transformer import MemoryLM

N_BINS = 32                          # bin 0: distance 0 (the token itself); bin b >= 1: [2^(b-1), 2^b)


def distance_bin(d: torch.Tensor) -> torch.Tensor:
    """The bin of each distance (>= 0): 0 for 0, b for 2^(b-1) <= d < 2^b."""
    d = d.clamp(min=0)
    return torch.where(d > 0, torch.floor(torch.log2(d.clamp(min=1).double())).long() + 1, 0).clamp(max=N_BINS - 1)


def bin_label(b: int) -> str:
    """'0', '1', '2-3', '4-7', ...: the distances of bin ``b``."""
    return str(b) if b < 2 else f"{2 ** (b - 1)}-{2 ** b - 1}"


@dataclass
class SegmentTrace:
    """One segment, lanes first. ``mass[i]`` (B, T, 3): layer i's attention of each token (mean over heads) on
    the memory slots, on positions the memories added (memory tokens read), and on the segment's tokens;
    ``by_distance[i]`` (B, T, N_BINS) the mass on memory slots and tokens by distance in the text;
    ``memories``: per memory name what its ``inspect`` returned."""
    n_tokens: int
    memory_len: int
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    by_distance: dict[int, torch.Tensor] = field(default_factory=dict)
    memories: dict[str, Any] = field(default_factory=dict)


class Tracer:
    """Records :class:`SegmentTrace` s of the traced ``layers`` (None: every layer) into ``segments``."""

    def __init__(self, layers: list[int] | None = None):
        self.layers = layers
        self.segments: list[SegmentTrace] = []

    def begin(self, seg: Segment, n_layers: int) -> None:
        """Called by the model before its memories shape ``seg``."""
        seg.inspecting = True
        rec = SegmentTrace(n_tokens=seg.n_tokens, memory_len=0)
        self.segments.append(rec)
        for i in (range(n_layers) if self.layers is None else self.layers):
            seg.hooks[i].append(self._hook(seg, i, rec))

    def end(self, memories: dict[str, Any]) -> None:
        """Called by the model after the segment with what each memory's ``inspect`` returned."""
        self.segments[-1].memories = {k: v for k, v in memories.items() if v is not None}

    @staticmethod
    def _hook(seg: Segment, i: int, rec: SegmentTrace) -> Callable[..., torch.Tensor]:
        @torch.no_grad()
        def observe(*, y: torch.Tensor, probs: Callable[[], torch.Tensor], **_: Any) -> torch.Tensor:
            p = probs().mean(dim=1)                                       # (B, L, S), heads averaged
            L, S = p.shape[1], p.shape[2]
            M, a, T = S - L, seg.start, seg.n_tokens
            rows = p[:, a:a + T]                                          # (B, T, S) the segment's tokens
            memory, added, own = rows[..., :M], rows[..., M:M + a], rows[..., M + a:M + a + T]
            rec.memory_len = M
            rec.mass[i] = torch.stack([memory.sum(-1), added.sum(-1), own.sum(-1)], dim=-1)     # (B, T, 3)
            keys = torch.cat([memory, own], dim=-1)                      # (B, T, M + T) text positions
            t = torch.arange(T, device=p.device).view(T, 1)
            j = torch.arange(M + T, device=p.device).view(1, M + T)
            bins = distance_bin(t + M - j).expand_as(keys)               # slot j: M - j before token 0
            rec.by_distance[i] = torch.zeros(*keys.shape[:2], N_BINS, device=p.device).scatter_add_(-1, bins, keys)
            return y
        return observe


@contextlib.contextmanager
def trace(*models: MemoryLM, layers: list[int] | None = None) -> Iterator[Tracer]:
    """Record what ``models`` (a MemoryLM and the views a decoder runs, sharing one tracer) do inside the block."""
    tracer = Tracer(layers)
    for m in models:
        m.tracer = tracer
    try:
        yield tracer
    finally:
        for m in models:
            m.__dict__.pop("tracer", None)
