"""``longmem chat``: piped stdin through the real command, the memory restored by the
next run exactly, /reset, /stats, unknown commands, and session files checked."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longmem.cli import main
from longmem.generation.chat import run_chat
from longmem.generation.decoding import Decoder
from longmem.generation.generate import TextStream
from longmem.generation.processors import SamplingConfig
from longmem.generation.session import Session, SessionStore, check_session_name
from longmem.io import weights_fingerprint

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


@pytest.mark.e2e
def test_piped_chat_saves_the_session_and_the_next_run_continues_it(run, tmp_path):
    res = subprocess.run([sys.executable, "-m", "longmem", "chat", str(run.path), "--session", "s1",
                          "--sessions-dir", str(tmp_path), "--max-new-tokens", "8", "--temperature", "0"],
                         input="hello there\n/stats\n", capture_output=True, encoding="utf-8", timeout=120)
    assert res.returncode == 0, res.stderr
    first = turn(run, "hello there")
    reply, stats = res.stdout.splitlines()
    assert reply == first.text
    assert stats.startswith("[session s1: 1 turn,")
    assert (tmp_path / "s1.safetensors").is_file()
    # a second process (here in-process) restores the memory: same answer as one continued stream
    lines = chat(run, "/stats\nand then\n", session="s1", sessions_dir=tmp_path)
    assert lines[0].startswith("[session s1: 1 turn,")
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


@pytest.mark.parametrize("name", ["abc\n", "abc\r", "\nabc", "ab c", "", "-x", "a" * 65, "../x", "x/y"])
def test_session_names_are_checked_whole(run, tmp_path, monkeypatch, capsys, name):
    with pytest.raises(ValueError, match="invalid session name"):
        check_session_name(name)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(run.path), f"--session={name}", "--sessions-dir", str(tmp_path)]) == 2
    assert "longmem chat: error: invalid session name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                              # nothing written


@pytest.mark.parametrize("fmt", ["{text}{x}", "{}", "{0}", "{text", "text}", "{text!r}", "{text:>9}",
                                 "{text.upper}", "{text[0]}", "no field", "{x}"])
def test_turn_formats_other_than_text_fields_exit_2(run, tmp_path, monkeypatch, capsys, fmt):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(run.path), "--sessions-dir", str(tmp_path), "--turn-format", fmt]) == 2
    err = capsys.readouterr().err
    assert "longmem chat: error: turn_format must contain {text} and no other field" in err and repr(fmt) in err


def test_a_turn_format_with_escaped_braces_and_text_twice_works(run, tmp_path):
    lines = chat(run, "hi\n", session="f", sessions_dir=tmp_path, turn_format="{{q}} {text} {text}\n")
    assert lines == [turn(run, "{q} hi hi").text]


def _drop(t, k):
    del t[k]


@pytest.mark.parametrize("tamper,what", [
    (lambda t: _drop(t, "kv.keys.1"), "missing tensors ['kv.keys.1']"),
    (lambda t: _drop(t, "batch_size"), "missing tensors ['batch_size']"),
    (lambda t: t.update({"knn.written": torch.zeros(1, dtype=torch.long)}), "unexpected tensors ['knn.written']"),
    (lambda t: t.update({"kv.keys.0": t["kv.keys.0"][..., :4].clone()}), "kv.keys.0 is torch.float32 of shape"),
    (lambda t: t.update({"kv.keys.0": t["kv.keys.0"][None].clone()}), "kv.keys.0 is torch.float32 of shape"),
    (lambda t: t.update({"kv.valid": t["kv.valid"].float()}), "this model keeps torch.int64"),
    (lambda t: t.update({"kv.valid": torch.zeros(3, dtype=torch.long)}), "kv.valid is torch.int64 of shape (3,)"),
    (lambda t: t.update({"batch_size": torch.tensor(2)}), "batch_size is 2"),
    (lambda t: t["kv.keys.1"].fill_(math.nan), "kv.keys.1 holds NaN or inf"),
])
def test_a_session_file_whose_tensors_do_not_fit_is_refused_naming_it(run, tmp_path, monkeypatch, capsys,
                                                                       tamper, what):
    chat(run, "remember me\n", session="s", sessions_dir=tmp_path)
    path = tmp_path / "s.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tamper(tensors)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="does not fit this model's memory") as err:
        SessionStore(tmp_path, model=run.model).load("s")
    assert what in str(err.value), err.value
    monkeypatch.setattr(sys, "stdin", io.StringIO("and then\n"))
    assert main(["chat", str(run.path), "--session", "s", "--sessions-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"longmem chat: error: session file {path} does not fit" in err and "delete the file" in err


@pytest.fixture(scope="module")
def knn_session(tmp_path_factory):
    """A kNN model's run and the tensors and header of a session file after one turn."""
    tmp = tmp_path_factory.mktemp("knn")
    run = make_tiny_run(tmp / "RUN", kind="knn", mem_len=16)
    path = SessionStore(tmp, model=run.model).save(Session(name="k", state=turn(run, "remember me").state))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return run, load_file(path), meta


@pytest.mark.parametrize("tamper,what", [
    (lambda t: t["knn.keys.0"].fill_(math.nan), "knn.keys.0 holds NaN or inf"),
    (lambda t: t["knn.values.0"][..., 0, :].fill_(math.inf), "knn.values.0 holds NaN or inf"),
    (lambda t: t.update({"knn.keys.0": t["knn.keys.0"].double()}), "knn.keys.0 is torch.float64"),
    (lambda t: t.update({"knn.values.0": t["knn.values.0"].int()}), "knn.values.0 is torch.int32"),
    (lambda t: t.update({"knn.keys.0": t["knn.keys.0"][:, :1].clone()}), "knn.keys.0 is torch.float32 of shape"),
    (lambda t: t.update({"knn.keys.0": t["knn.keys.0"].flatten()}), "knn.keys.0 is torch.float32 of shape"),
    (lambda t: _drop(t, "knn.values.0"), "missing tensors ['knn.values.0']"),
    (lambda t: t.update({"knn.keys.7": t["knn.keys.0"].clone()}), "unexpected tensors ['knn.keys.7']"),
    (lambda t: t.update({"knn.written": torch.tensor([-3])}), "knn.written holds a negative count"),
])
def test_a_knn_session_whose_tensors_do_not_fit_is_refused(knn_session, tmp_path, tamper, what):
    """What the kNN memory files refused, sessions (which keep the kNN memory) refuse too."""
    run, tensors, meta = knn_session
    tensors = {k: v.clone() for k, v in tensors.items()}
    tamper(tensors)
    save_file(tensors, str(tmp_path / "k.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not fit this model's memory") as err:
        SessionStore(tmp_path, model=run.model).load("k")
    assert what in str(err.value), err.value


def test_session_store_keeps_within_its_caps_least_recently_used_first_and_never_a_kept_one(run, tmp_path):
    store = SessionStore(tmp_path, model=run.model, max_files=3)
    state = turn(run, "x").state
    for name in ("a", "b", "c", "d"):
        store.save(Session(name=name, state=state))
        assert len(list(tmp_path.glob("*.safetensors"))) <= 4           # prune runs when the owner says so
    store.load("a")                                                      # a read: now the most recently used
    assert store.prune() == ["b"]
    size = (tmp_path / "a.safetensors").stat().st_size
    store.max_bytes = 2 * size
    assert store.prune(keep={"c"}) == ["d"]                              # c is the oldest but kept
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["a", "c"]
    assert SessionStore(tmp_path, model=run.model).prune() == []         # no caps: nothing deleted


def test_chat_reads_on_after_input_that_is_not_utf8(run, tmp_path):
    data = b"hello\n\xff\xfe bad\nmore \xc3(\n/stats\n"
    out, err = io.StringIO(), io.StringIO()
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")                # like sys.stdin over a pipe
    run_chat(run, session="b", sessions_dir=tmp_path, sampling=SamplingConfig(**SAMPLING), stdin=stdin,
             stdout=out, stderr=err)
    lines = out.getvalue().splitlines()
    assert lines[3].startswith("[session b: 3 turns")                          # every line was read
    first = turn(run, "hello")
    second = turn(run, "\ufffd\ufffd bad", state=first.state)
    assert lines[1] == second.text
    assert err.getvalue().count("warning: the input is not all UTF-8") == 1
    # a text stream that smuggles bytes in as surrogates (sys.stdin under the C locale)
    out = io.StringIO()
    run_chat(run, session="c", sessions_dir=tmp_path, sampling=SamplingConfig(**SAMPLING),
             stdin=io.StringIO("hello\n\udcff\udcfe bad\n"), stdout=out, stderr=io.StringIO())
    assert out.getvalue().splitlines() == [first.text, second.text]


@pytest.mark.parametrize("kind,mem_len", [("none", 0), ("xl", 64), ("knn", 16), ("tokens", 0), ("tokens", 8)])
def test_sessions_of_every_memory_kind_load_back_at_any_length(tmp_path, kind, mem_len):
    run = make_tiny_run(tmp_path / "RUN", kind=kind, mem_len=mem_len)
    store, state = SessionStore(tmp_path / "s", model=run.model), None
    for prompt in ("h", "hello there, a longer prompt", "and more text than a segment holds"):
        s = TextStream(run.model, run.tokenizer, prompt, sampling=SamplingConfig(max_new_tokens=1, temperature=0),
                       state=state)
        list(s)
        state = s.state
        store.save(Session(name="x", state=state))
        back = store.load("x").state.state_dict()
        assert back.keys() == state.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in state.state_dict().items())


def test_a_session_of_longmem_0_1_with_xl_hidden_states_continues_exactly(tmp_path):
    """0.1 kept the XL memory's hidden states in sessions; decoding now keeps keys and values. An old file is
    converted on load, and the next token's logits equal those of the hidden-state memory."""
    from safetensors.torch import save as st_save
    run = make_tiny_run(tmp_path / "XL", kind="xl", mem_len=24, segment_len=8)
    store = SessionStore(tmp_path / "s", model=run.model)
    x = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        old = run.model(x[:, :29]).state                                  # an XL state of hidden states
        want = run.model(x[:, 29:], state=old).logits[0, -1]
    assert old.parts() == ["xl"]
    meta = {"format": "longmem-session", "version": "1", "fingerprint": store.fingerprint,
            "info": json.dumps({"turns": 1, "tokens": 29})}
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "old.safetensors").write_bytes(st_save(old.state_dict(), metadata=meta))
    sess = store.load("old")
    assert sess.state.parts() == ["kv"] and sess.state.kv.length == 24
    got, _ = Decoder(run.model).feed(x[:, 29:], sess.state)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
