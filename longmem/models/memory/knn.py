"""kNN long-term memory: Memorizing Transformers (Wu et al. 2022).

Legend: B lanes, H heads, T segment length, C memory capacity (entries per lane,
layer and head), K entries retrieved per query, Dh head size, L retrieving layers.

Each retrieving layer keeps, per lane and head, the (key, value) pairs of every
token it has read, detached, in a FIFO ring of ``knn_capacity`` slots. For each
query the top-K entries by inner product are retrieved, attended to (softmax over
the K), and mixed with the local attention output through a learned per-head gate
``g = sigmoid(b)``: ``y = g * y_mem + (1 - g) * y_local`` (Wu et al. 2022 §3, eq. 2).
Memory keys and queries carry no positions; optionally both are L2-normalized
(the paper's remedy for stale keys) with a learned per-head temperature.
Entries are written after a segment has been processed, so a segment never
retrieves itself.

The store is a ring written in place (``Ring`` in ``state.py``: the newest state of a ring is written, an older
one fed again is rebuilt from undo records).

Search:
- ``torch`` (:func:`torch_search`): exact. Groups of (lane, head) pairs are scored by one matmul into a reused
  buffer (:class:`Scratch`) and cut to their top-k at once while the scores are in the cache (:func:`topk`:
  recursive strided-block top-k); extra memory is bounded by (pairs per group, T, chunk).
- ``faiss`` (extra ``faiss``): :class:`LaneIndexes`, one persistent :class:`FifoIndex` per (layer, lane, head):
  flat (exact), IVF or HNSW (approximate), built once from the store and updated by each write (new entries
  added, overwritten ones removed), never rebuilt per call and never saved. :func:`faiss_search` builds
  throw-away indexes per call (the standalone function; the memory does not use it).
"""
from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.models.memory.base import Memory, Segment
from longmem.models.memory.state import KNNState, Ring
from longmem.utils import install_hint


# -- search ------------------------------------------------------------------
class Scratch:
    """Reusable score buffers, one per thread (a model may serve several threads at once).

    A (B, H, T, chunk) fp32 score matrix is tens to hundreds of MB; a fresh one per search is returned to
    the system after each call and costs its page faults again on the next (more than the matmul that fills
    it, measured: 52 vs 133 ms per step at 8,192 entries). The search writes its scores into this buffer
    instead; it only grows."""

    def __init__(self):
        self._local = threading.local()

    def take(self, shape: tuple[int, ...], *, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._local.buf = buf
        return buf[:n].view(shape)


@torch.no_grad()
def torch_search(queries: torch.Tensor, keys: torch.Tensor, count: torch.Tensor, *, k: int,
                 chunk: int = 8192, scratch: Scratch | None = None,
                 cache_bytes: int = 4 * 2**20) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search.

    queries: (B, H, T, Dh); keys: (B, H, C, Dh); count: (B,) slots [0, count) are valid.
    Returns scores (B, H, T, k) and indices (B, H, T, k) into C, in no particular order (the
    attention over them does not need one); where a lane holds fewer than k entries the missing
    ones have score -inf and index 0.

    The (lane, head) pairs go in groups whose scores fill about ``cache_bytes`` (one pair at a time at
    T = 128, C = 8,192), each scored by one matmul per ``chunk`` of entries into ``scratch`` (a fresh
    tensor without one) and cut to its top-k at once, while its scores are still in the cache: 20% faster
    than one matmul over all pairs followed by one top-k on a CPU, where the top-k's reads are the cost.
    """
    B, H, T, Dh = queries.shape
    C = keys.shape[2]
    used = min(int(count.max()) if count.numel() else 0, C)        # never scan slots no lane uses
    full = min(int(count.min()) if count.numel() else 0, C)        # slots every lane uses: no mask needed
    best_s = keys.new_full((B, H, T, k), float("-inf"))
    best_i = torch.zeros(B, H, T, k, dtype=torch.long, device=queries.device)
    if used == 0:
        return best_s, best_i
    # scores in the store's dtype (autocast does not reach a matmul with out=): exact fp32 for an fp32 store
    q, kf = queries.to(keys.dtype).reshape(B * H, T, Dh), keys.reshape(B * H, C, Dh)
    out_s, out_i = best_s.view(B * H, T, k), best_i.view(B * H, T, k)
    width = min(chunk, used)
    group = max(1, cache_bytes // (T * width * q.element_size()))   # (lane, head) pairs per matmul
    lane_count = count.repeat_interleave(H)                          # (B * H,)
    for r0 in range(0, B * H, group):
        r1 = min(r0 + group, B * H)
        cand_s, cand_i = [], []                                      # per-chunk top-k, merged every 16 chunks
        for c0 in range(0, used, chunk):
            c1 = min(c0 + chunk, used)
            kt = kf[r0:r1, c0:c1].transpose(-1, -2)                   # (r, Dh, n)
            s = (torch.bmm(q[r0:r1], kt) if scratch is None else
                 torch.bmm(q[r0:r1], kt, out=scratch.take((r1 - r0, T, c1 - c0), like=q)))   # (r, T, n)
            if c1 > full:
                slot = torch.arange(c0, c1, device=queries.device)
                s.masked_fill_((slot[None, :] >= lane_count[r0:r1, None])[:, None, :], float("-inf"))
            ts, ti = topk(s, min(k, c1 - c0))                        # (r, T, <=k)
            cand_s.append(ts)
            cand_i.append(ti + c0 if c0 else ti)
            if len(cand_s) == 16:
                cand_s, cand_i = _merge(cand_s, cand_i, k)
        (ms,), (mi,) = _merge(cand_s, cand_i, k)
        out_s[r0:r1, :, :ms.shape[-1]], out_i[r0:r1, :, :mi.shape[-1]] = ms, mi
    best_i.masked_fill_(best_s == float("-inf"), 0)
    return best_s, best_i


def _merge(cand_s: list[torch.Tensor], cand_i: list[torch.Tensor], k: int):
    s, i = torch.cat(cand_s, dim=-1), torch.cat(cand_i, dim=-1)     # (B, H, T, m)
    if len(cand_s) == 1 and s.shape[-1] <= k:
        return [s], [i]
    best_s, j = s.topk(min(k, s.shape[-1]), dim=-1, sorted=False)
    return [best_s], [i.gather(-1, j)]


def topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dimension, in no particular order.

    Long rows go in two stages over g blocks of n / g slots, block b holding slots b, b + n/g, ...
    (strided, so the block maxima are an element-wise max of g contiguous pieces): the k largest
    entries lie in the k blocks with the largest maxima (any other block has k blocks, each with an
    entry, above its maximum), so a top-k over n / g block maxima (itself taken this way, recursively)
    and one over k * g candidates replace one over n. On a CPU torch's top-k costs per row and per
    entry; the short ones are cheaper from n of about 1,024 on. g is about sqrt(n / k) / 2 (measured:
    the recursion makes the block maxima cheap, so smaller blocks pay; 43 vs 58 ms for 16,384 rows of
    8,192, k = 32).
    """
    n = s.shape[-1]
    g = max(4, 2 ** int(math.log2(max(1.0, math.sqrt(n / max(k, 1)) / 2))))
    if n % g or n // g < 4 * k:
        return s.topk(k, dim=-1, sorted=False)
    lead, nb = s.shape[:-1], n // g
    blocks = s.reshape(*lead, g, nb)                                                   # (..., g, nb)
    _, block = topk(blocks.amax(-2), k)                                                # (..., k) in [0, nb)
    cand = blocks.gather(-1, block.unsqueeze(-2).expand(*lead, g, k))                  # (..., g, k)
    best, j = cand.flatten(-2).topk(k, dim=-1, sorted=False)                           # j = row * k + column
    return best, block.gather(-1, j % k) + torch.div(j, k, rounding_mode="floor") * nb


def rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 2-D table: whole rows copied (an embedding lookup, several times
    faster on a CPU than ``gather`` with an expanded index or ``index_select``). (..., ) -> (..., D)."""
    return F.embedding(index, table)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("backend 'faiss' (memory.knn.backend, memory.retrieval.backend) needs faiss: "
                          + install_hint("faiss")) from None
    return faiss


class FaissIndex:
    """One faiss inner-product index over n vectors: ``flat`` (exact), ``hnsw`` or ``ivf``."""

    def __init__(self, vectors: np.ndarray, *, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 64,
                 nprobe: int = 32):
        faiss = _faiss()
        n, d = vectors.shape
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ip = faiss.METRIC_INNER_PRODUCT
        index: Any
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, ip)
            index.hnsw.efSearch = ef_search
        elif kind == "ivf":
            nlist = max(1, min(int(math.sqrt(n)), n // 39))              # faiss wants >= 39 points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
            sample = np.random.default_rng(0).permutation(n)[:64 * nlist]   # k-means on a sample: bounded build
            index.train(vectors[np.sort(sample)])
            index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"faiss index kind {kind!r}; accepted: flat, hnsw, ivf")
        index.add(vectors)
        self.index, self.n = index, n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (Q, k); missing results have score -inf and index -1."""
        s, i = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        s[i < 0] = -np.inf
        return s, i


@torch.no_grad()
def faiss_search(queries: torch.Tensor, keys: torch.Tensor, count: torch.Tensor, *, k: int,
                 index: str = "flat") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`torch_search` through faiss: one index per (lane, head) over its valid slots."""
    B, H, T, _ = queries.shape
    scores = torch.full((B, H, T, k), float("-inf"))
    idx = torch.zeros(B, H, T, k, dtype=torch.long)
    q_np, k_np = queries.float().cpu().numpy(), keys.float().cpu().numpy()
    for b in range(B):                                               # a loop over indexes, not entries
        n = int(count[b])
        if n == 0:
            continue
        for h in range(H):
            s, i = FaissIndex(k_np[b, h, :n], kind=index).search(q_np[b, h], k)
            scores[b, h], idx[b, h] = torch.from_numpy(s), torch.from_numpy(i).clamp(min=0)
    idx = idx.masked_fill(scores == float("-inf"), 0)
    return scores.to(queries.device, queries.dtype), idx.to(queries.device)


class FifoIndex:
    """One persistent faiss inner-product index over the entries of one (layer, lane, key head) store, ids the
    entry numbers (entry e sits in slot e % C), kept in step with the ring: :meth:`add` the new entries,
    :meth:`evict` the ones the ring overwrote (first in, first out). Never rebuilt per call.

    - ``flat``: exact (``IndexIDMap2(IndexFlatIP)``, removal by id range).
    - ``ivf``: ``IndexIVFFlat`` with ``nlist`` = sqrt(C) lists (at most C / 39), probed ``nprobe``; trained once,
      on the lane's entries when it first holds 39 per list (faiss's minimum); until then the lane is searched
      by a flat index (exact). Removal by id range.
    - ``hnsw``: HNSW graphs (M ``hnsw_m``, ``ef_search``) cannot remove entries, so entries go to generations of
      C / 2 consecutive entry numbers, each its own graph: a generation is dropped when the ring has overwritten
      all of it, and the searches skip the evicted entries of the oldest one (an id selector). At most 3 graphs.
    """

    def __init__(self, *, kind: str, capacity: int, dim: int, hnsw_m: int = 32, ef_search: int = 64,
                 nprobe: int = 32):
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"faiss index kind {kind!r}; accepted: flat, hnsw, ivf")
        self.faiss = _faiss()
        self.kind, self.capacity, self.dim = kind, capacity, dim
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.nlist = max(1, min(int(math.sqrt(capacity)), capacity // 39))   # faiss wants 39 points per list
        self.nprobe = min(nprobe, self.nlist)
        self.low = 0                                             # entries below this number are evicted
        self.gens: dict[int, Any] = {}                           # hnsw: generation -> graph
        self.index: Any = None if kind == "hnsw" else self._flat()
        self.trained = kind != "ivf"

    def _flat(self):
        return self.faiss.IndexIDMap2(self.faiss.IndexFlatIP(self.dim))

    def add(self, vectors: np.ndarray, first: int, *, store: np.ndarray | None = None) -> None:
        """Entries number ``first``, ``first`` + 1, ... (rows of ``vectors``). ``store``: the lane's ring (C, Dh)
        after the write, from which an IVF index is trained once it holds enough entries."""
        n = vectors.shape[0]
        if n == 0:
            return
        ids = np.arange(first, first + n, dtype=np.int64)
        if self.kind == "hnsw":
            half = max(1, self.capacity // 2)
            for gen in range(first // half, (first + n - 1) // half + 1):
                a, b = max(first, gen * half), min(first + n, (gen + 1) * half)
                if gen not in self.gens:
                    graph = self.faiss.IndexHNSWFlat(self.dim, self.hnsw_m, self.faiss.METRIC_INNER_PRODUCT)
                    graph.hnsw.efSearch = self.ef_search
                    self.gens[gen] = self.faiss.IndexIDMap(graph)
                self.gens[gen].add_with_ids(vectors[a - first:b - first], ids[a - first:b - first])
            return
        self.index.add_with_ids(vectors, ids)
        end = first + n
        if not self.trained and store is not None and end - self.low >= min(self.capacity, 39 * self.nlist):
            held = np.arange(self.low, end, dtype=np.int64)     # the lane's entries, read back from the ring
            x = np.ascontiguousarray(store[held % self.capacity], dtype=np.float32)
            ivf = self.faiss.IndexIVFFlat(self.faiss.IndexFlatIP(self.dim), self.dim, self.nlist,
                                          self.faiss.METRIC_INNER_PRODUCT)
            ivf.train(x)
            ivf.nprobe = self.nprobe
            ivf.add_with_ids(x, held)
            self.index, self.trained = ivf, True

    def evict(self, low: int) -> None:
        """Forget the entries numbered below ``low``."""
        if low <= self.low:
            return
        if self.kind == "hnsw":
            half = max(1, self.capacity // 2)
            for gen in [g for g in self.gens if (g + 1) * half <= low]:
                del self.gens[gen]
        else:
            self.index.remove_ids(self.faiss.IDSelectorRange(self.low, low))
        self.low = low

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, entry numbers), each (Q, k); missing results have score -inf and number -1."""
        Q = queries.shape[0]
        if self.kind != "hnsw":
            s, i = self.index.search(queries, k)
        else:
            s, i = np.full((Q, k), -np.inf, dtype=np.float32), np.full((Q, k), -1, dtype=np.int64)
            for gen in sorted(self.gens):
                graph = self.gens[gen]
                sel = self.faiss.IDSelectorRange(self.low, np.iinfo(np.int64).max)
                params = self.faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
                gs, gi = graph.search(queries, k, params=params)
                gs[gi < 0] = -np.inf
                both_s, both_i = np.concatenate([s, gs], 1), np.concatenate([i, gi], 1)
                top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
                s, i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
        s = np.where(i < 0, -np.inf, s).astype(np.float32)
        return s, i


def fifo_from_store(store: np.ndarray, written: int, *, capacity: int, kind: str, **options) -> "FifoIndex":
    """A :class:`FifoIndex` over one lane's store (C, dim) of a ring: entry e in slot e % C, holding the
    entries ``written - min(written, C)`` .. ``written - 1`` (kNN: per key head; retrieval: key heads side by side)."""
    n = min(written, capacity)
    ix = FifoIndex(kind=kind, capacity=capacity, dim=store.shape[1], **options)
    ix.low = written - n
    held = np.arange(written - n, written) % capacity
    ix.add(np.ascontiguousarray(store[held]), written - n, store=store)
    return ix


class LaneIndexes:
    """The persistent faiss indexes of a kNN store (``memory.knn.backend`` faiss): one :class:`FifoIndex` per
    retrieving layer, lane and key head, built once from the store and then updated by every write. Kept in
    the store's ``Ring`` (``index``), never saved: the store is the source of truth, and a state read from a
    file, reset or copied gets its indexes built again from its tensors on first use."""

    def __init__(self, state: KNNState, *, kind: str, **options):
        self.kind, self.options = kind, options
        C = state.capacity
        self.version = state.version if state.ring is not None else -1
        self.indexes = []
        written = state.written.tolist()
        for keys in state.keys:
            B, G = keys.shape[:2]
            store = keys.detach().float().cpu().numpy()
            layer = []
            for b in range(B):
                layer.append([fifo_from_store(store[b, g], written[b], capacity=C, kind=kind, **options)
                              for g in range(G)])
            self.indexes.append(layer)

    def update(self, after: KNNState, keys: list[torch.Tensor]) -> None:
        """Add the entries ``keys`` (per layer (B, G, T, Dh), the newest last) just written to make ``after``, and
        evict what the ring overwrote."""
        C = after.capacity
        w1 = after.written.tolist()
        for j, new in enumerate(keys):
            x = new.detach().float().cpu().numpy()
            T = x.shape[2]
            for b, lane in enumerate(self.indexes[j]):
                first = w1[b] - min(T, C)
                for g, ix in enumerate(lane):
                    store = None if ix.trained else after.keys[j][b, g].detach().float().cpu().numpy()
                    ix.add(np.ascontiguousarray(x[b, g, T - min(T, C):]), first, store=store)
                    ix.evict(w1[b] - min(w1[b], C))
        self.version = after.version

    def search(self, j: int, queries: torch.Tensor, *, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j's search: queries (B, G, N, Dh) -> scores and slots (B, G, N, k); missing: -inf and slot 0."""
        B, G, N, _ = queries.shape
        q = queries.detach().float().cpu().numpy()
        scores = np.full((B, G, N, k), -np.inf, dtype=np.float32)
        ids = np.zeros((B, G, N, k), dtype=np.int64)
        for b, lane in enumerate(self.indexes[j]):
            for g, ix in enumerate(lane):
                s, i = ix.search(np.ascontiguousarray(q[b, g]), k)
                scores[b, g], ids[b, g] = s, np.where(i < 0, 0, i % ix.capacity)
        return (torch.from_numpy(scores).to(queries.device, queries.dtype), torch.from_numpy(ids).to(queries.device))


def search(queries, keys, count, *, k: int, backend: str = "torch", index: str = "flat", chunk: int = 8192,
           scratch: Scratch | None = None):
    if backend == "torch":
        return torch_search(queries, keys, count, k=k, chunk=chunk, scratch=scratch)
    if backend == "faiss":
        return faiss_search(queries, keys, count, k=k, index=index)
    raise ValueError(f"kNN backend {backend!r}; accepted: torch, faiss")


# -- the memory ----------------------------------------------------------------
def resolve_knn_layers(config, n_layers: int) -> list[int]:
    """Block indices that retrieve (``memory.knn.layers``); empty means the block at 3/4 depth."""
    layers = config.layers or [min(n_layers - 1, (3 * n_layers) // 4)]
    out = []
    for i in layers:
        if not -n_layers <= i < n_layers:
            raise ValueError(f"memory.knn.layers holds {i}, but the model has {n_layers} blocks "
                             f"(valid: 0..{n_layers - 1} or -{n_layers}..-1)")
        out.append(i % n_layers)
    if len(set(out)) != len(out):
        raise ValueError(f"memory.knn.layers names a block twice: {layers}")
    return sorted(out)


class KNNMemory(Memory):
    """Parameters of the retrieving layers (gates, temperatures, one per query head) and init / read /
    write of the store (one per key/value head: with grouped-query attention the H / G query heads of
    a group search their key head's store). Settings: ``memory.knn`` (KNNConfig)."""
    name = "knn"

    def __init__(self, *, config, n_layers: int, n_heads: int, head_dim: int, n_kv_heads: int = 0):
        super().__init__()
        self.layers = resolve_knn_layers(config, n_layers)
        self.k, self.capacity, self.chunk = config.k, config.capacity, config.chunk
        self.backend, self.index, self.normalize = config.backend, config.index, config.normalize
        self.index_options = dict(nprobe=config.nprobe, ef_search=config.ef_search, hnsw_m=config.hnsw_m)
        self.n_heads, self.head_dim = n_heads, head_dim
        self.n_kv_heads = n_kv_heads or n_heads
        self.scratch = Scratch()                                     # score buffers of the exact search
        # one gate bias per head and retrieving layer; sigmoid(0) = 0.5 mixes evenly at the start
        self.gate = nn.ParameterList(nn.Parameter(torch.zeros(n_heads)) for _ in self.layers)
        # normalized keys: cosine scores need a temperature; learned per head, starting at 10
        self.log_scale = nn.ParameterList(nn.Parameter(torch.full((n_heads,), math.log(10.0)))
                                          for _ in self.layers) if self.normalize else None

    def init(self, batch_size: int, *, device, dtype) -> KNNState:
        shape = (batch_size, self.n_kv_heads, self.capacity, self.head_dim)
        return KNNState(keys=tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers),
                        values=tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers),
                        written=torch.zeros(batch_size, dtype=torch.long, device=device))

    def check(self, state: KNNState) -> None:
        want = (len(self.layers), self.n_kv_heads, self.capacity, self.head_dim)
        got = (len(state.keys), *(state.keys[0].shape[1:] if state.keys else (0, 0, 0)))
        if want != got:
            raise ValueError(f"kNN state has (layers, heads, capacity, head_dim) = {got}, the model {want}")

    def begin(self, seg: Segment, part: KNNState) -> KNNState:
        knn = KNNSegment(self, part, record=seg.inspecting)           # reads the store of past segments
        seg.scratch[self.name] = knn
        for i in self.layers:
            seg.hooks[i].append(knn.hook(i))
        return part

    def end(self, seg: Segment, part: KNNState, h: torch.Tensor):
        return seg.scratch[self.name].written(), None                  # after the segment: never retrieves itself

    def inspect(self, seg: Segment, before: KNNState, after: KNNState, h: torch.Tensor) -> dict[str, Any]:
        """What the retrieving layers found: per retrieving layer j (in ``layers``) ``entries[j]`` (B, H, T, K),
        the numbers of the entries retrieved (entry e is the e-th token the lane's store was written since its
        reset; -1: none), ``scores[j]`` their scaled match with the query and ``weights[j]`` the attention over
        them (the K of a query sum to 1); ``gate`` (n retrieving layers, H) the share of the retrieved part in
        the output; ``written`` (B,) entries written before the segment. A layer that found nothing (an empty
        store) is missing from the three dicts."""
        rec = seg.scratch[self.name].records
        return {"layers": list(self.layers), "gate": torch.stack([torch.sigmoid(g.detach()) for g in self.gate]),
                "written": before.written, "entries": {j: r["entries"] for j, r in rec.items()},
                "scores": {j: r["scores"] for j, r in rec.items()}, "weights": {j: r["weights"] for j, r in rec.items()}}

    def segment(self, state: KNNState) -> "KNNSegment":
        return KNNSegment(self, state)

    def attend(self, j: int, *, q: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               count: torch.Tensor, written: torch.Tensor | None = None,
               record: dict[int, dict[str, torch.Tensor]] | None = None,
               indexes: "LaneIndexes | None" = None) -> torch.Tensor:
        """Gated mix of local attention ``y`` with attention over the top-k entries (layer j of self.layers).

        q, y: (B, H, T, Dh) queries (no positions) and local attention output; keys, values: (B, G, C, Dh).
        record (inspection): gets ``record[j]`` = entries, scores, weights (see :meth:`inspect`); needs
        ``written`` (B,), the entries written so far per lane. indexes: the store's persistent faiss indexes
        (backend faiss), searched instead of the exact torch search.
        """
        if self.normalize:
            q = F.normalize(q, dim=-1)
        if int(count.max()) == 0:                                     # nothing stored yet: local only
            return y
        B, H, T, Dh = q.shape
        G = keys.shape[1]
        rep = H // G
        qg = q.reshape(B, G, rep * T, Dh)                              # the queries of each key head's group
        k = min(self.k, keys.shape[2])
        if indexes is not None:
            found, idx = indexes.search(j, qg.detach(), k=k)
        else:
            found, idx = torch_search(qg.detach(), keys, count, k=k, chunk=self.chunk, scratch=self.scratch)
        flat = idx + (torch.arange(B * G, device=q.device) * keys.shape[2]).view(B, G, 1, 1)  # (B, G, rep*T, k)
        vr = rows_of(values.reshape(-1, Dh), flat)                     # (B, G, rep*T, k, Dh)
        if qg.requires_grad:
            # scores recomputed with gradient into the queries (the search itself is not differentiable)
            kr = rows_of(keys.reshape(-1, Dh), flat)                   # (B, G, rep*T, k, Dh)
            s = torch.einsum("bgnd,bgnkd->bgnk", qg, kr).view(B, H, T, k)  # (B, H, T, k)
        else:                                                         # no gradient: the search's scores will do
            s = found.view(B, H, T, k).to(qg.dtype)
        s = s * (self.log_scale[j].exp().view(1, H, 1, 1) if self.log_scale is not None else 1.0 / math.sqrt(Dh))
        s = s.masked_fill(found.view(B, H, T, k) == float("-inf"), torch.finfo(s.dtype).min)   # lanes with < k
        weights = s.softmax(-1)                                        # (B, H, T, k)
        y_mem = torch.einsum("bgnk,bgnkd->bgnd", weights.view(B, G, rep * T, k), vr).view(B, H, T, Dh)
        if record is not None and written is not None:               # slot -> entry number (slot e % C holds e)
            slot, w, C = idx.view(B, H, T, k), written.view(B, 1, 1, 1), keys.shape[2]
            missing = found.view(B, H, T, k) == float("-inf")
            record[j] = {"entries": (slot + C * torch.div(w - 1 - slot, C, rounding_mode="floor")).masked_fill(missing, -1),
                         "scores": s.detach().float(), "weights": weights.detach().float().masked_fill(missing, 0.0)}
        y_mem = torch.where((count > 0).view(B, 1, 1, 1), y_mem, y)   # an empty lane falls back to local
        g = torch.sigmoid(self.gate[j]).view(1, H, 1, 1)
        return g * y_mem + (1 - g) * y

    def write(self, state: KNNState, keys: list[torch.Tensor], values: list[torch.Tensor], *,
              indexes: "LaneIndexes | None" = None) -> KNNState:
        """Append each lane's new entries (per layer (B, G, T, Dh)) to its ring, evicting the oldest.

        The newest state of a ring is written in place (``Ring``: the state passed in is used up); any other
        state is copied into a new ring first, so a state from ``init``, a file or a reset is never changed.
        ``indexes``: the persistent faiss indexes of ``state`` (backend faiss), updated with the new entries and
        kept in the ring for the next segment."""
        state = state.live()
        C = state.capacity
        T = keys[0].shape[2]
        if T > C:                                                     # only the newest C can survive
            keys, values = [k[:, :, -C:] for k in keys], [v[:, :, -C:] for v in values]
            written = state.written + (T - C)
            T = C
        else:
            written = state.written
        ring = state.ring
        B, G, _, Dh = keys[0].shape
        if ring is None:                                              # tensors of its own: copy once, then own
            ring = Ring(keep=max(1, C // 4))
            bufs_k = tuple(k.detach().clone() for k in state.keys)
            bufs_v = tuple(v.detach().clone() for v in state.values)
        else:                                                         # in place: keep what is overwritten (undo)
            bufs_k, bufs_v = state.keys, state.values
            slot = (written.view(B, 1) + torch.arange(T, device=written.device)) % C      # (B, T)
            at = slot.view(B, 1, T, 1).expand(B, G, T, Dh)
            ring.record(slot, tuple(b.gather(2, at) for b in bufs_k), tuple(b.gather(2, at) for b in bufs_v))
        lo, hi = int(written.min()), int(written.max())
        if lo == hi and T:                                            # every lane at the same slot: slices
            a = lo % C
            n1 = min(T, C - a)
            for bufs, new in ((bufs_k, keys), (bufs_v, values)):
                for buf, x in zip(bufs, new):
                    x = x.detach().to(buf.dtype)
                    buf[:, :, a:a + n1] = x[:, :, :n1]
                    if n1 < T:                                        # wrapped around the end of the ring
                        buf[:, :, :T - n1] = x[:, :, n1:]
        elif T:
            slot = (written.view(B, 1) + torch.arange(T, device=written.device)) % C    # (B, T)
            slot = slot.view(B, 1, T, 1).expand(B, G, T, Dh)
            for bufs, new in ((bufs_k, keys), (bufs_v, values)):
                for buf, x in zip(bufs, new):
                    buf.scatter_(2, slot, x.detach().to(buf.dtype))
        ring.version += 1
        out = KNNState(keys=bufs_k, values=bufs_v, written=written + T, ring=ring, version=ring.version)
        if indexes is not None:
            indexes.update(out, keys)
        ring.index = indexes
        return out

    def indexes_of(self, state: KNNState) -> "LaneIndexes | None":
        """The persistent faiss indexes that reflect ``state`` (backend faiss): the ring's, or built from the store
        when it has none (a new state, one read from a file, reset or copied); None for the torch backend."""
        if self.backend != "faiss":
            return None
        ring = state.ring
        held = ring.index if ring is not None else None
        if (isinstance(held, LaneIndexes) and held.version == state.version and held.kind == self.index
                and held.options == self.index_options):
            return held
        return LaneIndexes(state, kind=self.index, **self.index_options)

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        return batch_size * len(self.layers) * 2 * self.capacity * self.n_kv_heads * self.head_dim * bytes_per_value


class KNNSegment:
    """The kNN memory during one segment: hooks for the retrieving blocks, then the write."""

    def __init__(self, memory: KNNMemory, state: KNNState, *, record: bool = False):
        state = state.live()                                          # an older state of a ring: rebuilt
        memory.check(state)
        self.memory, self.state = memory, state
        self.count = state.count()
        self.indexes = memory.indexes_of(state)                      # backend faiss: persistent, per lane
        self.records: dict[int, dict[str, torch.Tensor]] | None = {} if record else None   # inspection only
        self.new_keys: dict[int, torch.Tensor] = {}
        self.new_values: dict[int, torch.Tensor] = {}

    def hook(self, layer: int):
        """The callable block ``layer`` passes to its attention, or None if it does not retrieve."""
        if layer not in self.memory.layers:
            return None
        j = self.memory.layers.index(layer)

        def retrieve(*, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
            # q: (B, H, T, Dh), k, v: (B, G, T, Dh) this segment's projections before rotary positions
            self.new_keys[j] = F.normalize(k, dim=-1) if self.memory.normalize else k
            self.new_values[j] = v
            return self.memory.attend(j, q=q, y=y, keys=self.state.keys[j], values=self.state.values[j],
                                      count=self.count, written=self.state.written, record=self.records,
                                      indexes=self.indexes)
        return retrieve

    def written(self) -> KNNState:
        n = len(self.memory.layers)
        return self.memory.write(self.state, [self.new_keys[j] for j in range(n)],
                                 [self.new_values[j] for j in range(n)], indexes=self.indexes)
