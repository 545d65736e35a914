"""Continuous batching: streams decoded as lanes of one batch equal each stream fed alone, as lanes join and leave."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from longmem.generation.decoding import Decoder, Lanes
from longmem.models import MemoryLM
from longmem.models.memory import State

from conftest import spread_weights, tiny_config

pytestmark = [pytest.mark.invariant, pytest.mark.usefixtures("one_thread")]


def model_of(kind: str, **kw) -> MemoryLM:
    extra = {k: kw.pop(k) for k in ("qkv_bias",) if k in kw}
    cfg = dataclasses.replace(tiny_config(kind=kind, **kw), **extra)
    return spread_weights(MemoryLM(cfg), seed=1).eval()


def prefill(dec: Decoder, lengths: list[int], *, seed: int = 0) -> list[State]:
    g = torch.Generator().manual_seed(seed)
    return [dec.feed(torch.randint(0, 37, (1, n), generator=g), None)[1] for n in lengths]


def same(a: State, b: State) -> bool:
    da, db = a.state_dict(), b.state_dict()
    return da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def run_lanes(dec: Decoder, *, exact: bool, steps: int = 12) -> tuple[float, bool]:
    """Streams of different prompt lengths: three lanes, a fourth joins after 4 steps, the first leaves after 7.
    Returns the largest logit difference to the streams fed alone and whether every state is bitwise equal."""
    alone = prefill(dec, [3, 11, 20, 6])
    lanes = Lanes(dec, exact=exact)
    lanes.set(alone[:3])
    members, worst, equal = [0, 1, 2], 0.0, True
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        if step == 4:                                          # a lane joins
            lanes.set([*lanes.states(), alone[3]])
            members.append(3)
        if step == 7:                                          # the first leaves: its state is its own
            left = lanes.states()
            equal &= same(left[0], alone[0])
            lanes.set(left[1:])
            members.pop(0)
        tokens = torch.randint(0, 37, (len(members),), generator=g).tolist()
        logits = lanes.step(tokens)
        for lg, m, t in zip(logits, members, tokens):
            ref, alone[m] = dec.feed(torch.tensor([[t]]), alone[m])
            worst = max(worst, (ref - lg).abs().max().item())
    equal &= all(same(s, alone[m]) for s, m in zip(lanes.states(), members))
    return worst, equal


@pytest.mark.parametrize("kind,opts", [
    ("xl", {}),                                               # cache with rotary positions (seen)
    ("xl", {"smear_keys": True}),                             # cache before rotary positions
    ("xl", {"smear_keys": True, "smear_width": 3, "smear_queries": 2}),   # queries read the cached keys before them
    ("xl", {"qkv_bias": True, "mem_len": 8}),                 # biased projections; caches full and sliding
    ("none", {"mem_len": 0}),                                 # no memory: cache of W - 1 with attention sinks
])
def test_lanes_equal_each_stream_alone_bit_for_bit_as_lanes_join_and_leave(kind, opts):
    dec = Decoder(model_of(kind, **opts), attention_sink=2)
    worst, equal = run_lanes(dec, exact=True)
    assert worst == 0.0 and equal


def test_fast_lanes_equal_each_stream_alone_to_rounding():
    dec = Decoder(model_of("xl"))
    worst, _ = run_lanes(dec, exact=False)
    assert worst < 1e-4


@pytest.mark.parametrize("kind", ["tokens", "knn"])
def test_states_that_do_not_stack_are_fed_one_at_a_time(kind):
    dec = Decoder(model_of(kind, mem_len=8))
    states = prefill(dec, [5, 9])
    assert State.stack(states) is None
    worst, equal = run_lanes(dec, exact=True, steps=6)
    assert worst == 0.0 and equal


def test_stack_right_aligns_caches_of_different_lengths_and_unstack_gives_them_back():
    dec = Decoder(model_of("xl", mem_len=32))
    states = prefill(dec, [2, 9, 5])
    stacked = State.stack(states)
    assert stacked.batch_size == 3 and stacked.kv.length == 9 and stacked.kv.valid.tolist() == [2, 9, 5]
    assert bool((stacked.kv.keys[0][0, :, :7] == 0).all())                 # padding in front
    assert all(same(a, b) for a, b in zip(stacked.unstack(), states))


@pytest.mark.parametrize("kind,opts", [
    ("xl", {"mem_len": 8}),                                   # cache full and sliding
    ("none", {"mem_len": 0}),                                 # cache of W - 1 with attention sinks, past it
])
def test_two_streams_decoded_as_lanes_then_alone_equal_their_solo_runs(kind, opts):
    """The cache is written in place behind itself (memory/kv.py Room): the stacked state and each lane given
    back hold buffers of their own, so two streams that ran as lanes of one batch and then go on alone, fed in
    turns (each writing in place behind its own cache), equal the streams never batched, logits and state."""
    dec = Decoder(model_of(kind, **opts), attention_sink=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 37, (1, n), generator=g) for n in (5, 2)]
    tokens = torch.randint(0, 37, (2, 20), generator=g).tolist()

    def prompted(p: torch.Tensor) -> State:                              # the last token written in place
        return dec.feed(p[:, -1:], dec.feed(p[:, :-1], None)[1])[1]
    solo = []
    for p, toks in zip(prompts, tokens):
        st, out = prompted(p), []
        for t in toks:
            lg, st = dec.feed(torch.tensor([[t]]), st)
            out.append(lg)
        solo.append((out, st))
    states = [prompted(p) for p in prompts]
    assert all(st.kv.room is not None for st in states)                  # spare slots behind the cache
    assert State.stack(states).kv.room is None
    lanes = Lanes(dec)
    lanes.set(states)
    for k in range(8):
        for lg, i in zip(lanes.step([tokens[0][k], tokens[1][k]]), range(2)):
            assert torch.equal(lg, solo[i][0][k]), (i, k)
    alone = lanes.states()
    assert all(st.kv.room is None for st in alone)
    ptrs = {t.untyped_storage().data_ptr() for st in alone for t in (*st.kv.keys, *st.kv.values)}
    assert len(ptrs) == 2 * sum(len(st.kv.keys) for st in alone)        # no buffer shared
    for k in range(8, 20):                                               # alone, in turns
        for i in range(2):
            lg, alone[i] = dec.feed(torch.tensor([[tokens[i][k]]]), alone[i])
            assert torch.equal(lg, solo[i][0][k]), (i, k)
    assert alone[0].kv.room is not None and alone[0].kv.room is not alone[1].kv.room
    assert all(same(a, s) for a, (_, s) in zip(alone, solo))
    if kind == "none":
        assert bool((alone[0].kv.seen > alone[0].kv.valid).all())         # went past the window (sinks kept)
