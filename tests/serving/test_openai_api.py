"""The OpenAI-compatible API through the official ``openai`` client against a live uvicorn server on
127.0.0.1 (tier 4), and the chat rules in-process: the model's chat template (or plain text), streaming,
stop and max tokens, sessions fed only the messages their memory lacks."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from longmem.generation.chat import TextFormat, message_format  # noqa: E402
from longmem.generation.decoding import Decoder  # noqa: E402
from longmem.generation.generate import TextStream  # noqa: E402
from longmem.generation.processors import SamplingConfig  # noqa: E402
from longmem.serving.config import ServeConfig  # noqa: E402
from longmem.serving.server import create_app  # noqa: E402

from conftest import live_server, make_tiny_chat_run, make_tiny_run  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]
GREEDY = dict(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    return make_tiny_chat_run(tmp_path_factory.mktemp("chat") / "CHAT")


def reference(run, prompt: str, *, state=None, stop=("<|im_end|>",), **kw) -> TextStream:
    s = TextStream(run.model, run.tokenizer, prompt, sampling=SamplingConfig(**{**GREEDY, "stop": list(stop), **kw}),
                   state=state)
    list(s)
    return s


def test_the_openai_client_chats_streams_completes_lists_models_and_gets_errors(chat_run, tmp_path):
    messages = [{"role": "user", "content": "The quick fox"}]
    with live_server(create_app(chat_run, ServeConfig(sessions_dir=str(tmp_path), api_key="k3y"))) as url:
        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="CHAT", messages=messages, max_tokens=8, temperature=0)
        # the model's own chat template (ChatML, with the template's default system prompt) was fed
        renderer, _ = message_format(chat_run.tokenizer)
        ref = reference(chat_run, renderer.render(messages))
        assert reply.object == "chat.completion" and reply.model == "CHAT"
        assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == ref.text
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8
        assert reply.usage.prompt_tokens == len(chat_run.tokenizer.encode(renderer.render(messages)))
        chunks = list(client.chat.completions.create(model="CHAT", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
        # the end-of-turn token stops the reply (logit_bias forces it first)
        stopped = client.chat.completions.create(model="CHAT", messages=messages, max_completion_tokens=8,
                                                 temperature=0, logit_bias={"2": 100})
        assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
        done = client.completions.create(model="CHAT", prompt="The lazy dog", max_tokens=6, temperature=0)
        assert done.choices[0].text == reference(chat_run, "The lazy dog", stop=(), max_new_tokens=6).text
        assert [m.id for m in client.models.list()] == ["CHAT"]
        assert client.models.retrieve("CHAT").owned_by == "longmem"
        with pytest.raises(openai.NotFoundError, match="no model 'gpt-4'"):
            client.models.retrieve("gpt-4")
        with pytest.raises(openai.BadRequestError, match=r"max_tokens.*\[0, 2048\]"):
            client.chat.completions.create(model="CHAT", messages=messages, max_tokens=10**6)
        with pytest.raises(openai.BadRequestError, match="unknown field"):
            client.chat.completions.create(model="CHAT", messages=messages, tools=[{"type": "function", "function": {
                "name": "f", "parameters": {}}}])
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


def test_a_session_is_fed_only_the_messages_its_memory_lacks(chat_run, tmp_path):
    renderer, stop = message_format(chat_run.tokenizer)
    decoder = Decoder(chat_run.model)
    with TestClient(create_app(chat_run, ServeConfig(sessions_dir=str(tmp_path)))) as c:
        def chat(messages, **kw):
            r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0, **kw})
            assert r.status_code == 200, r.text
            return r.json()

        first = [{"role": "user", "content": "my code is 4711"}]
        a1 = chat(first, user="alice")                                 # `user` names the session
        s1 = reference(chat_run, renderer.render(first))
        assert a1["choices"][0]["message"]["content"] == s1.text and a1["session"]["messages_fed"] == 1
        assert a1["session"]["session"] == "alice" and a1["session"]["messages"] == 2
        # the client sends the whole conversation back: only the new message is fed, after the memory
        closing = renderer.closing(s1.stopped_by)                      # "<|im_end|>\n" after a reply cut short
        state = decoder.feed(torch.tensor([chat_run.tokenizer.encode(closing)]), s1.state)[1]
        second = first + [{"role": "assistant", "content": s1.text}, {"role": "user", "content": "what is it?"}]
        new = renderer.render(second[2:], after=second[:2])
        assert new == "<|im_start|>user\nwhat is it?<|im_end|>\n<|im_start|>assistant\n"
        a2 = chat(second, session="alice")
        s2 = reference(chat_run, new, state=state)
        assert a2["choices"][0]["message"]["content"] == s2.text and a2["session"]["messages_fed"] == 1
        assert a2["session"]["messages"] == 4 and a2["session"]["turns"] == 2
        # without a session the whole conversation is rendered and fed to a fresh memory
        fresh = chat(second)
        assert fresh["choices"][0]["message"]["content"] == reference(chat_run, renderer.render(second)).text
        assert "session" not in fresh and fresh["choices"][0]["message"]["content"] != s2.text
        # a conversation the memory does not hold (edited): the messages after the last assistant one
        edited = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                  {"role": "system", "content": "be brief"}, {"role": "user", "content": "and?"}]
        a3 = chat(edited, session="alice")
        assert a3["session"]["messages_fed"] == 2 and a3["session"]["messages"] == 5
        # a client that sends only the new message
        assert chat([{"role": "user", "content": "more"}], session="alice")["session"]["messages_fed"] == 1
        # a session used for completions holds no known conversation any more
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "session": "alice"})
        assert r.json()["session"]["messages"] == 0
        assert chat(second, session="alice")["session"]["messages_fed"] == 1        # after the last assistant


def test_a_session_keeps_its_message_count_on_disk(chat_run, tmp_path):
    cfg = ServeConfig(sessions_dir=str(tmp_path), max_live_sessions=1)
    with TestClient(create_app(chat_run, cfg)) as c:
        first = [{"role": "user", "content": "hi"}]
        a1 = c.post("/v1/chat/completions", json={"messages": first, "max_tokens": 3, "session": "s1"}).json()
        c.post("/v1/chat/completions", json={"messages": first, "max_tokens": 3, "session": "s2"})   # s1 to disk
        assert (tmp_path / "s1.safetensors").is_file()
        second = first + [{"role": "assistant", "content": a1["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "and?"}]
        again = c.post("/v1/chat/completions", json={"messages": second, "max_tokens": 3, "session": "s1"}).json()
        assert again["session"]["messages_fed"] == 1 and again["session"]["messages"] == 4


def test_without_a_chat_template_messages_are_role_prefixed_lines_or_the_turn_format(tmp_path):
    run = make_tiny_run(tmp_path / "RUN")
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    assert TextFormat().render(messages) == "System: Be kind.\nUser: Hello\nAssistant: "
    assert TextFormat("Q: {text}\n").render(messages + [{"role": "assistant", "content": "Hi"}]) == \
        "Q: Be kind.\nQ: Hello\nHi\n"
    for turn_format, prompt in (("", "System: Be kind.\nUser: Hello\nAssistant: "), ("{text}\n", "Be kind.\nHello\n")):
        with TestClient(create_app(run, ServeConfig(sessions_dir=str(tmp_path), turn_format=turn_format))) as c:
            r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            ref = reference(run, prompt, stop=["\n"], max_new_tokens=12)
            assert r.json()["choices"][0]["message"]["content"] == ref.text
    with pytest.raises(ValueError, match="turn_format must contain"):
        ServeConfig(turn_format="{user}")


@pytest.mark.parametrize("body,status,match", [
    ({"messages": []}, 400, "'messages'"),
    ({"messages": "hi"}, 400, "'messages' must be a list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400, r"unknown field.*tool_calls.*messages\.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "unknown field.*image_url"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4}, 400, "differ"),
    ({"messages": [{"role": "user", "content": "x"}], "user": "a@b"}, 400, "invalid session name"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "not supported"),
    ({"messages": [{"role": "user", "content": "x" * 201}]}, 413, "at most 200"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "'stop'"),
])
def test_bad_chat_requests_get_a_4xx_with_a_message(chat_run, tmp_path, body, status, match):
    import re
    with TestClient(create_app(chat_run, ServeConfig(sessions_dir=str(tmp_path), max_prompt_chars=200))) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and re.search(match, r.json()["error"]["message"]), r.json()


def test_text_parts_and_the_developer_role_are_accepted(chat_run, tmp_path):
    renderer, _ = message_format(chat_run.tokenizer)
    with TestClient(create_app(chat_run, ServeConfig(sessions_dir=str(tmp_path)))) as c:
        r = c.post("/v1/chat/completions", json={"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}],
            "max_tokens": 5, "temperature": 0})
    ref = reference(chat_run, renderer.render([{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hello"}]), max_new_tokens=5)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref.text
