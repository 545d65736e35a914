"""Retrieval of evicted keys/values (kind retrieval, InfLLM-style, no training): with every block retrieved it
is exactly full attention; positions stay inside its packed context however long the stream; the best-
matching block is chosen; lanes are independent, a reset lane is fresh, and the state round-trips."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from longmem import State
from longmem.config import MemoryConfig, RetrievalConfig
from longmem.models import MemoryLM

from conftest import feed_pieces, random_tokens, tiny_llama

pytestmark = pytest.mark.invariant

V = 37


def gqa_model(*, kind="retrieval", segment_len=16, window=24, sinks=3, block=8, top_k=32, capacity=256,
              n_layers=2, seed=0, **search) -> MemoryLM:
    """A tiny Llama-style model (GQA 4/2 heads, SwiGLU, untied head) with the retrieval memory; ``search``:
    memory.retrieval.backend and index."""
    memory = (MemoryConfig(kind=kind, mem_len=window, n_sinks=sinks,
                           retrieval=RetrievalConfig(block_size=block, top_k=top_k, capacity=capacity, **search))
              if kind == "retrieval" else MemoryConfig())
    return tiny_llama(memory, segment_len=segment_len, n_layers=n_layers, seed=seed)


tokens, feed = random_tokens, feed_pieces


def with_store(state, store, *, written):
    """``state`` (a retrieval state of one lane) with layer 0's stored keys ``store`` and ``written`` entries."""
    import dataclasses
    return dataclasses.replace(state, store_k=(store,) + state.store_k[1:], written=torch.tensor([written]))


@pytest.mark.parametrize("piece", [16, 7, 1])
def test_every_block_retrieved_equals_full_attention(piece):
    model = gqa_model()
    full = gqa_model(kind="none", segment_len=200)
    full.load_state_dict(model.state_dict())
    x = tokens(2, 200)
    with torch.no_grad():
        got, state = feed(model, x, piece)
        torch.testing.assert_close(got, full(x).logits, atol=1e-4, rtol=0)
    assert state.retrieval.written.tolist() == [168, 168]                   # whole blocks went to the store
    assert state.retrieval.n_sink.tolist() == [3, 3] and 24 <= int(state.retrieval.valid[0]) <= 31


def test_fewer_blocks_than_stored_differs_but_stays_close_to_the_window_model():
    x = tokens(1, 200)
    with torch.no_grad():
        few = gqa_model(top_k=2)(x).logits
        full = gqa_model()(x).logits
    assert (few - full).abs().max() > 1e-3                                 # it really chooses
    assert torch.isfinite(few).all()


def test_positions_stay_inside_the_packed_context_over_a_long_stream():
    model = gqa_model(segment_len=64, window=32, block=16, top_k=2, capacity=256, n_layers=1)
    model.rope.max_position_seen = -1
    x = tokens(1, 100_000, seed=3)                                          # issue 21: over 100K tokens
    with torch.no_grad():
        out, state = feed(model, x, 1024)                                   # 64-token segments inside
    assert torch.isfinite(out).all()
    bound = model.retrieval.context_len + 64
    assert model.rope.max_position_seen < bound == 3 + 2 * 16 + 47 + 64
    assert int(state.retrieval.written[0]) > 99_000                         # the ring wrapped (FIFO) ~390 times


def test_the_block_holding_the_best_match_is_chosen():
    mem = gqa_model().retrieval
    g = torch.Generator().manual_seed(0)
    store = torch.randn(1, 2, 256, 8, generator=g) * 0.1
    needle = torch.randn(2, 8, generator=g)
    store[0, :, 8 * 13 + 5] = needle * 3                                   # in block 13
    q = needle.view(1, 2, 1, 1, 8).expand(1, 2, 2, 4, 8).reshape(1, 4, 4, 8)   # every query head asks for it
    top, n = mem.select(q, store, written=torch.tensor([200]))             # 25 blocks held
    assert 13 in top[0].tolist() and n.tolist() == [25]
    assert top[0].tolist() == sorted(top[0].tolist())                      # stream order
    top, n = mem.select(q, store, written=torch.tensor([64]))              # block 13 not written yet
    assert 13 not in top[0, :int(n[0])].tolist() and n.tolist() == [8]


def test_lanes_are_independent_and_a_reset_lane_is_fresh():
    model = gqa_model(top_k=3)
    a, b = tokens(1, 120, seed=4), tokens(1, 120, seed=5)
    with torch.no_grad():
        both, state = feed(model, torch.cat([a, b]), 16)
        alone, _ = feed(model, b, 16)
        torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
        y = tokens(2, 40, seed=6)
        reset = model(y, state=state, reset=torch.tensor([True, False])).logits
        torch.testing.assert_close(reset[:1], model(y[:1]).logits, atol=1e-5, rtol=0)


def test_state_round_trips_through_safetensors():
    model = gqa_model(top_k=3)
    with torch.no_grad():
        state = model(tokens(2, 100)).state
        back = State.from_state_dict(st_load(st_save(state.state_dict())))
        assert back.parts() == ["retrieval"]
        y = tokens(2, 20, seed=9)
        torch.testing.assert_close(model(y, state=back).logits, model(y, state=state).logits, atol=0, rtol=0)


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_faiss_picks_blocks_of_the_torch_scores_and_keeps_one_index_per_store(monkeypatch, index):
    """Each query chunk fetches its k b best keys, which hold the exact top-k blocks: at every block search over
    a stream that wraps the ring (blocks leave the index first in, first out), with one lane reset halfway,
    the chosen blocks have the torch search's scores (ties may break differently: compared as sorted scores).
    The indexes are built once per state and then updated, never per call; a reset builds the reset lane's
    only, a state read from a file gets them all built again, and the state from before the reset (whose lanes
    moved on) builds its own. IVF here has one list (64 entries), so it is exact too."""
    pytest.importorskip("faiss")
    from longmem.models.memory import retrieval as R
    built, checked = [], []
    build, select = R.StoreIndexes.build, R.RetrievalMemory.select
    monkeypatch.setattr(R.StoreIndexes, "build", staticmethod(lambda *a, **k: (built.append(1), build(*a, **k))[1]))

    def both(self, q, store_k, written, index=None, layer=0):
        got = select(self, q, store_k, written, index, layer)
        if index is not None:
            want = select(self, q, store_k, written)
            scores = self.block_scores(self.query_chunks(q, store_k.shape[1]), store_k)
            for lane in range(q.shape[0]):
                n = int(got[1][lane])
                assert n == int(want[1][lane])
                torch.testing.assert_close(scores[lane, got[0][lane, :n]].sort().values,
                                           scores[lane, want[0][lane, :n]].sort().values, atol=1e-5, rtol=0)
            checked.append(1)
        return got
    monkeypatch.setattr(R.RetrievalMemory, "select", both)
    fast = gqa_model(top_k=2, capacity=64, backend="faiss", index=index)
    L = fast.config.n_layers
    with torch.no_grad():
        _, state = feed(fast, tokens(2, 150, seed=7), 16)
        assert len(built) == 2 * L                                                  # each lane, each layer
        before = state
        out = fast(tokens(2, 150, seed=8), state=state, reset=torch.tensor([True, False]))
        state = out.state
        assert len(built) == 3 * L and len(checked) > 30                            # the reset lane's only
        assert before.retrieval.index.written is None                               # its lanes moved on
        fast(tokens(2, 16, seed=10), state=before)                                  # ... so it builds its own
        assert len(built) == 5 * L
        assert int(state.retrieval.written[1]) > 64 > int(state.retrieval.written[0]) - 64   # lane 1 wrapped
        for lane, ix in enumerate(state.retrieval.index.indexes[0]):                # what each ring holds
            w = int(state.retrieval.written[lane])
            assert ix.index.ntotal == min(w, 64) and ix.low == max(0, w - 64)
        back = State.from_state_dict(st_load(st_save(state.state_dict())))
        fast(tokens(2, 32, seed=9), state=back)
        assert len(built) == 7 * L


def test_faiss_hnsw_finds_the_needle_block():
    pytest.importorskip("faiss")
    mem = gqa_model(top_k=2, backend="faiss", index="hnsw").retrieval
    g = torch.Generator().manual_seed(0)
    store = torch.randn(1, 2, 256, 8, generator=g) * 0.1
    needle = torch.randn(2, 8, generator=g)
    store[0, :, 8 * 13 + 5] = needle * 3                                   # in block 13
    state = with_store(mem.init(1, device="cpu", dtype=torch.float32), store, written=200)
    q = needle.view(1, 2, 1, 1, 8).expand(1, 2, 2, 4, 8).reshape(1, 4, 4, 8)
    top, n = mem.select(q, store, torch.tensor([200]), mem.indexes_of(state), 0)
    assert 13 in top[0].tolist() and n.tolist() == [2]


def test_an_unknown_search_backend_names_the_choices():
    with pytest.raises(ValueError, match="accepted: torch, faiss"):
        RetrievalConfig(backend="annoy")


def test_a_dropped_state_is_freed_at_once_without_the_cyclic_collector():
    """The segment's hooks and context readers are closures over the segment and the state: unless the model
    drops them, a store of gigabytes outlives its state until Python's cyclic collector runs (a 128K-token
    passkey cell held several stores at once: 12.5 GiB)."""
    import gc
    import weakref
    model = gqa_model(top_k=2)
    with torch.no_grad():
        out = model(tokens(1, 100))
    ref = weakref.ref(out.state.retrieval.store_k[0])
    gc.disable()
    try:
        del out
        assert ref() is None
    finally:
        gc.enable()
