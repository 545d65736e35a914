"""The serving engine without HTTP: concurrent submitters never mix sessions; the memory cap."""
from __future__ import annotations

import threading

import pytest

from longmem.generation.generate import TextStream
from longmem.generation.processors import SamplingConfig
from longmem.serving.config import ServeConfig
from longmem.serving.engine import Engine

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
