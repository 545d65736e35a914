"""kNN memory, issue 22 item 1: the fast exact search equals brute force (one matmul and one torch.topk, which
the search before it also equalled) on large rows, with ties and partly filled lanes; the ring written in place
equals the copy-on-write ring it replaced (wrap-around, lanes at different places, resets); an older state fed
again is rebuilt from the ring's undo records, or says it was used up instead of reading overwritten entries; the
persistent faiss indexes equal exact search (flat) or reach a recall (ivf, hnsw) after the ring has wrapped, are
built once and never per call, and the store stays the source of truth in checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longmem import State
from longmem.config import KNNConfig, MemoryConfig
from longmem.models import MemoryLM
from longmem.models.memory import knn as knn_mod
from longmem.models.memory.knn import KNNMemory, LaneIndexes, Scratch, torch_search
from longmem.models.memory.state import KNNState

from conftest import spread_weights, tiny_config

pytestmark = pytest.mark.invariant

V = 37


def brute_force(q, keys, count, k):
    """Brute force: all scores, masked, one torch.topk (what every exact search must equal)."""
    s = q @ keys.transpose(-1, -2)                                       # (B, H, T, C)
    slot = torch.arange(keys.shape[2])
    s = s.masked_fill((slot[None, :] >= count[:, None])[:, None, None, :], float("-inf"))
    return s.topk(k, dim=-1), s


def assert_same_top_k(got, want, full, k):
    """Scores equal (sorted; to float rounding: a matmul of another shape may add in another order); each index
    holds its score; no index twice (indices may differ only among ties)."""
    (gs, gi), (ws, _) = got, want
    torch.testing.assert_close(gs.sort(-1, descending=True).values, ws, atol=1e-5, rtol=0)
    finite = torch.isfinite(gs)
    assert torch.equal(finite.sum(-1), torch.isfinite(ws).sum(-1))
    torch.testing.assert_close(full.gather(-1, gi)[finite], gs[finite], atol=1e-5, rtol=0)
    rows = gi.reshape(-1, k)
    ok = finite.reshape(-1, k)
    for row, m in zip(rows, ok):
        assert len(set(row[m].tolist())) == int(m.sum())


@pytest.mark.parametrize("C, k, chunk, cache_bytes", [(4096, 8, 8192, 2**22), (4096, 32, 1000, 2**16),
                                                      (2048, 5, 512, 1), (8192, 32, 8192, 2**22)])
@pytest.mark.parametrize("ties", [False, True])
def test_exact_search_equals_brute_force(C, k, chunk, cache_bytes, ties):
    g = torch.Generator().manual_seed(C + k)
    B, H, T, Dh = 3, 2, 5, 8
    if ties:                                                              # many exact ties
        q = torch.randint(-2, 3, (B, H, T, Dh), generator=g).float()
        keys = torch.randint(-1, 2, (B, H, C, Dh), generator=g).float()
    else:
        q, keys = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, C, Dh, generator=g)
    count = torch.tensor([C, C // 3 + 1, 3])                              # full, partly filled, fewer than k
    want, full = brute_force(q, keys, count, k)
    for scratch in (None, Scratch()):
        got = torch_search(q, keys, count, k=k, chunk=chunk, scratch=scratch, cache_bytes=cache_bytes)
        assert_same_top_k(got, want, full, k)
        if not ties:                                                       # continuous data: indices too
            order = got[0].sort(-1, descending=True).indices
            finite = torch.isfinite(want[0])
            assert torch.equal(got[1].gather(-1, order)[finite], want[1][finite])
        missing = ~torch.isfinite(got[0])
        assert bool((got[1][missing] == 0).all())


def test_scratch_is_reused_and_per_thread():
    import threading
    s = Scratch()
    like = torch.zeros(1)
    a = s.take((4, 8), like=like)
    b = s.take((2, 3), like=like)
    assert a.data_ptr() == b.data_ptr()                                   # no new buffer for a smaller one
    other = []
    t = threading.Thread(target=lambda: other.append(s.take((2, 3), like=like).data_ptr()))
    t.start()
    t.join()
    assert other[0] != a.data_ptr()


# -- the ring written in place ------------------------------------------------------------------
def copy_on_write(state: KNNState, keys, values) -> KNNState:
    """The write before issue 22: a new tensor per write (scatter), the old state untouched."""
    C, T = state.capacity, keys[0].shape[2]
    written = state.written
    if T > C:
        keys, values = [x[:, :, -C:] for x in keys], [x[:, :, -C:] for x in values]
        written, T = written + (T - C), C
    B, G, _, Dh = keys[0].shape
    slot = ((written.view(B, 1) + torch.arange(T)) % C).view(B, 1, T, 1).expand(B, G, T, Dh)
    return KNNState(keys=tuple(o.scatter(2, slot, x) for o, x in zip(state.keys, keys)),
                    values=tuple(o.scatter(2, slot, x) for o, x in zip(state.values, values)), written=written + T)


def test_in_place_ring_equals_copy_on_write():
    mem = KNNMemory(config=KNNConfig(capacity=12, k=2, layers=[0, 1]), n_layers=2, n_heads=2, head_dim=3)
    fast = mem.init(3, device="cpu", dtype=torch.float32)
    slow = mem.init(3, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for step, T in enumerate((5, 7, 1, 12, 9, 30, 4, 11)):               # wraps, a write longer than C
        if step == 3:                                                      # lanes now at different places
            drop = torch.tensor([False, True, False])
            fast, slow = fast.reset(drop), slow.reset(drop)
        ks = [torch.randn(3, 2, T, 3, generator=g) for _ in range(2)]
        vs = [torch.randn(3, 2, T, 3, generator=g) for _ in range(2)]
        fast, slow = mem.write(fast, ks, vs), copy_on_write(slow, ks, vs)
        assert torch.equal(fast.written, slow.written)
        for a, b in zip(fast.keys + fast.values, slow.keys + slow.values):
            assert torch.equal(a, b)


def test_an_older_state_is_rebuilt_from_undo_records_or_raises_and_clone_keeps_a_copy():
    model = spread_weights(MemoryLM(_cfg(capacity=16)), seed=0).eval()
    x = _tokens(2, 32)
    fresh = model.init_state(2)
    s1 = model(x[:, :8], state=fresh).state
    assert float(fresh.knn.keys[0].abs().sum()) == 0.0                   # a state of its own is copied, not written
    kept = s1.clone()
    s2 = model(x[:, 8:16], state=s1).state                               # s1's ring written in place
    assert s2.knn.ring is s1.knn.ring and s2.knn.keys[0].data_ptr() == s1.knn.keys[0].data_ptr()
    assert not s1.knn.current
    again = model(x[:, 8:16], state=s1)                                  # fed twice: rebuilt from the undo record
    ref = model(x[:, 8:16], state=kept.clone())
    torch.testing.assert_close(again.logits, ref.logits, atol=0, rtol=0)
    assert all(torch.equal(p, q) for p, q in zip(again.state.knn.keys + again.state.knn.values,
                                                 s2.knn.keys + s2.knn.values))
    d = s1.state_dict()                                                  # saved as it was
    cleared = s1.reset(torch.tensor([False, True]))                      # reset reads s1 as it was too
    assert torch.equal(cleared.knn.keys[0][0], kept.knn.keys[0][0]) and float(cleared.knn.keys[0][1].abs().sum()) == 0
    assert all(torch.equal(d[f"knn.keys.{i}"], k) for i, k in enumerate(kept.knn.keys))
    s3 = model(x[:, 16:24], state=s2).state
    s4 = model(x[:, 24:], state=s3).state                                # the undo records (C / 4) reach back one write
    assert s4.knn.ring is s2.knn.ring
    with pytest.raises(ValueError, match="used up"):
        model(x[:, 16:24], state=s2)
    torch.testing.assert_close(model(x[:, 16:24], state=s3).logits, model(x[:, 16:24], state=s3.clone()).logits)
    a = model(x[:, 8:16], state=kept).state                              # the copy is still s1
    b = again.state.knn                                                  # s2, in a ring of its own
    assert all(torch.equal(p, q) for p, q in zip(a.knn.keys + a.knn.values, b.keys + b.values))


def test_checkpoint_round_trip_is_unchanged_by_later_writes():
    model = spread_weights(MemoryLM(_cfg(capacity=16)), seed=0).eval()
    x = _tokens(2, 40)
    state = model(x[:, :24]).state
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    d = state.state_dict()
    later = model(x[:, 24:32], state=state).state                        # writes the ring in place
    assert all(torch.equal(d[k], saved[k]) for k in saved)                # what was handed out stays as it was
    back = State.from_state_dict(saved)
    a = model(x[:, 32:], state=back).logits
    b = model(x[:, 32:], state=State.from_state_dict(saved)).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = model(x[:, 32:], state=later).logits
    assert (a - c).abs().max() > 0                                        # later really went on


# -- persistent faiss indexes -------------------------------------------------------------------
def _cfg(*, capacity: int, backend: str = "torch", index: str = "flat", k: int = 4, **extra):
    cfg = tiny_config(kind="knn", mem_len=0, segment_len=8)
    cfg.memory = MemoryConfig(kind="knn", mem_len=0, knn=KNNConfig(k=k, capacity=capacity, layers=[1], chunk=16,
                                                                   backend=backend, index=index, **extra))
    return cfg


def _tokens(b: int, n: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def test_faiss_flat_index_is_persistent_and_equals_torch_after_wrap_around(monkeypatch):
    pytest.importorskip("faiss")
    exact = spread_weights(MemoryLM(_cfg(capacity=20)), seed=0).eval()
    flat = spread_weights(MemoryLM(_cfg(capacity=20, backend="faiss")), seed=0).eval()
    built = []
    real = LaneIndexes.__init__

    def counting(self, *a, **kw):
        built.append(1)
        real(self, *a, **kw)
    monkeypatch.setattr(LaneIndexes, "__init__", counting)
    x = _tokens(2, 96)
    se = sf = None
    for start in range(0, 96, 8):                                         # 12 calls: the ring wraps 4 times
        reset = torch.tensor([start == 48, False])                        # a reset lane mid-stream
        oe = exact(x[:, start:start + 8], state=se, reset=reset)
        of = flat(x[:, start:start + 8], state=sf, reset=reset)
        torch.testing.assert_close(of.logits, oe.logits, atol=1e-5, rtol=0)
        se, sf = oe.state, of.state
    assert len(built) == 2                                                # the first call, then once after the reset


@pytest.mark.parametrize("index, floor", [("ivf", 0.8), ("hnsw", 0.9)])
def test_faiss_approximate_index_recall_after_fifo_eviction(index, floor):
    pytest.importorskip("faiss")
    C, Dh, k = 400, 16, 10
    mem = KNNMemory(config=KNNConfig(capacity=C, k=k, layers=[0], backend="faiss", index=index, nprobe=8),
                    n_layers=1, n_heads=1, head_dim=Dh)
    state = mem.init(2, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ix = mem.indexes_of(state)
    for T in (150, 150, 150, 150, 37, 150):                               # 787 entries: wrapped, FIFO evicted
        new = F.normalize(torch.randn(2, 1, T, Dh, generator=g), dim=-1)
        state = mem.write(state, [new], [new], indexes=ix)
        ix = mem.indexes_of(state)
        assert ix is state.ring.index                                     # updated, not rebuilt
    q = F.normalize(torch.randn(2, 1, 64, Dh, generator=g), dim=-1)
    _, got = ix.search(0, q, k=k)
    _, want = torch_search(q, state.keys[0], state.count(), k=k)
    recall = sum(len(set(a) & set(b)) for a, b in zip(got.view(-1, k).tolist(), want.view(-1, k).tolist()))
    recall /= got.numel()
    assert recall >= floor, recall
    assert bool((got < C).all())
    # the evicted entries are gone from the indexes: every id found is one of the C newest entries
    for lane in ix.indexes[0]:
        for f in lane:
            assert f.low == 787 - C


def test_faiss_indexes_are_not_saved_and_are_rebuilt_from_the_store():
    pytest.importorskip("faiss")
    model = spread_weights(MemoryLM(_cfg(capacity=20, backend="faiss", index="hnsw")), seed=0).eval()
    x = _tokens(2, 48)
    state = model(x[:, :32]).state
    d = state.state_dict()
    assert not any("index" in key for key in d) and all(isinstance(v, torch.Tensor) for v in d.values())
    a = model(x[:, 32:], state=State.from_state_dict({k: v.clone() for k, v in d.items()})).logits
    b = model(x[:, 32:], state=state).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)                    # hnsw at this size finds the same


def test_index_options_are_checked():
    with pytest.raises(ValueError, match="nprobe"):
        KNNConfig(nprobe=0)
    assert knn_mod.FifoIndex.__doc__


def test_the_search_scores_used_without_gradient_equal_the_recomputed_ones():
    # evaluation reads the search's scores; training recomputes them from the retrieved keys (for the gradient)
    model = spread_weights(MemoryLM(_cfg(capacity=24, k=6)), seed=2).eval()
    x = _tokens(2, 48, seed=4)
    with torch.no_grad():
        fast = model(x).logits
    with torch.enable_grad():
        slow = model(x).logits
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_bf16_autocast_trains_and_searches_in_the_store_dtype(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    model = spread_weights(MemoryLM(_cfg(capacity=32, backend=backend)), seed=0)
    x = _tokens(2, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, targets=x)
        out.loss.backward()
        again = model(x, state=out.state.detach())
    assert torch.isfinite(out.loss) and again.state.knn.keys[0].dtype == torch.float32
    assert model.knn.gate[0].grad is not None
