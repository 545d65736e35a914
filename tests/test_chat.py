"""``longmem chat``: piped stdin through the real command, the memory restored by the
next run exactly, /reset, /stats, unknown commands, and session files checked."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from longmem.generation.chat import run_chat
from longmem.generation.generate import TextStream
from longmem.generation.processors import SamplingConfig
from longmem.generation.session import Session, SessionStore, weights_fingerprint

from conftest import make_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
SAMPLING = dict(max_new_tokens=8, temperature=0.0, stop=["\n"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("chat") / "RUN")


def chat(run, text: str, **kw) -> list[str]:
    out = io.StringIO()
    run_chat(run, sampling=SamplingConfig(**SAMPLING), stdin=io.StringIO(text), stdout=out, stderr=io.StringIO(),
             **kw)
    return out.getvalue().splitlines()


def turn(run, text: str, state=None) -> TextStream:
    s = TextStream(run.model, run.tokenizer, text + "\n", sampling=SamplingConfig(**SAMPLING), state=state)
    list(s)
    return s


def test_piped_chat_saves_the_session_and_the_next_run_continues_it(run, tmp_path):
    res = subprocess.run([sys.executable, "-m", "longmem", "chat", str(run.path), "--session", "s1",
                          "--sessions-dir", str(tmp_path), "--max-new-tokens", "8", "--temperature", "0"],
                         input="hello there\n/stats\n", capture_output=True, encoding="utf-8", timeout=120)
    assert res.returncode == 0, res.stderr
    first = turn(run, "hello there")
    reply, stats = res.stdout.splitlines()
    assert reply == first.text
    assert stats.startswith("[session s1: 1 turns")
    assert (tmp_path / "s1.safetensors").is_file()
    # a second process (here in-process) restores the memory: same answer as one continued stream
    lines = chat(run, "/stats\nand then\n", session="s1", sessions_dir=tmp_path)
    assert lines[0].startswith("[session s1: 1 turns")
    assert lines[1] == turn(run, "and then", state=first.state).text
    assert lines[1] != turn(run, "and then").text                    # the restored memory is used


def test_reset_forgets_and_unknown_commands_are_named(run, tmp_path):
    lines = chat(run, "a fact\n/reset\n/stats\nand then\n/nope\n", session="r", sessions_dir=tmp_path)
    assert lines[1] == "[memory cleared]"
    assert lines[2].startswith("[session r: 0 turns, 0 tokens seen, memory 0 bytes")
    assert lines[3] == turn(run, "and then").text                    # as a fresh session
    assert lines[4].startswith("[unknown command /nope; commands: /reset, /save, /stats, /quit")


def test_session_files_round_trip_and_refuse_other_weights(run, tmp_path):
    store = SessionStore(tmp_path, model=run.model)
    state = turn(run, "remember me").state
    store.save(Session(name="x", state=state, turns=3, tokens=42))
    back = store.load("x")
    assert (back.turns, back.tokens) == (3, 42)
    for k, v in state.state_dict().items():
        assert torch.equal(back.state.state_dict()[k], v)
    assert store.load("new").state is None                           # unknown session: a fresh one
    other = make_tiny_run(tmp_path / "OTHER", seed=1)
    assert weights_fingerprint(other.model) != store.fingerprint
    with pytest.raises(ValueError, match="made by another model"):
        SessionStore(tmp_path, model=other.model).load("x")
    with pytest.raises(ValueError, match="invalid session name"):
        store.path("../x")
    (tmp_path / "p.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)   # a pickle
    with pytest.raises(ValueError, match="pickle"):
        store.load("p")


def test_chat_without_memory_keeps_its_decoding_cache_across_runs(tmp_path):
    run = make_tiny_run(tmp_path / "NONE", kind="none", mem_len=0, segment_len=16)
    chat(run, "hi there, how are you?\nand you?\n", session="n", sessions_dir=tmp_path / "s")
    back = SessionStore(tmp_path / "s", model=run.model).load("n")
    assert back.turns == 2 and back.tokens > 30
    assert back.state.kv.length == 15                                # the cache of past positions, bounded
