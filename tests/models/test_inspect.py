"""Inspection of the memory: the attention probabilities recomputed for tracing equal what SDPA weighs,
tracing changes nothing, the summaries add up, the kNN entries retrieved map to the right tokens (also
after the ring wraps), and ``POST /v1/inspect`` reports all of it as JSON, leaving a session untouched."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from longmem.data.tokenizer import ByteTokenizer
from longmem.generation.decoding import Decoder
from longmem.generation.generate import TextStream
from longmem.generation.inspect import inspect_text
from longmem.generation.processors import SamplingConfig
from longmem.models import MemoryLM
from longmem.models.attention import attention_probs, prefix_mask
from longmem.models.inspect import distance_bin, trace

from conftest import make_tiny_run, spread_weights, tiny_config

pytestmark = [pytest.mark.invariant, pytest.mark.usefixtures("one_thread")]
TEXT = "The passkey is 4711. The grass is green. The grass is green. The passkey is"


@pytest.mark.parametrize("T,M,G", [(5, 0, 2), (5, 7, 2), (1, 7, 1), (4, 6, 1)])
def test_recomputed_attention_probabilities_are_those_sdpa_weighs(T, M, G):
    g = torch.Generator().manual_seed(0)
    B, H, Dh = 2, 2, 8
    q, k, v = (torch.randn(B, n, L, Dh, generator=g) for n, L in ((H, T), (G, M + T), (G, M + T)))
    mask = prefix_mask(torch.tensor([M, max(M - 3, 0)]), M, T) if M and T > 1 else None
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and M == 0,
                                       enable_gqa=G != H)
    p = attention_probs(q, k, mask)                                                # (B, H, T, M + T)
    torch.testing.assert_close(p @ v.repeat_interleave(H // G, dim=1), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, H, T))


def test_distance_bins_are_powers_of_two():
    assert distance_bin(torch.tensor([0, 1, 2, 3, 4, 7, 8, 1000])).tolist() == [0, 1, 2, 2, 3, 3, 4, 10]


@pytest.mark.parametrize("kind", ["xl", "knn", "tokens", "sinks", "none"])
def test_tracing_changes_nothing_and_its_masses_add_up(kind, monkeypatch):
    model = spread_weights(MemoryLM(tiny_config(kind=kind, mem_len=0 if kind == "none" else 16))).eval()
    x = torch.randint(0, 37, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        with trace(model) as tracer:
            out = model(x)
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    for a, b in zip(out.state.state_dict().values(), ref.state.state_dict().values()):
        assert torch.equal(a, b)
    assert [s.n_tokens for s in tracer.segments] == [8, 8, 8, 6] and model.tracer is None
    for s in tracer.segments:
        for i in (0, 1):
            torch.testing.assert_close(s.mass[i].sum(-1), torch.ones(2, s.n_tokens), atol=1e-5, rtol=0)
            torch.testing.assert_close(s.by_distance[i].sum(-1), s.mass[i][..., 0] + s.mass[i][..., 2], atol=1e-5,
                                       rtol=0)
    assert (tracer.segments[-1].mass[0][..., 0] > 0).all() == (kind != "none")      # the memory is attended to
    assert (tracer.segments[-1].mass[0][..., 1] > 0).all() == (kind == "tokens")    # memory tokens read
    # untraced, nothing asks for the probabilities (the kNN and cache hooks do not)
    monkeypatch.setattr("longmem.models.attention.attention_probs", lambda *a: pytest.fail("computed untraced"))
    with torch.no_grad():
        model(x)


def knn_model(*, capacity: int, k: int = 32) -> MemoryLM:
    cfg = tiny_config(kind="knn", mem_len=8, vocab_size=256)
    cfg.memory.knn.capacity, cfg.memory.knn.k = capacity, k
    return spread_weights(MemoryLM(cfg)).eval()


@pytest.mark.parametrize("capacity", [1000, 16])
def test_knn_entries_retrieved_are_the_tokens_stored_before_the_segment(capacity):
    """While at most k entries are stored every one is retrieved: the positions reported must be exactly the
    tokens of the earlier segments, or once the ring of ``capacity`` wrapped, the last ``capacity`` of them."""
    out = inspect_text(Decoder(knn_model(capacity=capacity)), ByteTokenizer(), "x" * 5 + TEXT, top=32)
    knn, T = out["knn"], 8
    assert knn["layers"] == [1] and knn["offset"] == 0 and len(knn["retrieved"]) == len(out["tokens"])
    for t, row in enumerate(knn["retrieved"]):
        start = t - t % T                                                # the segment's first token
        stored = list(range(max(0, start - capacity), start))
        for head in row[0]:
            if len(stored) <= 32:
                assert sorted(p for p, _, _ in head) == stored, (t, head)
            assert all(0 <= p < start for p, _, _ in head) and sum(w for _, _, w in head) <= 1 + 1e-3
    assert all(0 < g < 1 for g in knn["gate"][0])


def test_inspect_text_after_a_state_reports_earlier_entries_as_negative_positions():
    model = knn_model(capacity=1000)
    decoder, tok = Decoder(model), ByteTokenizer()
    before = TextStream(model, tok, "abcdefghij", sampling=SamplingConfig(max_new_tokens=3, temperature=0.0),
                        decoder=decoder)
    list(before)
    saved = {k: v.clone() for k, v in before.state.state_dict().items()}
    out = inspect_text(decoder, tok, "more text", state=before.state, top=32)
    assert out["knn"]["offset"] == 13                                   # 10 prompt tokens + 3 answered
    assert {p for p, _, _ in out["knn"]["retrieved"][0][0][0]} == set(range(-13, 0))
    for k, v in before.state.state_dict().items():                      # read, not changed
        assert torch.equal(v, saved[k])


def test_memory_tokens_report_their_change_per_segment_and_the_unwritten_one(tmp_path):
    run = make_tiny_run(tmp_path / "RUN", kind="tokens", mem_len=16)
    out = inspect_text(Decoder(run.model), run.tokenizer, "y" * 20)
    mt = out["memory_tokens"]
    assert [s["start"] for s in mt["segments"]] == [0, 8, 16] and [s["written"] for s in mt["segments"]] == [
        True, True, False]
    assert mt["n_tokens"] == 8 and all(len(s["change"]) == 8 and min(s["change"]) > 0 for s in mt["segments"])
    assert out["knn"] is None and [s["length"] for s in out["segments"]] == [8, 8, 4]


# -- the JSON endpoint ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def knn_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("inspect") / "KNN", kind="knn", mem_len=16)


def test_the_inspect_endpoint_reports_tokens_attention_and_retrieval_and_leaves_the_session(knn_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from longmem.serving.config import ServeConfig
    from longmem.serving.server import create_app
    greedy = {"max_tokens": 6, "temperature": 0}
    with TestClient(create_app(knn_run, ServeConfig(sessions_dir=str(tmp_path), max_inspect_tokens=100))) as c:
        r = c.post("/v1/inspect", json={"text": TEXT, "top": 3})
        assert r.status_code == 200, r.text
        out = r.json()
        assert "".join(t["text"] for t in out["tokens"]) == TEXT and out["memory"] == "knn"
        assert out["layers"] == [0, 1] and out["bins"][:3] == ["0", "1", "2-3"]
        n = len(TEXT)
        for key in ("memory", "added", "segment", "by_distance"):
            assert len(out["attention"][key]) == 2 and len(out["attention"][key][1]) == n
        assert out["attention"]["memory"][0][:8] == [0.0] * 8 and out["attention"]["memory"][0][8] > 0
        assert len(out["knn"]["retrieved"]) == n and all(len(h) <= 3 for h in out["knn"]["retrieved"][-1][0])
        assert c.post("/v1/inspect", json={"text": TEXT, "layers": [1]}).json()["layers"] == [1]
        # a session's memory is read and left as it was: its next answer is the one it would have given
        c.post("/v1/completions", json={"prompt": "abc", "session": "s", **greedy})
        assert [s["session"] for s in c.get("/v1/sessions").json()["data"]] == ["s"]
        after = c.post("/v1/inspect", json={"text": "more", "session": "s"}).json()
        assert after["knn"]["offset"] == 9 and min(p for p, _, _ in after["knn"]["retrieved"][0][0][0]) < 0
        nxt = c.post("/v1/completions", json={"prompt": "def", "session": "s", **greedy}).json()
        for path, body, status, match in (
                ("/v1/inspect", {"text": "x", "session": "nobody"}, 404, "no session named 'nobody'"),
                ("/v1/inspect", {"text": "x" * 101}, 413, "at most 100 tokens"),
                ("/v1/inspect", {"text": "x", "layers": [5]}, 400, r"layers must be in \[0, 2\)"),
                ("/v1/inspect", {"text": ""}, 400, "'text'"),
                ("/v1/inspect", {"text": "x", "top": 0}, 400, "'top'")):
            r = c.post(path, json=body)
            assert r.status_code == status and re.search(match, r.json()["error"]["message"]), r.text
        page = c.get("/inspect")
        assert page.status_code == 200 and "/v1/inspect" in page.text and page.headers["content-type"].startswith(
            "text/html")
    s1 = TextStream(knn_run.model, knn_run.tokenizer, "abc", sampling=SamplingConfig(max_new_tokens=6, temperature=0))
    list(s1)
    s2 = TextStream(knn_run.model, knn_run.tokenizer, "def", sampling=SamplingConfig(max_new_tokens=6, temperature=0),
                    state=s1.state)
    list(s2)
    assert nxt["choices"][0]["text"] == s2.text
