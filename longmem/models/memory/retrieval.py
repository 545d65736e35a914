"""Retrieval of evicted keys and values, with no training: InfLLM (Xiao et al. 2024) for any model.

Legend: B lanes, G key/value heads, H query heads, T segment tokens, Dh head size, s sinks,
W window (``memory.mem_len``), b block size, k blocks retrieved, C store capacity (tokens).

Every layer attends, in one softmax, to ``[sinks; k retrieved blocks; local window; segment]``:
- the first ``s`` positions of a lane, kept for good (attention sinks, StreamingLLM);
- the last W to W + b - 1 positions (the window evicts whole blocks of b tokens);
- the k blocks of the store that match the segment best: evicted keys/values, kept per lane and
  layer in a FIFO ring of C tokens. A block's score is its best token's match with the segment's
  queries (mean queries of chunks of ``query_chunk`` tokens, pooled over the heads of each key
  group; InfLLM scores blocks by a few representative tokens, this takes the best of all of them),
  search exact over the whole store;
- the selected blocks join in their order in the stream, and the whole context is packed: positions
  are assigned inside it, so no position exceeds s + k b + W + b - 1 + T however long the stream,
  within a pretrained model's range. With every block retrieved this is exactly full attention (the
  packed context *is* the stream): tested.
InfLLM gives every retrieved token one fixed distance from the queries instead; packing keeps each
block's own relative positions and makes the all-blocks case exact.

Block search (``memory.retrieval.backend``): ``torch`` scores every stored key; ``faiss`` keeps a
persistent index per (layer, lane) over the stored keys (the key heads side by side, G Dh wide, so one
inner product is the sum over heads), updated as blocks enter and leave the ring and never rebuilt per
call (:class:`StoreIndexes`); each query chunk fetches its k b best tokens, which hold every block of the
exact top k (a block ranked j-th has at most (j - 1) b tokens of better blocks before it), so a flat index
picks blocks of the torch backend's scores (blocks that tie may be broken differently, and a bfloat16 store
is scored in bfloat16 by torch, in float32 by faiss); HNSW and IVF approximate. A reset builds the reset lanes'
indexes again (empty); the other lanes' move over unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from longmem.models.memory.base import Memory, Segment
from longmem.models.memory.state import _keep, register_part


@dataclass(frozen=True)
class RetrievalState:
    """Per layer: sinks (B, G, s, Dh) with ``n_sink`` (B,) filled; the window (B, G, W + b - 1, Dh),
    right-aligned with ``valid`` (B,); the store (B, G, C, Dh), a ring whose entry e sits in slot e % C,
    ``written`` (B,) entries (a multiple of b) since the lane's reset. ``index``: the store's faiss
    indexes (backend faiss; never saved, rebuilt from the store when missing or stale).

    The store is written in place (a copy would move gigabytes per segment at 128K tokens), as caches of
    Hugging Face transformers are: the state a call returns replaces the one passed to it, which must
    not be used again (``State.reset`` and the round trip through tensors make copies)."""
    sink_k: tuple[torch.Tensor, ...]
    sink_v: tuple[torch.Tensor, ...]
    n_sink: torch.Tensor
    win_k: tuple[torch.Tensor, ...]
    win_v: tuple[torch.Tensor, ...]
    valid: torch.Tensor
    store_k: tuple[torch.Tensor, ...]
    store_v: tuple[torch.Tensor, ...]
    written: torch.Tensor
    index: Any = field(default=None, compare=False, repr=False)

    _TENSORS = ("sink_k", "sink_v", "win_k", "win_v", "store_k", "store_v")
    _COUNTS = ("n_sink", "valid", "written")

    def reset(self, drop):
        keep = ~drop.bool().to(self.valid.device)
        parts: dict[str, Any] = {name: tuple(torch.where(_keep(drop, t), t, 0) for t in getattr(self, name))
                                 for name in self._TENSORS}
        # the faiss indexes go along: the memory builds the reset lanes' again (``StoreIndexes.reset_of``)
        return RetrievalState(**parts, **{c: getattr(self, c) * keep for c in self._COUNTS}, index=self.index)

    def detach(self):
        parts: dict[str, Any] = {n: tuple(t.detach() for t in getattr(self, n)) for n in self._TENSORS}
        return RetrievalState(**parts, **{c: getattr(self, c) for c in self._COUNTS}, index=self.index)

    def to_tensors(self):
        out = {c: getattr(self, c) for c in self._COUNTS}
        for name in self._TENSORS:
            out.update({f"{name}.{i}": t.contiguous() for i, t in enumerate(getattr(self, name))})
        return out

    @classmethod
    def from_tensors(cls, d):
        n = sum(1 for k in d if k.startswith("sink_k."))
        parts: dict[str, Any] = {name: tuple(d[f"{name}.{i}"] for i in range(n)) for name in cls._TENSORS}
        return cls(**parts, **{c: d[c].long() for c in cls._COUNTS})

    @property
    def capacity(self) -> int:
        return self.store_k[0].shape[2]


register_part("retrieval", RetrievalState)


class StoreIndexes:
    """Persistent faiss indexes of a retrieval store (backend faiss): one :class:`~longmem.models.memory.knn.
    FifoIndex` per (layer, lane) over the stored keys with their G key heads side by side (G Dh wide), ids
    the entry numbers (entry e in slot e % C). Built once from the store, then :meth:`add` follows every
    write; ``written`` is the count per lane it reflects (a state whose count differs gets new indexes).

    ``reuse``: the indexes of the same store before some lanes were reset (their count is 0 now): the other
    lanes' indexes move over unchanged, only the reset lanes' are built (empty). The moved-from object is then
    stale (``written`` None), so a state still holding it builds its own again."""

    def __init__(self, state: RetrievalState, *, kind: str, reuse: "StoreIndexes | None" = None):
        C, self.kind = state.capacity, kind
        written: list[int] = state.written.tolist()
        kept = reuse.written if reuse is not None and reuse.written is not None else [None] * len(written)
        self.written: list[int] | None = written                              # None: stale (lanes moved on)
        self.indexes: list[list] = []
        for layer, keys in enumerate(state.store_k):
            store, lanes = None, []
            for lane in range(keys.shape[0]):
                if reuse is not None and kept[lane] == written[lane]:             # a lane that did not change
                    lanes.append(reuse.indexes[layer][lane])
                    continue
                if store is None:
                    store = self.rows(keys)                                       # (B, C, G Dh)
                lanes.append(self.build(store[lane], written[lane], capacity=C, kind=kind))
            self.indexes.append(lanes)
        if reuse is not None:
            reuse.written = None                                                  # its lanes live here now

    @staticmethod
    def build(store: np.ndarray, written: int, *, capacity: int, kind: str):
        """One lane's index over its store (C, G Dh) holding entries ``written - min(written, C)`` on."""
        from longmem.models.memory.knn import fifo_from_store
        return fifo_from_store(store, written, capacity=capacity, kind=kind)

    def reset_of(self, written: list[int]) -> bool:
        """Whether ``written`` is this index's count with some lanes reset to 0 (and nothing else changed)."""
        return (self.written is not None and len(written) == len(self.written)
                and all(n in (w, 0) for w, n in zip(self.written, written)))

    @staticmethod
    def rows(keys: torch.Tensor) -> np.ndarray:
        """(B, G, N, Dh) keys -> (B, N, G Dh) float32 rows."""
        B, G, N, Dh = keys.shape
        return keys.detach().float().permute(0, 2, 1, 3).reshape(B, N, G * Dh).cpu().numpy()

    def add(self, layer: int, keys: torch.Tensor, first: list[int], count: list[int], after: RetrievalState):
        """Entries ``first[lane]`` ... ``first[lane] + count[lane] - 1`` of each lane, whose keys are ``keys``'
        first ``count[lane]`` tokens (B, G, m, Dh), just written to make ``after``; the ones the ring overwrote
        leave. An IVF index is trained from the lane's store once it holds enough entries (read only then)."""
        x, C = self.rows(keys), after.capacity
        for lane, ix in enumerate(self.indexes[layer]):
            n = count[lane]
            if not n:
                continue
            end = first[lane] + n
            ready = not ix.trained and end - ix.low >= min(C, 39 * ix.nlist)      # FifoIndex's threshold
            store = self.rows(after.store_k[layer][lane:lane + 1])[0] if ready else None
            ix.add(np.ascontiguousarray(x[lane, :n]), first[lane], store=store)
            ix.evict(end - C)

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, G, Q, Dh) -> scores and ring slots (B, Q, k); missing: -inf and slot 0."""
        q = self.rows(queries)
        B, Q = q.shape[0], q.shape[1]
        scores = np.full((B, Q, k), -np.inf, dtype=np.float32)
        slots = np.zeros((B, Q, k), dtype=np.int64)
        for lane, ix in enumerate(self.indexes[layer]):
            s, i = ix.search(np.ascontiguousarray(q[lane]), k)
            scores[lane], slots[lane] = s, np.where(i < 0, 0, i % ix.capacity)
        return torch.from_numpy(scores), torch.from_numpy(slots)


class RetrievalMemory(Memory):
    name = "retrieval"

    def __init__(self, *, window: int, n_layers: int, n_kv_heads: int, head_dim: int, n_sinks: int = 4,
                 block_size: int = 64, top_k: int = 8, capacity: int = 32768, query_chunk: int = 64,
                 store_dtype: torch.dtype | None = None, backend: str = "torch", index: str = "flat"):
        super().__init__()
        if window < 1 or block_size < 1 or top_k < 1 or query_chunk < 1:
            raise ValueError("memory.mem_len (the window), memory.retrieval.block_size, top_k and query_chunk must "
                             "be positive for kind retrieval")
        if capacity < block_size or capacity % block_size:
            raise ValueError(f"memory.retrieval.capacity={capacity} must be a positive multiple of "
                             f"memory.retrieval.block_size={block_size}")
        self.window, self.n_sinks, self.block, self.top_k = window, n_sinks, block_size, top_k
        if backend not in ("torch", "faiss"):
            raise ValueError(f"memory.retrieval.backend={backend!r}; accepted: torch, faiss")
        if index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"memory.retrieval.index={index!r}; accepted: flat, hnsw, ivf")
        self.capacity, self.query_chunk, self.store_dtype = capacity, query_chunk, store_dtype
        self.backend, self.index = backend, index
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim

    @property
    def span(self) -> int:
        """Slots of the window buffer: W plus a block that has not left yet."""
        return self.window + self.block - 1

    @property
    def context_len(self) -> int:
        """Keys in front of every segment (packed: sinks, retrieved blocks, window)."""
        return self.n_sinks + self.top_k * self.block + self.span

    def init(self, batch_size: int, *, device, dtype) -> RetrievalState:
        G, Dh, L = self.n_kv_heads, self.head_dim, self.n_layers
        zeros = lambda n, dt=dtype: tuple(torch.zeros(batch_size, G, n, Dh, device=device, dtype=dt)  # noqa: E731
                                          for _ in range(L))
        count = lambda: torch.zeros(batch_size, dtype=torch.long, device=device)                    # noqa: E731
        store_dtype = self.store_dtype or dtype
        return RetrievalState(sink_k=zeros(self.n_sinks), sink_v=zeros(self.n_sinks), n_sink=count(),
                              win_k=zeros(self.span), win_v=zeros(self.span), valid=count(),
                              store_k=zeros(self.capacity, store_dtype), store_v=zeros(self.capacity, store_dtype),
                              written=count())

    def check(self, part: RetrievalState) -> None:
        want = (self.n_layers, self.n_kv_heads, self.n_sinks, self.span, self.capacity, self.head_dim)
        got = (len(part.sink_k), part.sink_k[0].shape[1], part.sink_k[0].shape[2], part.win_k[0].shape[2],
               part.capacity, part.sink_k[0].shape[3]) if part.sink_k else None
        if got != want:
            raise ValueError(f"a retrieval state of (layers, kv heads, sinks, window slots, capacity, head size) = "
                             f"{got}; this model keeps {want}")

    # -- reading -------------------------------------------------------------------------------------
    def query_chunks(self, q: torch.Tensor, G: int) -> torch.Tensor:
        """q (B, H, T, Dh) -> the summed queries of each chunk of ``query_chunk`` tokens, pooled over the H / G
        query heads of each key head: (B, G, chunks, Dh), float32 (sums in float32 are also faster)."""
        B, H, T, Dh = q.shape
        chunks = -(-T // self.query_chunk)
        qc = torch.nn.functional.pad(q.float(), (0, 0, 0, chunks * self.query_chunk - T))
        return qc.reshape(B, G, H // G, chunks, self.query_chunk, Dh).sum(dim=(2, 4))

    def block_scores(self, qc: torch.Tensor, store_k: torch.Tensor) -> torch.Tensor:
        """Every ring block's score, its best token's match with any chunk: qc (B, G, chunks, Dh) from
        :meth:`query_chunks`, store_k (B, G, C, Dh) -> (B, C / b) float32 (empty slots included)."""
        B, C = store_k.shape[0], store_k.shape[2]
        # one product per key head, summed over heads in float32 (an einsum over (g, d) at once copies the whole
        # store into another layout per call: 24x slower at 128K bfloat16 entries on a CPU)
        scores = (qc.to(store_k.dtype) @ store_k.transpose(-1, -2)).float().sum(dim=1)       # (B, chunks, C)
        return scores.view(B, -1, C // self.block, self.block).amax(dim=(1, 3))

    def select(self, q: torch.Tensor, store_k: torch.Tensor, written: torch.Tensor,
               index: StoreIndexes | None = None, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The k blocks of each lane's store that match the queries best, in stream order.

        q: (B, H, T, Dh) queries before rotary positions; store_k: (B, G, C, Dh); written: (B,). ``index``
        (backend faiss): the store's indexes, searched for ``layer`` instead of scoring every key.
        Returns block slots (B, k) (ring blocks, indexes into C / b) and how many are real (B,)."""
        B = q.shape[0]
        G, C, b = store_k.shape[1], store_k.shape[2], self.block
        n_blocks = C // b
        qc = self.query_chunks(q, G)                                                # (B, G, chunks, Dh)
        if index is None:
            # only the blocks written so far: a store that has not wrapped yet is filled from slot 0
            filled = min(n_blocks, -(-int(written.max()) // b))
            block = torch.full((B, n_blocks), float("-inf"), device=q.device)
            if filled:
                block[:, :filled] = self.block_scores(qc, store_k[:, :, :filled * b])   # (B, filled)
        else:                                                                     # the k b best tokens per chunk
            s, slot = index.search(layer, qc, min(self.top_k * b, C))              # (B, chunks, m)
            block = torch.full((B, n_blocks), float("-inf"))
            block.scatter_reduce_(1, (slot // b).view(B, -1), s.view(B, -1), "amax")
            block = block.to(q.device)
        stored = written.clamp(max=C) // b                                         # (B,) whole blocks held
        # block slot j holds logical block (j - oldest) mod n_blocks; the oldest is written / b - stored
        slot = torch.arange(n_blocks, device=q.device)
        oldest = (written // b - stored) % n_blocks
        age = (slot.unsqueeze(0) - oldest.unsqueeze(1)) % n_blocks                  # 0 = oldest held
        block = block.masked_fill(age >= stored.unsqueeze(1), float("-inf"))
        k = min(self.top_k, n_blocks)
        top = block.topk(k, dim=1).indices                                         # (B, k)
        chosen = torch.gather(age, 1, top)
        real = torch.arange(k, device=q.device).unsqueeze(0) < stored.clamp(max=k).unsqueeze(1)
        order = torch.where(torch.gather(block, 1, top) > float("-inf"), chosen, n_blocks + chosen)
        top = torch.gather(top, 1, order.argsort(dim=1))                           # stream order, empty last
        return top, real.sum(dim=1)

    def indexes_of(self, part: RetrievalState) -> StoreIndexes | None:
        """The faiss indexes reflecting ``part`` (backend faiss): its own, or built from its store when it has
        none or they are stale (a state read from a file or copied; after a reset, the reset lanes' only); None
        for the torch backend."""
        if self.backend != "faiss":
            return None
        held, written = part.index, part.written.tolist()
        if isinstance(held, StoreIndexes) and held.kind == self.index:
            if held.written == written:
                return held
            if held.reset_of(written):                                            # lanes reset: only theirs built
                return StoreIndexes(part, kind=self.index, reuse=held)
        return StoreIndexes(part, kind=self.index)

    def _context(self, part: RetrievalState, i: int):
        """Layer i's keys/values in front of the segment, chosen from its queries (``LayerView.kv``)."""
        b, k_blocks, index = self.block, self.top_k, part.index

        def context(q: torch.Tensor):
            B, G, _, Dh = part.store_k[i].shape
            top, n_real = self.select(q, part.store_k[i], part.written, index, i)  # (B, k), (B,)
            k = top.shape[1]
            tok = (top.unsqueeze(-1) * b + torch.arange(b, device=q.device)).view(B, 1, k * b, 1)
            idx = tok.expand(B, G, k * b, Dh)
            blk_k = part.store_k[i].gather(2, idx).to(q.dtype)                      # (B, G, k b, Dh)
            blk_v = part.store_v[i].gather(2, idx).to(q.dtype)
            if k < k_blocks:                                                         # a store of fewer blocks
                fill = torch.zeros(B, G, (k_blocks - k) * b, Dh, dtype=q.dtype, device=q.device)
                blk_k, blk_v = torch.cat([blk_k, fill], dim=2), torch.cat([blk_v, fill], dim=2)
            src_k = torch.cat([part.sink_k[i].to(q.dtype), blk_k, part.win_k[i].to(q.dtype)], dim=2)
            src_v = torch.cat([part.sink_v[i].to(q.dtype), blk_v, part.win_v[i].to(q.dtype)], dim=2)
            # pack each lane's real slots, in order, to the right: positions are then contiguous
            s, S = self.n_sinks, src_k.shape[2]
            j = torch.arange(S, device=q.device)
            real = ((j < part.n_sink.unsqueeze(1))
                    | ((j >= s) & (j < s + n_real.unsqueeze(1) * b))
                    | (j >= S - part.valid.unsqueeze(1)))                           # (B, S)
            order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices     # empty first, then in order
            idx = order.view(B, 1, S, 1).expand(B, G, S, Dh)
            return src_k.gather(2, idx), src_v.gather(2, idx), real.sum(dim=1)
        return context

    def begin(self, seg: Segment, part: RetrievalState) -> RetrievalState:
        self.check(part)
        index = self.indexes_of(part)
        if index is not part.index:
            part = replace(part, index=index)
        seg.set_context(kv=[self._context(part, i) for i in range(self.n_layers)], valid=None,
                        length=self.context_len)
        seg.scratch[self.name] = {}
        for i in range(self.n_layers):
            seg.hooks[i].append(self._recorder(seg, i))
        return part

    def _recorder(self, seg: Segment, i: int):
        def record(*, q, k, v, y, raw_k, context, **_):
            seg.scratch[self.name][i] = (seg.tokens_of(raw_k, dim=2).detach(), seg.tokens_of(v, dim=2).detach())
            return y
        return record

    # -- writing -------------------------------------------------------------------------------------
    def end(self, seg: Segment, part: RetrievalState, h: torch.Tensor):
        """Fill the sinks, append the segment to the window, move whole blocks that left it to the store."""
        B, T, s, W, b, C = part.valid.shape[0], seg.n_tokens, self.n_sinks, self.window, self.block, self.capacity
        device = part.valid.device
        to_sink = torch.clamp(s - part.n_sink, min=0).clamp(max=T)                   # (B,) first tokens -> sinks
        span = self.span
        start = span - part.valid + to_sink                                          # lane's window tokens start
        count = span + T - start                                                     # ... and how many
        evict = torch.clamp(count - W, min=0) // b * b                               # whole blocks leave
        skip = torch.clamp(evict - C, min=0)                                         # beyond capacity: the newest C
        j_sink = torch.arange(s, device=device)
        sink_src = (span + j_sink - part.n_sink.unsqueeze(1)).clamp(min=0, max=span + T - 1)   # (B, s)
        sink_new = (j_sink >= part.n_sink.unsqueeze(1)) & (j_sink < (part.n_sink + to_sink).unsqueeze(1))
        m = int((evict - skip).max()) if B else 0
        j_ev = torch.arange(m, device=device)
        ev_src = ((start + skip).unsqueeze(1) + j_ev).clamp(max=span + T - 1)        # (B, m)
        ev_dst = ((part.written + skip).unsqueeze(1) + j_ev) % C
        ev_real = j_ev.unsqueeze(0) < (evict - skip).unsqueeze(1)
        new: dict[str, list[torch.Tensor]] = {name: [] for name in RetrievalState._TENSORS}
        index = part.index if self.backend == "faiss" else None
        added: list[torch.Tensor] = []
        for i in range(self.n_layers):
            k_new, v_new = seg.scratch[self.name][i]
            for kind, win, new_tok, sink, store in (("k", part.win_k[i], k_new, part.sink_k[i], part.store_k[i]),
                                                    ("v", part.win_v[i], v_new, part.sink_v[i], part.store_v[i])):
                joined = torch.cat([win, new_tok.to(win.dtype)], dim=2)              # (B, G, span + T, Dh)
                G, Dh = joined.shape[1], joined.shape[3]
                if s:
                    got = joined.gather(2, sink_src.view(B, 1, s, 1).expand(B, G, s, Dh))
                    sink = torch.where(sink_new.view(B, 1, s, 1), got, sink)
                if m:                                                                # in place: see RetrievalState
                    out = joined.gather(2, ev_src.view(B, 1, m, 1).expand(B, G, m, Dh)).to(store.dtype)
                    dst = ev_dst.view(B, 1, m, 1).expand(B, G, m, Dh)
                    out = torch.where(ev_real.view(B, 1, m, 1), out, store.gather(2, dst))
                    store.scatter_(2, dst, out)
                    if kind == "k":
                        added.append(out)
                new[f"win_{kind}"].append(joined[:, :, -span:])
                new[f"sink_{kind}"].append(sink)
                new[f"store_{kind}"].append(store)
        after = RetrievalState(**{n: tuple(t) for n, t in new.items()}, n_sink=part.n_sink + to_sink,
                               valid=count - evict, written=part.written + evict, index=index)
        if index is not None:
            first, n = (part.written + skip).tolist(), (evict - skip).tolist()
            for i, keys in enumerate(added):
                index.add(i, keys, first, n, after)
            index.written = after.written.tolist()
        return after, None

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        """Bytes of a state: sinks, window and store (keys and values), plus the faiss indexes' float32 copy of
        the stored keys (backend faiss; HNSW graphs' links not counted)."""
        slots = self.n_sinks + self.span + self.capacity
        index = self.capacity * 4 if self.backend == "faiss" else 0
        return batch_size * n_layers * self.n_kv_heads * self.head_dim * (2 * slots * bytes_per_value + index)


def retrieval_memory(c) -> RetrievalMemory:
    """The retrieval memory of a ModelConfig (``memory.kind: retrieval``)."""
    r = c.memory.retrieval
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[r.store_dtype]
    return RetrievalMemory(window=c.memory.mem_len, n_layers=c.n_layers, n_kv_heads=c.n_kv_heads_,
                           head_dim=c.head_dim_, n_sinks=c.memory.n_sinks, block_size=r.block_size, top_k=r.top_k,
                           capacity=r.capacity, query_chunk=r.query_chunk, store_dtype=dtype,
                           backend=r.backend, index=r.index)


