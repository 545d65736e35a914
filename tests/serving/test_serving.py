"""The HTTP server, in-process (never binds an address): completions, streaming,
request checks, sessions created on first use, isolated, evicted and restored."""
from __future__ import annotations

import json
import re
import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from longmem.cli import main  # noqa: E402
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
    (json.dumps({"prompt": "a", "session": "abc\n"}).encode(), 400, "session name"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "number NaN; every number must be finite"),
    (b'{"prompt": "a", "logit_bias": {"65": Infinity}}', 400, "number Infinity"),
    (b'{"prompt": "a", "logit_bias": {"65": -Infinity}}', 400, "number -Infinity"),
    (b'{"prompt": "a", "logit_bias": {"65": 1e999}}', 400, "number 1e999"),
    (b'{"prompt": "a", "user": {"x": [NaN]}}', 400, "finite"),                   # anywhere in the request
    (json.dumps({"prompt": "a", "logit_bias": {"65": 1e39}}).encode(), 400, r"logit_bias.*\[-100, 100\]"),
    (json.dumps({"prompt": "a", "logit_bias": {"65": 1e308}}).encode(), 400, r"logit_bias.*\[-100, 100\]"),
    (json.dumps({"prompt": "a", "temperature": 10**400}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "a", "seed": 10**400}).encode(), 400, "seed"),
    (json.dumps({"prompt": "a", "seed": -1}).encode(), 400, "seed"),
    (b"[" * 1999, 400, "nested too deeply"),
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


def test_a_tiny_temperature_is_greedy(client):
    greedy = complete(client, prompt="Hello ", temperature=0)["choices"][0]["text"]
    assert complete(client, prompt="Hello ", temperature=1e-39)["choices"][0]["text"] == greedy


def test_json_nested_100000_deep_or_with_a_5000_digit_number_is_a_400_and_the_connection_goes_on(run, tmp_path):
    cfg = ServeConfig(sessions_dir=str(tmp_path), max_request_bytes=300_000)
    with TestClient(create_app(run, cfg)) as c:
        for body, match in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                            (b'{"a":' * 50_000, "nested too deeply"),
                            (b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON")):
            r = c.post("/v1/completions", content=body)
            assert r.status_code == 400 and match in r.json()["error"]["message"]
        assert complete(c, prompt="a", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_a_fault_in_the_engine_or_a_route_is_a_json_500_and_the_next_request_works(client, monkeypatch):
    import longmem.serving.server as server

    def boom(*args, **kwargs):
        raise RuntimeError("probability tensor contains inf")

    monkeypatch.setattr(client.app.state.engine, "_complete", boom)            # raised in the model thread
    r = client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal error: RuntimeError: probability tensor contains inf",
                                  "type": "server_error"}}
    monkeypatch.undo()
    assert complete(client, prompt="a", max_tokens=2)["usage"]["completion_tokens"] == 2
    monkeypatch.setattr(server, "parse_request", boom)                          # raised in the route
    r = client.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert complete(client, prompt="b", max_tokens=2)["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("method,path,status", [("POST", "/v1/chat/complete", 404), ("GET", "/nope", 404),
                                                ("GET", "/v1/completions", 405), ("DELETE", "/health", 405),
                                                ("GET", "/v1/chat/completions", 405), ("GET", "/v1/models/other", 404)])
def test_unknown_paths_and_methods_answer_in_the_error_format(client, method, path, status):
    r = client.request(method, path, json={"prompt": "a"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and err["message"] and err["type"] in ("not_found_error",
                                                                             "invalid_request_error")


def test_a_framework_validation_error_is_a_422_in_the_error_format(client):
    @client.app.get("/typed")                                   # a route whose parameters FastAPI checks
    async def typed(n: int):
        return {"n": n}

    r = client.get("/typed", params={"n": "x"})
    assert r.status_code == 422 and set(r.json()) == {"error"}
    assert r.json()["error"]["type"] == "invalid_request_error" and "query.n" in r.json()["error"]["message"]


def test_docs_and_pages_are_behind_the_api_key_when_one_is_set(run, tmp_path):
    with TestClient(create_app(run, ServeConfig(sessions_dir=str(tmp_path)))) as c:
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
    with TestClient(create_app(run, ServeConfig(api_key="s3cret", sessions_dir=str(tmp_path)))) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/inspect"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
            assert r.headers["www-authenticate"].startswith("Basic"), path          # a browser asks for the key
            assert c.get(path, auth=("anyone", "wrong")).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
            assert c.get(path, auth=("anyone", "s3cret")).status_code == 200, path     # basic: key as password
        assert c.get("/v1/models").status_code == 401 and "www-authenticate" not in c.get("/v1/models").headers
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200                                     # needs no key


def test_the_openapi_document_describes_the_request_and_response_models(client):
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, method, model in (("/v1/chat/completions", "post", "ChatCompletionRequest"),
                                ("/v1/completions", "post", "CompletionRequest"),
                                ("/v1/inspect", "post", "InspectRequest")):
        body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"} and model in schemas
    assert {"messages", "max_completion_tokens", "session", "user", "stream"} <= set(
        schemas["ChatCompletionRequest"]["properties"])
    assert "ChatMessage" in schemas and "ErrorResponse" in schemas and "ChatCompletion" in schemas
    assert "/v1/models" in doc["paths"] and "/health" in doc["paths"]


def test_sessions_on_disk_are_capped_least_recently_used_first(run, tmp_path):
    folder = tmp_path / "sessions"
    cfg = ServeConfig(sessions_dir=str(folder), max_live_sessions=1, max_sessions_on_disk=2)

    def on_disk():
        return sorted(p.stem for p in folder.glob("*.safetensors"))

    with TestClient(create_app(run, cfg)) as c:
        for name in ("a", "b", "a", "c"):                 # a written, b written, a read back (used), a written
            complete(c, prompt="hi. ", session=name, max_tokens=2)
        assert on_disk() == ["a", "b"]
        complete(c, prompt="hi. ", session="d", max_tokens=2)          # c written: b is the least recently used
        assert on_disk() == ["a", "c"]
        for i in range(6):
            complete(c, prompt="hi. ", session=f"n{i}", max_tokens=2)
            assert len(on_disk()) <= 2
        again = complete(c, prompt="so", session="n4", max_tokens=2)   # kept: it was among the newest
        assert again["session"]["turns"] == 2
    assert on_disk() == ["n4", "n5"]                                   # the live one, written at shutdown


def test_a_session_file_that_does_not_fit_the_model_is_a_json_error(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "sessions"
    with TestClient(create_app(run, ServeConfig(sessions_dir=str(folder)))) as c:
        complete(c, prompt="hi", session="s")
    path = folder / "s.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["kv.keys.0"] = tensors["kv.keys.0"][..., :2].clone()               # other head size
    del tensors["kv.keys.1"]                                                   # and a layer missing
    save_file(tensors, str(path), metadata=meta)
    with TestClient(create_app(run, ServeConfig(sessions_dir=str(folder)))) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "session": "s"})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert str(path) in msg and "kv.keys.1" in msg and "kv.keys.0" in msg and "delete the file" in msg
        assert complete(c, prompt="hi", session="t")["session"]["turns"] == 1    # the engine goes on


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_refuses_a_busy_port_before_its_banner(run, monkeypatch, capsys):
    import uvicorn
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(kw))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(run.path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"longmem serve: error: port {port} is in use on 127.0.0.1; pass --port" in err
    assert "http://" not in err and not started                     # no banner, no server


def test_serve_flags_reach_the_config_and_bad_numbers_exit_2(run, tmp_path, monkeypatch, capsys):
    import uvicorn
    seen = {}

    def fake_run(app, *, host, port, **kw):
        seen.update(store=app.state.engine.store, port=port)
        app.state.engine.close()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    port = _free_port()
    assert main(["serve", str(run.path), "--port", str(port), "--sessions-dir", str(tmp_path),
                 "--max-sessions-on-disk", "70", "--max-sessions-disk-bytes", "5000"]) == 0
    assert (seen["store"].max_files, seen["store"].max_bytes, seen["port"]) == (70, 5000, port)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-sessions-on-disk" in capsys.readouterr().out
    for args, match in [(["--session-idle-s", "nan"], "session_idle_s must be a finite number, got nan"),
                        (["--session-idle-s", "inf"], "session_idle_s must be a finite number"),
                        (["--max-sessions-on-disk", "0"], "max_sessions_on_disk must be positive"),
                        (["--max-live-sessions", "9", "--max-sessions-on-disk", "8"],
                         "max_sessions_on_disk (8) must be at least max_live_sessions (9)")]:
        assert main(["serve", str(run.path), "--port", str(port), *args]) == 2
        assert f"longmem serve: error: {match}" in capsys.readouterr().err
