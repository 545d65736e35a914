"""The serving engine without HTTP: concurrent submitters never mix sessions; the memory cap."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from longmem.generation.generate import TextStream
from longmem.generation.processors import SamplingConfig
from longmem.serving.config import ServeConfig
from longmem.serving.engine import Engine, QueueFull

from conftest import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("engine") / "RUN")


def sampling(seed: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=20, seed=seed)


def test_concurrent_clients_get_exactly_their_own_session(run, tmp_path):
    engine = Engine(run, ServeConfig(sessions_dir=str(tmp_path), max_live_sessions=2))   # evictions too
    answers = {i: [] for i in range(4)}

    def client(i):
        for k in range(3):
            job = engine.submit(f"c{i} says {k * 11 + i}. ", sampling(k), session=f"c{i}")
            answers[i].append(job.future.result(timeout=60).text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    for i in range(4):
        state = None
        for k in range(3):
            s = TextStream(run.model, run.tokenizer, f"c{i} says {k * 11 + i}. ", sampling=sampling(k), state=state)
            list(s)
            assert answers[i][k] == s.text, (i, k)
            state = s.state
        assert (tmp_path / f"c{i}.safetensors").is_file()


def test_a_session_over_the_memory_cap_is_cleared(run, tmp_path):
    engine = Engine(run, ServeConfig(sessions_dir=str(tmp_path), max_session_bytes=1000))
    done = engine.submit("a long enough prompt", sampling(0), session="big").future.result(timeout=60)
    small = Engine(run, ServeConfig(sessions_dir=str(tmp_path / "b")))
    kept = small.submit("a long enough prompt", sampling(0), session="big").future.result(timeout=60)
    engine.close()
    small.close()
    assert done.memory_reset and done.session["turns"] == 0 and done.session["memory_bytes"] == 0
    assert not kept.memory_reset and kept.session["memory_bytes"] > 1000


def test_batched_requests_of_different_sessions_equal_each_request_alone(run, tmp_path):
    """Lanes of different prompt lengths and sampling settings, joining and leaving at different steps (one
    streamed): every answer and every session's memory is bit for bit what the session alone gets."""
    settings = [SamplingConfig(max_new_tokens=9, temperature=0.9, top_k=20, seed=1),
                SamplingConfig(max_new_tokens=4, temperature=0.0),
                SamplingConfig(max_new_tokens=12, temperature=1.2, top_p=0.8, repetition_penalty=1.3, seed=2),
                SamplingConfig(max_new_tokens=7, temperature=0.7, stop=["e"], logit_bias={101: 3.0}, seed=3)]
    prompts = ["a", "a much longer prompt than that. ", "mid size. ", "xy"]
    engine = Engine(run, ServeConfig(sessions_dir=str(tmp_path), max_batch=4))
    widths = []
    step = engine.lanes.step
    engine.lanes.step = lambda tokens: (widths.append(len(tokens)), step(tokens))[1]
    pieces: list[str] = []
    answers = {}
    for rnd in range(2):
        jobs = [engine.submit(prompts[i] * (rnd + 1), settings[i], session=f"s{i}",
                              on_piece=pieces.append if i == 2 else None) for i in range(4)]
        answers.update({(i, rnd): job.future.result(timeout=60) for i, job in enumerate(jobs)})
    engine.close()
    assert max(widths) > 1                                          # they did run together
    assert "".join(pieces) == answers[2, 0].text + answers[2, 1].text
    store = engine.store
    for i in range(4):
        state = None
        for rnd in range(2):
            s = TextStream(run.model, run.tokenizer, prompts[i] * (rnd + 1), sampling=settings[i], state=state)
            list(s)
            got = answers[i, rnd]
            assert (got.text, got.finish_reason, got.completion_tokens) == (s.text, s.finish_reason,
                                                                           s.completion_tokens), (i, rnd)
            state = s.state
        saved = store.load(f"s{i}").state.state_dict()
        assert saved.keys() == state.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in state.state_dict().items()), i


def test_the_queue_is_bounded_and_a_session_waits_for_its_own_earlier_request(run, tmp_path):
    engine = Engine(run, ServeConfig(sessions_dir=str(tmp_path), max_queue=2, max_batch=2))
    release = threading.Event()
    first = engine.submit("hold", sampling(0), session="a", on_piece=lambda _: release.wait(30))
    deadline = time.time() + 30
    while engine.stats()["running"] == 0 and time.time() < deadline:   # the worker holds the first request
        time.sleep(0.01)
    queued = [engine.submit("next", sampling(1), session="a"), engine.submit("other", sampling(2), session="b")]
    with pytest.raises(QueueFull):
        engine.submit("one too many", sampling(3), session="c")
    assert engine.stats()["queued"] == 2
    release.set()
    texts = [first.future.result(timeout=60).text] + [j.future.result(timeout=60).text for j in queued]
    engine.close()
    s = TextStream(run.model, run.tokenizer, "hold", sampling=sampling(0))
    list(s)
    after = TextStream(run.model, run.tokenizer, "next", sampling=sampling(1), state=s.state)
    list(after)
    assert texts[0] == s.text and texts[1] == after.text               # a's second request saw the first
