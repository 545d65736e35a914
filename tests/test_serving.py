"""The HTTP server, in-process (never binds an address): completions, streaming,
request checks, sessions created on first use, isolated, evicted and restored."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from longmem.generation.generate import TextStream, TokenStream  # noqa: E402
from longmem.generation.processors import SamplingConfig  # noqa: E402
from longmem.serving.config import ServeConfig  # noqa: E402
from longmem.serving.server import create_app  # noqa: E402

from conftest import make_tiny_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


make_run = make_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "RUN")


@pytest.fixture
def client(run, tmp_path):
    with TestClient(create_app(run, ServeConfig(sessions_dir=str(tmp_path / "sessions"), max_prompt_chars=200,
                                                max_tokens_limit=64, max_request_bytes=2000))) as c:
        yield c


def complete(client, **body) -> dict:
    body.setdefault("max_tokens", 12)
    body.setdefault("temperature", 0)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def reference(run, prompt: str, *, state=None, **kw):
    s = TextStream(run.model, run.tokenizer, prompt, sampling=SamplingConfig(**{"max_new_tokens": 12,
                                                                                 "temperature": 0.0, **kw}),
                   state=state)
    list(s)
    return s


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["memory"] == "xl"


def test_completion_matches_the_library_and_reports_usage(client, run):
    out = complete(client, prompt="Hello ", max_tokens=10)
    ref = reference(run, "Hello ", max_new_tokens=10)
    choice = out["choices"][0]
    assert choice["text"] == ref.text and choice["finish_reason"] == "length"
    assert out["object"] == "text_completion"
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 10, "total_tokens": 16}
    assert "session" not in out


def test_sampling_is_seeded_and_stop_is_honoured(client, run):
    a = complete(client, prompt="ab", temperature=1.0, top_p=0.9, seed=7)["choices"][0]["text"]
    assert a == complete(client, prompt="ab", temperature=1.0, top_p=0.9, seed=7)["choices"][0]["text"]
    text = complete(client, prompt="xy", max_tokens=20)["choices"][0]["text"]
    stop = text[5:7]
    cut = complete(client, prompt="xy", max_tokens=20, stop=stop)["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    first = next(iter(TokenStream(run.model, [ord("x"), ord("y")], sampling=SamplingConfig(temperature=0.0))))
    banned = complete(client, prompt="xy", max_tokens=20, logit_bias={str(first): -100})["choices"][0]["text"]
    assert banned != text and run.tokenizer.encode(banned[:1])[0] != first


def test_streaming_sends_the_same_text_as_server_sent_events(client):
    plain = complete(client, prompt="The ", max_tokens=15)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"prompt": "The ", "max_tokens": 15, "temperature": 0,
                                                         "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1]) and len(chunks) > 2


@pytest.mark.parametrize("body,status,match", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "a", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": 10**9}).encode(), 400, r"max_tokens.*\[0, 64\]"),
    (json.dumps({"prompt": "a", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "a" * 201}).encode(), 413, "at most 200"),
    (json.dumps({"prompt": "a" * 3000}).encode(), 413, "2000 bytes"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "a", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "a", "logit_bias": {"999": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"prompt": "a", "session": "../etc"}).encode(), 400, "session name"),
    (json.dumps({"prompt": "a", "frobnicate": 1}).encode(), 400, "unknown field"),
    (json.dumps({"prompt": "a", "n": 2}).encode(), 400, "'n'"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, body, status, match):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] and re.search(match, err["message"]), err


def test_api_key_is_required_when_set(run, tmp_path):
    app = create_app(run, ServeConfig(api_key="s3cret", sessions_dir=str(tmp_path)))
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        assert c.post("/v1/completions", json={"prompt": "a"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2},
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_sessions_are_created_isolated_and_continue_their_own_memory(client, run, tmp_path):
    fact, question = "my code is 4711. ", "my code is"
    a1 = complete(client, prompt=fact, session="alice")
    assert a1["session"]["turns"] == 1 and a1["session"]["session"] == "alice"     # unknown -> created
    b1 = complete(client, prompt=question, session="bob")
    a2 = complete(client, prompt=question, session="alice")
    b2 = complete(client, prompt=question, session="bob")
    # bob never sees alice's fact: his answers are those of a fresh memory fed only his own prompts
    s = reference(run, question)
    assert b1["choices"][0]["text"] == s.text
    assert b2["choices"][0]["text"] == reference(run, question, state=s.state).text
    # alice's answer continues her own memory (fact, its answer, then the question)
    s = reference(run, fact)
    assert a2["choices"][0]["text"] == reference(run, question, state=s.state).text
    assert a2["choices"][0]["text"] != b1["choices"][0]["text"]                     # memory matters here
    assert b2["session"]["turns"] == 2


def test_idle_sessions_go_to_disk_and_come_back(run, tmp_path):
    folder = tmp_path / "sessions"
    cfg = ServeConfig(sessions_dir=str(folder), max_live_sessions=1)
    with TestClient(create_app(run, cfg)) as c:
        complete(c, prompt="first fact. ", session="s1")
        complete(c, prompt="other. ", session="s2")                     # s1 evicted to disk
        assert (folder / "s1.safetensors").is_file()
        assert c.app.state.engine.stats()["live_sessions"] == 1
        again = complete(c, prompt="so", session="s1")
    s = reference(run, "first fact. ")
    assert again["choices"][0]["text"] == reference(run, "so", state=s.state).text
    assert again["session"]["turns"] == 2
    assert (folder / "s2.safetensors").is_file()                        # written at shutdown


def test_a_session_from_other_weights_is_refused(run, tmp_path):
    folder = tmp_path / "sessions"
    other = make_run(tmp_path / "OTHER", seed=1)
    with TestClient(create_app(other, ServeConfig(sessions_dir=str(folder)))) as c:
        complete(c, prompt="hi", session="s")
    with TestClient(create_app(run, ServeConfig(sessions_dir=str(folder)))) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "session": "s"})
        assert r.status_code == 400 and "another model" in r.json()["error"]["message"]
