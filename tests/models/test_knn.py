"""kNN long-term memory: exact search vs brute force, faiss vs torch, the gated layer
against the local-only model, FIFO eviction, lane isolation, state round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch

from longmem import State
from longmem.config import KNNConfig, MemoryConfig, RunConfig
from longmem.models import MemoryLM
from longmem.models.memory.knn import KNNMemory, faiss_search, resolve_knn_layers, topk, torch_search

from conftest import spread_weights, tiny_config

pytestmark = pytest.mark.invariant

V = 37


def knn_model(*, seed: int = 0, mem_len: int = 0, capacity: int = 64, k: int = 4, normalize: bool = True,
              layers=(1,), segment_len: int = 8) -> MemoryLM:
    cfg = tiny_config(kind="knn", mem_len=mem_len, segment_len=segment_len)
    cfg.memory = MemoryConfig(kind="knn", mem_len=mem_len, knn=KNNConfig(k=k, capacity=capacity, normalize=normalize,
                                                                         layers=list(layers), chunk=16))
    return spread_weights(MemoryLM(cfg), seed=seed).eval()


def tokens(b: int, n: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def brute_force(q, keys, count, k):
    s = q @ keys.transpose(-1, -2)                                       # (B, H, T, C)
    slot = torch.arange(keys.shape[2])
    s = s.masked_fill((slot[None, :] >= count[:, None])[:, None, None, :], float("-inf"))
    return s.topk(k, dim=-1)


def by_score(s, i):
    """Search results in descending score order (the search returns them in no particular order)."""
    s, order = s.sort(dim=-1, descending=True, stable=True)
    return s, i.gather(-1, order)


# -- search ------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_torch_search_equals_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    B, H, T, C, Dh, k = 3, 2, 6, 40, 8, 7
    q, keys = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, C, Dh, generator=g)
    count = torch.tensor([40, 23, 9])
    s, i = by_score(*torch_search(q, keys, count, k=k, chunk=chunk))
    bs, bi = brute_force(q, keys, count, k)
    torch.testing.assert_close(s, bs, atol=1e-5, rtol=0)
    assert torch.equal(i, bi)                                            # continuous data: no ties
    assert bool((i < count.view(B, 1, 1, 1)).all())


@pytest.mark.parametrize("n, k", [(1024, 8), (4096, 32), (960, 5)])
def test_block_topk_equals_topk(n, k):
    # the two-stage top-k over blocks (long rows) must return exactly the k largest, ties and -inf included
    g = torch.Generator().manual_seed(n)
    s = torch.randint(-40, 40, (3, 5, n), generator=g).float()           # many exact ties
    s[0, :, n // 3:] = float("-inf")                                      # a partly filled ring
    s[1, 0, :] = float("-inf")
    got, idx = topk(s, k)
    want, _ = s.topk(k, dim=-1)
    assert torch.equal(got.sort(-1, descending=True).values, want)
    assert torch.equal(s.gather(-1, idx), got)                            # each index holds its score
    finite = torch.isfinite(got)
    for row, ok in zip(idx.view(-1, k), finite.view(-1, k)):             # no finite entry twice
        assert len(set(row[ok].tolist())) == int(ok.sum())


def test_torch_search_with_ties_and_short_lanes():
    # integer keys with many exact duplicates: scores must match, indices may differ only among ties
    g = torch.Generator().manual_seed(1)
    B, H, T, C, Dh, k = 2, 2, 5, 30, 4, 6
    q = torch.randint(-2, 3, (B, H, T, Dh), generator=g).float()
    keys = torch.randint(-1, 2, (B, H, C, Dh), generator=g).float()
    count = torch.tensor([30, 3])                                        # lane 1 holds fewer than k
    s, i = by_score(*torch_search(q, keys, count, k=k, chunk=7))
    bs, _ = brute_force(q, keys, count, k)
    assert torch.equal(s, bs)
    full = q @ keys.transpose(-1, -2)
    got = full.gather(-1, i)
    valid = torch.isfinite(s)
    assert torch.equal(got[valid], s[valid])                             # each index has its score
    assert int(valid[1].sum(-1).max()) == 3 and bool(valid[0].all())
    for b in range(B):                                                   # no entry returned twice
        for h in range(H):
            for t in range(T):
                idx = i[b, h, t][valid[b, h, t]].tolist()
                assert len(set(idx)) == len(idx) and max(idx) < int(count[b])


def test_faiss_flat_equals_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    B, H, T, C, Dh, k = 2, 3, 7, 50, 16, 8
    q, keys = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, C, Dh, generator=g)
    count = torch.tensor([50, 5])
    s, i = faiss_search(q, keys, count, k=k, index="flat")
    ts, ti = by_score(*torch_search(q, keys, count, k=k))
    torch.testing.assert_close(s, ts, atol=1e-4, rtol=0)
    assert torch.equal(i, ti)


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_faiss_approximate_recall(index):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    B, H, T, C, Dh, k = 1, 1, 50, 2000, 16, 10
    q, keys = torch.randn(B, H, T, Dh, generator=g), torch.randn(B, H, C, Dh, generator=g)
    count = torch.tensor([C])
    _, i = faiss_search(q, keys, count, k=k, index=index)
    _, ti = torch_search(q, keys, count, k=k)
    recall = sum(len(set(a) & set(b)) for a, b in zip(i[0, 0].tolist(), ti[0, 0].tolist())) / (T * k)
    assert recall >= 0.8, recall


# -- store: eviction, reset -----------------------------------------------------
def test_fifo_eviction_keeps_the_newest_entries_in_order():
    mem = KNNMemory(config=KNNConfig(capacity=10, k=2, layers=[0]),
                    n_layers=1, n_heads=1, head_dim=1)
    state = mem.init(2, device="cpu", dtype=torch.float32)
    counter = 0
    for T in (4, 4, 4, 13):                                              # the last write is longer than C
        e = torch.arange(counter, counter + T, dtype=torch.float32).view(1, 1, T, 1).expand(2, 1, T, 1)
        state = mem.write(state, [e], [-e])
        counter += T
        n = min(counter, 10)
        assert state.written.tolist() == [counter, counter]
        assert state.count().tolist() == [n, n]
        stored = state.keys[0][0, 0, :, 0]                              # entry number e sits in slot e % C
        expect = sorted(range(counter - n, counter))
        assert sorted(stored[:n].tolist()) == expect
        for e_num in expect:
            assert stored[e_num % 10].item() == e_num
            assert state.values[0][0, 0, e_num % 10, 0].item() == -e_num


def test_reset_clears_only_masked_lanes():
    model = knn_model()
    state = model(tokens(2, 24)).state
    cleared = state.reset(torch.tensor([True, False]))
    assert cleared.knn.written.tolist() == [0, 24]
    assert float(cleared.knn.keys[0][0].abs().sum()) == 0.0
    assert torch.equal(cleared.knn.keys[0][1], state.knn.keys[0][1])


# -- the layer ------------------------------------------------------------------
def _copy_weights(src: MemoryLM, dst: MemoryLM) -> None:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not missing and unexpected and all(name.startswith("knn.") for name in unexpected)


@pytest.mark.parametrize("mem_len", [0, 16])
def test_gate_forced_closed_reproduces_the_local_only_model(make_model, mem_len):
    x = tokens(2, 40)
    knn = knn_model(mem_len=mem_len)
    local = make_model(kind="xl", mem_len=mem_len)
    _copy_weights(knn, local)
    with torch.no_grad():
        for g in knn.knn.gate:
            g.fill_(-math.inf)                                           # sigmoid(-inf) = 0: memory off
    torch.testing.assert_close(knn(x).logits, local(x).logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        for g in knn.knn.gate:
            g.fill_(0.0)                                                 # open: later segments must differ
    open_logits = knn(x).logits
    torch.testing.assert_close(open_logits[:, :8], local(x).logits[:, :8], atol=1e-5, rtol=0)  # empty memory
    assert (open_logits[:, 8:] - local(x).logits[:, 8:]).abs().max() > 1e-2


def test_a_segment_never_retrieves_itself():
    """With one segment per call the logits of a segment depend only on earlier segments' entries:
    a fresh state gives the local-only result whatever the segment holds."""
    model = knn_model()
    x = tokens(1, 8)
    with torch.no_grad():
        first = model(x).logits
        for g in model.knn.gate:
            g.fill_(-math.inf)
        closed = model(x).logits
    torch.testing.assert_close(first, closed, atol=1e-6, rtol=0)


def test_pieces_equal_one_call():
    model = knn_model(mem_len=8)
    x = tokens(2, 48)
    full = model(x).logits
    state, logits = None, []
    for start in range(0, 48, 16):                                       # whole segments per call
        out = model(x[:, start:start + 16], state=state)
        state, logits = out.state, logits + [out.logits]
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=0)


def test_lanes_never_see_each_others_entries():
    model = knn_model(mem_len=8)
    x = tokens(2, 56)
    both = model(x).logits
    for b in range(2):
        alone = model(x[b:b + 1]).logits
        torch.testing.assert_close(both[b:b + 1], alone, atol=1e-5, rtol=0)
    # and a reset lane behaves like a fresh model while the other keeps its memory
    state = model(x[:, :32]).state
    out = model(x[:, 32:], state=state, reset=torch.tensor([True, False]))
    torch.testing.assert_close(out.logits[0:1], model(x[0:1, 32:]).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[1:2], both[1:2, 32:], atol=1e-5, rtol=0)


def test_state_round_trip_detach_and_gradients():
    model = knn_model(mem_len=8).train()
    x = tokens(2, 24)
    out = model(x, targets=x)
    out.loss.backward()
    assert model.knn.gate[0].grad is not None and float(model.knn.gate[0].grad.abs().sum()) > 0
    state = out.state.detach()
    assert not any(t.requires_grad for t in state.knn.keys + state.knn.values)
    model.eval()
    again = State.from_state_dict({k: v.clone() for k, v in state.state_dict().items()})
    assert again.parts() == ["xl", "knn"]
    y = tokens(2, 16, seed=5)
    torch.testing.assert_close(model(y, state=again).logits, model(y, state=state).logits, atol=0, rtol=0)


def test_knn_layers_resolution_and_errors():
    assert resolve_knn_layers(KNNConfig(), 12) == [9]
    assert resolve_knn_layers(KNNConfig(), 2) == [1]
    assert resolve_knn_layers(KNNConfig(layers=[-1, 0]), 4) == [0, 3]
    with pytest.raises(ValueError, match="knn.layers"):
        resolve_knn_layers(KNNConfig(layers=[4]), 4)
    with pytest.raises(ValueError, match="knn.capacity"):
        MemoryConfig(kind="knn", knn=KNNConfig(k=64, capacity=32))
    with pytest.raises(ValueError, match="knn.layers"):
        KNNConfig(layers=["top"])
    cfg = RunConfig().override({"memory.kind": "knn", "memory.knn.layers": "[1]", "memory.mem_len": "32",
                                "memory.knn.backend": "faiss"})
    assert cfg.memory.knn.layers == [1] and cfg.memory.mem_len == 32 and cfg.memory.knn.backend == "faiss"
    with pytest.raises(ValueError, match="accepted"), pytest.warns(FutureWarning, match="old name"):
        RunConfig().override({"memory.kind": "knn", "memory.knn_backend": "annoy"})      # an old key, checked too


def test_faiss_backend_in_the_model_matches_torch():
    pytest.importorskip("faiss")
    x = tokens(2, 32)
    a = knn_model()
    b = knn_model()
    b.knn.backend = "faiss"
    torch.testing.assert_close(a(x).logits, b(x).logits, atol=1e-4, rtol=0)


# -- end to end ----------------------------------------------------------------------
@pytest.mark.e2e
def test_cli_trains_with_knn_memory(tmp_path, capsys):
    from longmem.cli import main
    code = main(["train", "--config", "tiny", "--out", str(tmp_path / "RUN"),
                 "--train.progress", "false", "--memory.kind", "knn", "--memory.knn.capacity", "256",
                 "--memory.knn.k", "8", "--train.max_steps", "15", "--data.val_fraction", "0.03"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "RUN/metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert len(losses) == 3 and losses[0] > losses[-1] + 0.3 and all(math.isfinite(v) for v in losses)
    cfg = RunConfig.load(tmp_path / "RUN/config.yaml")
    assert cfg.memory.kind == "knn" and cfg.memory.knn.capacity == 256
    model = MemoryLM(cfg.model)                                         # the saved weights include the gates
    from longmem.training.checkpoint import load_weights
    load_weights(model, tmp_path / "RUN/model.safetensors")
    assert model.knn is not None and float(model.knn.gate[0].detach().abs().sum()) > 0
