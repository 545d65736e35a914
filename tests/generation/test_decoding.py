"""Cached incremental decoding, attention sinks, stop strings, continuing from a state."""
from __future__ import annotations

import pytest
import torch

from longmem.data.tokenizer import ByteTokenizer
from longmem.generation.decoding import Decoder
from longmem.generation.generate import TextStream, TokenStream, generate_ids
from longmem.generation.processors import SamplingConfig
from longmem.models.attention import Rotary

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]

pytestmark = [pytest.mark.invariant, pytest.mark.usefixtures("one_thread")]


def test_cached_decoding_without_memory_equals_full_recomputation(make_model):
    """kind none: prompt then one token at a time through the cache = one causal pass, while it fits."""
    model = make_model(kind="none", mem_len=0, segment_len=24)
    seq = torch.randint(0, 37, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq).logits[0]                                   # (24, V)
    dec = Decoder(model, attention_sink=0)
    logits, mem = dec.feed(seq[:, :5], None)
    got = [logits[0]]
    for t in range(5, 24):
        logits, mem = dec.feed(seq[:, t:t + 1], mem)
        got.append(logits[0])
    assert torch.allclose(torch.stack(got), full[4:], atol=1e-4)
    assert mem.kv.length == 23                                        # W - 1 past positions


def test_cached_decoding_with_a_long_prompt_keeps_positions_inside_the_window(make_model):
    model = make_model(kind="none", mem_len=0, segment_len=8)
    dec = Decoder(model, attention_sink=2)
    model.rope.max_position_seen = -1
    seq = torch.randint(0, 37, (1, 50), generator=torch.Generator().manual_seed(2))
    logits, mem = dec.feed(seq, None)                                 # prefill in chunks
    for t in range(30):
        logits, mem = dec.feed(seq[:, t:t + 1], mem)
    assert torch.isfinite(logits).all()
    assert model.rope.max_position_seen <= 7                          # never beyond the trained window
    assert mem.kv.length == 7


def test_attention_sink_keeps_the_first_positions_for_good(make_model):
    model = make_model(kind="none", mem_len=0, segment_len=8)
    sinks = Decoder(model, attention_sink=3)
    plain = Decoder(model, attention_sink=0)
    seq = torch.randint(0, 37, (1, 40), generator=torch.Generator().manual_seed(3))
    _, first = sinks.feed(seq[:, :4], None)
    m_sink, m_plain = first, plain.feed(seq[:, :4], None)[1]
    for t in range(4, 40):
        l_sink, m_sink = sinks.feed(seq[:, t:t + 1], m_sink)
        l_plain, m_plain = plain.feed(seq[:, t:t + 1], m_plain)
    for layer in range(2):
        assert torch.equal(m_sink.kv.keys[layer][:, :, :3], first.kv.keys[layer][:, :, :3])   # the sinks stay
    with torch.no_grad():                                             # layer-0 keys: which tokens are cached
        keys, _ = model.blocks[0].attn.project_kv(model.blocks[0].norm1(model.embed(seq)))   # (1, G, 40, Dh)
        cos, sin = model.rope.at(torch.arange(40).unsqueeze(0), dtype=keys.dtype)
        keys = Rotary.rotate(keys, cos, sin)                          # cached with their rotation, position p at p
    torch.testing.assert_close(m_sink.kv.keys[0], torch.cat([keys[:, :, :3], keys[:, :, -4:]], dim=2),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(m_plain.kv.keys[0], keys[:, :, -7:], atol=1e-5, rtol=0)
    assert m_sink.kv.seen.tolist() == [40] and m_sink.kv.valid.tolist() == [7]
    assert not torch.allclose(l_sink, l_plain, atol=1e-3)             # the sinks are attended to


@pytest.mark.parametrize("sinks", [0, 3])
def test_a_cache_of_rotated_keys_attends_like_one_rotated_at_its_slots(make_model, monkeypatch, sinks):
    """Keys stored with their rotation (only the sinks turned again) give the attention of re-rotating the
    whole cache at its slots for every token (the StreamingLLM recipe), over a stream far past the window,
    in one lane and in lanes at different points of their streams (one reset midway)."""
    model = make_model(kind="none", mem_len=0, segment_len=8)
    seq = torch.randint(0, 37, (2, 60), generator=torch.Generator().manual_seed(5))
    reset = torch.zeros(2, 60, dtype=torch.bool)
    reset[1, 23] = True

    def run():
        dec, mem, out = Decoder(model, attention_sink=sinks), None, []
        logits, mem = dec.feed(seq[:, :5], None)
        for t in range(5, 60):
            if reset[:, t].any():
                mem = mem.reset(reset[:, t])
            logits, mem = dec.feed(seq[:, t:t + 1], mem)
            out.append(logits)
        return torch.stack(out, 1), mem

    rotated, mem = run()
    assert mem.kv.seen is not None
    monkeypatch.setattr(type(model), "_plain_positions", property(lambda self: False))
    reference, ref_mem = run()
    assert ref_mem.kv.seen is None                                    # keys cached before rotary positions
    torch.testing.assert_close(rotated, reference, atol=1e-4, rtol=0)


def test_a_cache_of_keys_before_rotation_is_converted_on_first_use(make_model, monkeypatch):
    model = make_model(kind="none", mem_len=0, segment_len=8)
    seq = torch.randint(0, 37, (1, 30), generator=torch.Generator().manual_seed(6))
    dec = Decoder(model, attention_sink=2)
    _, mem = dec.feed(seq[:, :20], None)
    with monkeypatch.context() as m:
        m.setattr(type(model), "_plain_positions", property(lambda self: False))
        _, old = dec.feed(seq[:, :20], None)                          # as longmem 0.2 cached it
    assert old.kv.seen is None
    for t in range(20, 30):
        a, mem = dec.feed(seq[:, t:t + 1], mem)
        b, old = dec.feed(seq[:, t:t + 1], old)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert old.kv.seen is not None


def test_xl_generation_keeps_the_state_bounded(make_model):
    model = make_model(kind="xl", mem_len=12, segment_len=4)
    stream = TokenStream(model, PROMPT, sampling=SamplingConfig(max_new_tokens=40, seed=1))
    toks = list(stream)
    assert len(toks) == 40 == stream.completion_tokens
    assert stream.state.kv.length == 12                              # a key/value cache of mem_len


def test_continuing_from_the_state_equals_one_pass_over_everything(make_model):
    """What chat relies on: the state after a stream remembers the prompt and every output token."""
    model = make_model(kind="xl", mem_len=64, segment_len=8)
    first = TokenStream(model, PROMPT, sampling=SamplingConfig(max_new_tokens=9, temperature=0.0))
    out1 = list(first)
    follow = [7, 7, 2]
    second = TokenStream(model, follow, sampling=SamplingConfig(max_new_tokens=1, temperature=0.0),
                         state=first.state)
    nxt = list(second)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT + out1 + follow])).logits[0, -1]
    assert nxt == [int(ref.argmax())]


@pytest.mark.parametrize("kind,mem_len", [("none", 0), ("xl", 16)])
def test_seed_determinism_with_all_sampling_controls(make_model, kind, mem_len):
    model = make_model(kind=kind, mem_len=mem_len, segment_len=8)
    kw = dict(max_new_tokens=25, temperature=1.3, top_p=0.95, min_p=0.01, repetition_penalty=1.1,
              presence_penalty=0.2, frequency_penalty=0.1, logit_bias={0: -100.0})
    a = list(generate_ids(model, PROMPT, seed=5, **kw))
    assert a == list(generate_ids(model, PROMPT, seed=5, **kw))
    assert a != list(generate_ids(model, PROMPT, seed=6, **kw))
    assert 0 not in a                                                 # banned by the bias


def test_stop_strings_cut_the_text_before_the_first_match(make_model):
    model = make_model(kind="xl", vocab_size=256, mem_len=32, segment_len=8)
    tok = ByteTokenizer()
    free = TextStream(model, tok, "ab", sampling=SamplingConfig(max_new_tokens=30, temperature=0.0))
    pieces = list(free)
    assert free.finish_reason == "length" and "".join(pieces) == free.text
    text = free.text
    stop = text[10:13]
    cut = text.find(stop)
    stopped = TextStream(model, tok, "ab", sampling=SamplingConfig(max_new_tokens=30, temperature=0.0,
                                                                   stop=["\x00never", stop]))
    pieces = list(stopped)
    assert stopped.finish_reason == "stop"
    assert "".join(pieces) == stopped.text == text[:cut]
    assert stopped.completion_tokens == len(tok.encode(text[:cut + len(stop)]))
    assert all(pieces)


def test_decoder_arguments_are_checked(make_model):
    with pytest.raises(ValueError, match="recompute"):
        Decoder(make_model(kind="xl"), recompute=True)
    with pytest.raises(ValueError, match="attention_sink"):
        Decoder(make_model(kind="none", mem_len=0), attention_sink=-1)
    with pytest.raises(ValueError, match="prompt token ids"):
        TokenStream(make_model(), [99], sampling=SamplingConfig())


@pytest.mark.parametrize("kind,sinks", [("none", 0), ("none", 2), ("xl", 0)])
def test_a_state_fed_twice_gives_two_independent_branches(make_model, kind, sinks):
    """Decoding appends a token's keys and values behind the cache in place (memory/kv.py ``Room``): a state
    fed again later (two branches from one point, as a chat retried from a saved turn) must not see the other
    branch's writes, and the older state keeps its tensors unchanged, through the window filling and sliding."""
    model = make_model(kind=kind, mem_len=12 if kind == "xl" else 0, segment_len=8)
    seq = torch.randint(0, 37, (2, 40), generator=torch.Generator().manual_seed(7))
    dec = Decoder(model, attention_sink=sinks)
    _, base = dec.feed(seq[:, :6], None)
    for t in range(6, 30):                                       # every point: the window grows, then slides
        kept = [k.clone() for k in base.kv.keys]
        a, left = dec.feed(seq[:, t:t + 1], base)                 # branch 1
        b, right = dec.feed(seq[:, t + 1:t + 2], base)            # branch 2 from the same state
        a2, _ = dec.feed(seq[:, t + 1:t + 2], left)               # branch 1 continued after branch 2 was written
        _, fresh = dec.feed(seq[:, :6], None)                     # the references, from scratch
        for u in range(6, t):
            _, fresh = dec.feed(seq[:, u:u + 1], fresh)
        ra, rl = dec.feed(seq[:, t:t + 1], fresh)
        rb, _ = dec.feed(seq[:, t + 1:t + 2], fresh)
        ra2, _ = dec.feed(seq[:, t + 1:t + 2], rl)
        for x, y in ((a, ra), (b, rb), (a2, ra2)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        for k, old in zip(base.kv.keys, kept):
            assert torch.equal(k, old)
        _, base = dec.feed(seq[:, t:t + 1], base)
