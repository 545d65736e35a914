"""MemoryLM: shapes, the LMOutput contract, Transformer-XL recurrence invariants
and parity with a hand-written reference forward pass."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from longmem import LMOutput, State
from longmem.models import IGNORE_INDEX, MemoryLM

from conftest import feed_pieces, tiny_config

pytestmark = pytest.mark.invariant

B, V = 2, 37


def tokens(b: int, n: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


run_pieces = feed_pieces          # conftest: read in pieces, carrying the state


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# -- tier 1: shapes and the output contract -----------------------------------
@pytest.mark.parametrize("kind,mem_len", [("none", 0), ("xl", 0), ("xl", 16)])
@pytest.mark.parametrize("n", [1, 8, 21])
def test_lmoutput_shapes_and_loss(make_model, kind, mem_len, n):
    model = make_model(kind=kind, mem_len=mem_len)
    x = tokens(B, n)
    out = model(x)
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (B, n, V)
    assert out.loss is None
    assert isinstance(out.state, State) and out.state.batch_size == B

    y = tokens(B, n, seed=2)
    out = model(x, targets=y)
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (B, n, V)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    close(out.loss, F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1)), atol=1e-6)


@pytest.mark.parametrize("kind,mem_len", [("none", 0), ("xl", 16)])
def test_ignored_targets_do_not_count(make_model, kind, mem_len):
    model = make_model(kind=kind, mem_len=mem_len)
    x, y = tokens(B, 20), tokens(B, 20, seed=2)
    y[0, :7] = IGNORE_INDEX
    y[1, 15:] = IGNORE_INDEX
    out = model(x, targets=y)
    keep = y != IGNORE_INDEX
    logp = out.logits.log_softmax(-1)[keep]                           # (K, V)
    by_hand = -logp.gather(1, y[keep].unsqueeze(1)).mean()
    assert torch.isfinite(out.loss)
    close(out.loss, by_hand, atol=1e-5)
    close(out.loss, F.cross_entropy(out.logits[keep], y[keep]), atol=1e-6)


def test_bad_inputs_raise_value_error(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(5, dtype=torch.long))
    state = model(tokens(2, 4)).state
    with pytest.raises(ValueError, match="lanes"):
        model(tokens(3, 4), state=state)
    with pytest.raises(ValueError, match="reset"):
        model(tokens(2, 4), state=state, reset=torch.tensor([True, False, True]))
    with pytest.raises(ValueError):
        model.set_mem_len(-1)
    with pytest.raises(ValueError, match="xl"):
        make_model(kind="none", mem_len=0).set_mem_len(8)


def test_empty_call_is_handled(make_model):
    """A call with no tokens either returns empty logits with the state unchanged or
    is refused with a ValueError, never an internal IndexError."""
    model = make_model()
    state = model(tokens(B, 5)).state
    try:
        out = model(torch.zeros(B, 0, dtype=torch.long), state=state)
    except ValueError:
        return
    assert out.logits.shape == (B, 0, V)
    assert out.state.xl.length == state.xl.length


def test_set_mem_len_changes_only_this_model(make_model):
    """Two models built from one config: changing the memory of one must not make the
    other's config (which evaluate_ppl reports as mem_len) disagree with its memory."""
    cfg = tiny_config(kind="xl", mem_len=8)
    a, b = MemoryLM(cfg), MemoryLM(cfg)
    a.set_mem_len(32)
    assert a.xl.mem_len == a.config.memory.mem_len == 32
    assert b.xl.mem_len == b.config.memory.mem_len == 8


def test_memory_is_detached(make_model):
    model = make_model().train()
    out = model(tokens(B, 12), targets=tokens(B, 12, seed=2))
    assert out.state.xl is not None and out.state.xl.length > 0
    assert not any(m.requires_grad for m in out.state.xl.mems)
    # a loss on the second call back-propagates without touching the first graph twice
    out2 = model(tokens(B, 12, seed=3), state=out.state, targets=tokens(B, 12, seed=4))
    out.loss.backward()
    out2.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- tier 2: recurrence invariants ---------------------------------------------
# smeared keys: the previous key; wider, and queries mixed with the keys before them (they reach back into memory)
SMEARS = [{}, {"smear_keys": True}, {"smear_keys": True, "smear_width": 4, "smear_queries": 3}]


@pytest.mark.parametrize("smear", SMEARS)
@pytest.mark.parametrize("piece", [1, 3, 8, 17])
def test_xl_pieces_with_memory_equal_one_full_causal_pass(make_model, piece, smear):
    n = 40
    model = make_model(kind="xl", mem_len=n, segment_len=8, **smear)
    reference = make_model(kind="none", mem_len=0, segment_len=64, **smear)   # one causal pass
    reference.load_state_dict(model.state_dict())
    x = tokens(3, n)
    with torch.no_grad():
        full = reference(x).logits
        pieces, state = run_pieces(model, x, piece)
    close(pieces, full)
    assert state.xl.length == n


@pytest.mark.parametrize("mem_len", [40, 64])
def test_xl_one_call_longer_than_segment_len_equals_full_pass(make_model, mem_len):
    n = 40
    model = make_model(kind="xl", mem_len=mem_len, segment_len=8)    # split into 5 segments inside
    reference = make_model(kind="xl", mem_len=mem_len, segment_len=64)
    reference.load_state_dict(model.state_dict())
    x = tokens(B, n)
    with torch.no_grad():
        close(model(x).logits, reference(x).logits)


def test_xl_with_short_memory_differs_from_full_pass(make_model):
    # the exactness tests above can fail: a memory shorter than the stream changes the logits
    model = make_model(kind="xl", mem_len=4, segment_len=8)
    reference = make_model(kind="none", mem_len=0, segment_len=64)
    reference.load_state_dict(model.state_dict())
    x = tokens(B, 40)
    with torch.no_grad():
        diff = (model(x).logits - reference(x).logits).abs()
    assert diff[:, :8].max() < 1e-4              # first segment: nothing forgotten yet
    assert diff[:, 12:].max() > 1e-2


def test_xl_mem_len_zero_equals_no_memory(make_model):
    xl0 = make_model(kind="xl", mem_len=0, segment_len=8)
    none = make_model(kind="none", mem_len=0, segment_len=8, seed=5)
    none.load_state_dict(xl0.state_dict())
    x = tokens(B, 8 * 4 + 5)
    with torch.no_grad():
        close(xl0(x).logits, none(x).logits, atol=1e-6)
        a, _ = run_pieces(xl0, x, 11)
        b, _ = run_pieces(none, x, 11)
    close(a, b, atol=1e-6)


def test_lanes_are_independent(make_model):
    model = make_model(kind="xl", mem_len=12, segment_len=8)
    x = tokens(B, 40)
    x_other = x.clone()
    x_other[1] = tokens(1, 40, seed=9)[0]
    assert not torch.equal(x[1], x_other[1])
    with torch.no_grad():
        a, _ = run_pieces(model, x, 10)          # several segments, memory carried across calls
        b, _ = run_pieces(model, x_other, 10)
    close(a[0], b[0], atol=1e-6)
    assert (a[1] - b[1]).abs().max() > 1e-2


@pytest.mark.parametrize("smear", SMEARS)
def test_reset_lane_equals_fresh_model(make_model, smear):
    # smeared keys and queries: the first tokens after a reset must not take the stale last keys of the memory as
    # their predecessors
    model = make_model(kind="xl", mem_len=16, segment_len=8, **smear)
    with torch.no_grad():
        _, state = run_pieces(model, tokens(B, 24), 8)          # fill the memory
        assert bool((state.xl.valid == 16).all())
        x, nxt = tokens(B, 8, seed=3), tokens(B, 8, seed=4)
        out = model(x, state=state, reset=torch.tensor([True, False]))
        fresh = model(x)
        kept = model(x, state=state)
        close(out.logits[0], fresh.logits[0])
        assert (out.logits[1] - fresh.logits[1]).abs().max() > 1e-2
        close(out.logits[1], kept.logits[1], atol=1e-6)          # lane 1 did not see the reset
        assert out.state.xl.valid.tolist() == [8, 16]
        # and the reset lane keeps behaving like the fresh model afterwards
        close(model(nxt, state=out.state).logits[0], model(nxt, state=fresh.state).logits[0])


def test_smeared_keys_mix_in_the_previous_key(make_model):
    plain = make_model(kind="xl", mem_len=16, segment_len=8)
    smeared = make_model(kind="xl", mem_len=16, segment_len=8, smear_keys=True)
    smeared.load_state_dict(plain.state_dict(), strict=False)        # the same weights, plus the mixing logits
    x = tokens(B, 24)
    with torch.no_grad():
        for block in smeared.blocks:
            block.attn.smear.fill_(0.0)                              # half this key, half the previous one
        assert (smeared(x).logits - plain(x).logits).abs().max() > 1e-2
        for block in smeared.blocks:
            block.attn.smear.fill_(50.0)                             # sigmoid = 1: the key alone
        close(smeared(x).logits, plain(x).logits, atol=1e-5)
        keys = torch.randn(1, 2, 4, 3)
        from longmem.models.attention import smear
        mixed = smear(keys, torch.tensor([0.0, 50.0]))
        close(mixed[0, 0, 1:], (keys[0, 0, 1:] + keys[0, 0, :-1]) / 2, atol=1e-6)
        close(mixed[0, 0, 0], keys[0, 0, 0] / 2, atol=1e-6)         # the first key has no predecessor
        close(mixed[0, 1], keys[0, 1], atol=1e-6)


def test_wider_smears_are_causal_convolutions_of_the_keys(make_model):
    """smear_width w: key s is sum_j softmax(mix)_j k_{s-j}; smear_queries w - 1: query t is softmax(mix)_0 q_t +
    sum_j softmax(mix)_j k_{t-j} (zeros before the context). Width 2 keeps the one-logit form of saved runs."""
    from longmem.models.attention import smear, smear_queries
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 4, 5, 4, generator=g)   # G 2, H 4, S 9, T 5
    mix, qmix = torch.randn(2, 4, generator=g), torch.randn(4, 3, generator=g)
    want = torch.zeros_like(keys)
    w = mix.softmax(-1)
    for s in range(9):
        for j in range(4):
            if s - j >= 0:
                want[:, :, s] += w[:, j].view(1, 2, 1) * keys[:, :, s - j]
    close(smear(keys, mix), want, atol=1e-6)
    close(smear(keys, torch.zeros(2, 2)), smear(keys, torch.zeros(2)), atol=1e-6)
    a = qmix.softmax(-1)
    want_q = q * a[:, 0].view(1, 4, 1, 1)
    for t in range(5):
        for j in (1, 2):
            want_q[:, :, t] += a[:, j].view(1, 4, 1) * keys[:, [0, 0, 1, 1], 4 + t - j]   # query head -> key head
    close(smear_queries(q, keys, qmix), want_q, atol=1e-6)
    model = make_model(kind="xl", mem_len=16, segment_len=8, smear_keys=True, smear_width=4, smear_queries=3)
    assert tuple(model.blocks[0].attn.smear.shape) == (2, 4) and tuple(model.blocks[0].attn.smear_q.shape) == (2, 4)
    fresh = MemoryLM(tiny_config(smear_keys=True, smear_width=4, smear_queries=3)).blocks[0].attn
    assert fresh.smear_q.softmax(-1)[0, 0].item() == pytest.approx(0.5)   # the query's own half at the start
    assert fresh.smear.softmax(-1)[0, 0].item() == pytest.approx(0.5)     # and the key's
    assert not model._plain_positions                                   # caches keep keys before rotation
    with pytest.raises(ValueError, match="smear_width"):
        tiny_config(smear_keys=True, smear_width=1)
    with pytest.raises(ValueError, match="smear_queries"):
        tiny_config(smear_queries=-1)


def test_reset_with_no_state_is_a_fresh_start(make_model):
    model = make_model()
    x = tokens(B, 8)
    with torch.no_grad():
        close(model(x, reset=torch.tensor([True, True])).logits, model(x).logits, atol=1e-6)


def test_ten_thousand_segments_stay_finite_and_inside_the_window(make_model):
    mem_len, seg = 4, 4
    model = make_model(kind="xl", mem_len=mem_len, segment_len=seg, vocab_size=32, d_model=16, n_layers=1)
    x = torch.randint(0, 32, (1, 10_000 * seg), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (1, 40_000, 32)
    assert torch.isfinite(out.logits).all()
    assert model.rope.max_position_seen < mem_len + seg
    assert out.state.xl.length == mem_len
    # no drift: with one layer the memory is the last mem_len inputs, so the last segment
    # equals a fresh call over just the last mem_len + segment_len tokens
    with torch.no_grad():
        tail = model(x[:, -(mem_len + seg):]).logits[:, mem_len:]
    close(out.logits[:, -seg:], tail)


def test_longer_memory_at_evaluation(make_model):
    mem_len = 8
    model = make_model(kind="xl", mem_len=mem_len, segment_len=8)
    with torch.no_grad():
        _, state = run_pieces(model, tokens(B, 32), 8)
        assert state.xl.length == mem_len
        model.set_mem_len(2 * mem_len)
        assert model.config.memory.mem_len == 2 * mem_len
        lengths = []
        for i in range(4):
            state = model(tokens(B, 8, seed=10 + i), state=state).state
            lengths.append(state.xl.length)
        assert lengths == [16, 16, 16, 16]
        assert state.xl.valid.tolist() == [16, 16]
        # from scratch the memory grows segment by segment up to the new length
        state, lengths = None, []
        for i in range(4):
            state = model(tokens(B, 4, seed=20 + i), state=state).state
            lengths.append(state.xl.length)
        assert lengths == [4, 8, 12, 16]
        # back to a shorter memory: a longer state is trimmed on the next call
        model.set_mem_len(4)
        state = model(tokens(B, 3), state=state).state
        assert state.xl.length == 4


def test_longer_memory_matches_full_pass(make_model):
    # a model "trained" with mem_len 8, evaluated with mem_len 40 >= stream, is exact again
    model = make_model(kind="xl", mem_len=8, segment_len=8)
    reference = make_model(kind="none", mem_len=0, segment_len=64)
    reference.load_state_dict(model.state_dict())
    model.set_mem_len(40)
    x = tokens(B, 40)
    with torch.no_grad():
        close(run_pieces(model, x, 5)[0], reference(x).logits)


def test_state_round_trips_through_safetensors(make_model):
    model = make_model(kind="xl", mem_len=12, segment_len=8)
    x, y = tokens(B, 20), tokens(B, 9, seed=2)
    with torch.no_grad():
        state = model(x).state
        restored = State.from_state_dict(st_load(st_save(state.state_dict())))
        assert restored.parts() == ["xl"]
        close(model(y, state=restored).logits, model(y, state=state).logits, atol=0)
    with pytest.raises(ValueError, match="batch_size"):
        State.from_state_dict({"xl.valid": torch.zeros(2)})


# -- tier 3: parity with an independent reference -----------------------------
def reference_forward(model, x: torch.Tensor) -> torch.Tensor:
    """A plain causal pass written from the paper formulas: pre-norm RMSNorm blocks,
    rotary positions (rotate-half pairs), softmax attention, GELU MLP, tied head."""
    c = model.config
    H, Dh = c.n_heads, c.d_model // c.n_heads
    n = x.shape[1]

    def rms(h, w):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(t):                                               # t: (B, H, N, Dh)
        pos = torch.arange(n, dtype=torch.float64)
        freq = c.rope_theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        angle = torch.outer(pos, freq)
        z = torch.complex(t[..., :Dh // 2].double(), t[..., Dh // 2:].double()) * torch.polar(
            torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1).float()

    h = model.embed.weight[x]
    causal = torch.ones(n, n).tril().bool()
    for blk in model.blocks:
        a = rms(h, blk.norm1.weight)
        q = (a @ blk.attn.q.weight.T).view(*a.shape[:2], H, Dh).transpose(1, 2)
        kv = a @ blk.attn.kv.weight.T
        k = kv[..., :c.d_model].reshape(*a.shape[:2], H, Dh).transpose(1, 2)
        v = kv[..., c.d_model:].reshape(*a.shape[:2], H, Dh).transpose(1, 2)
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(h.shape)
        h = h + y @ blk.attn.out.weight.T
        m = rms(h, blk.norm2.weight) @ blk.mlp.up.weight.T
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        h = h + m @ blk.mlp.down.weight.T
    return rms(h, model.norm.weight) @ model.embed.weight.T


@pytest.mark.parametrize("kind,mem_len,segment_len", [("none", 0, 32), ("xl", 32, 32), ("xl", 32, 8)])
def test_matches_hand_written_reference(make_model, kind, mem_len, segment_len):
    model = make_model(kind=kind, mem_len=mem_len, segment_len=segment_len)
    x = tokens(B, 32)
    with torch.no_grad():
        close(model(x).logits, reference_forward(model, x))


def test_head_is_tied_to_embedding(make_model):
    model = make_model()
    assert model.head.weight is model.embed.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def grouped_model(*, mem_len: int, position_range: int, position_window: int = 0) -> MemoryLM:
    """A tiny spread-weight XL model (segment 8) with grouped distant positions (``model.position_range``)."""
    from conftest import spread_weights
    config = tiny_config(kind="xl", mem_len=mem_len, segment_len=8)
    config.position_range, config.position_window = position_range, position_window
    return spread_weights(MemoryLM(config), seed=0).eval()


def test_grouped_positions_leave_the_trained_window_unchanged():
    # trained window 16 + 8 = 24 positions: a memory that fits reads exactly as without the setting
    x = tokens(B, 48)
    with torch.no_grad():
        plain = grouped_model(mem_len=16, position_range=0)(x).logits
        assert torch.equal(grouped_model(mem_len=16, position_range=24)(x).logits, plain)
        # evaluation's cache then keeps keys before rotation (rotated once more per segment): the same numbers
        close(run_pieces(grouped_model(mem_len=16, position_range=24).for_decoding(), x, 5)[0],
              run_pieces(grouped_model(mem_len=16, position_range=0).for_decoding(), x, 5)[0])
        # one position less of range and the far keys are grouped: the logits change
        assert (grouped_model(mem_len=16, position_range=23)(x).logits - plain).abs().max() > 1e-2


def test_grouped_positions_keep_near_distances_and_stay_in_range():
    from longmem.models.attention import grouped_positions
    S, T, limit, window = 72, 8, 24, 10
    pos = torch.arange(S, dtype=torch.float32).unsqueeze(1)           # a "table" that reads back positions
    g = grouped_positions(pos, pos, n_queries=T, limit=limit, window=window)
    assert g is not None and g.group > 1
    assert grouped_positions(pos[:limit], pos[:limit], n_queries=T, limit=limit, window=window) is None
    q, k = g.q_cos[:, 0], g.k_cos[:, 0]
    exact = pos[S - T:] - pos.T                                        # (T, S) distances in the window
    grouped = q.unsqueeze(1) - k.unsqueeze(0)
    causal = exact >= 0
    assert torch.equal(g.near & causal, (exact < window) & causal)
    far = ~g.near & causal
    assert int(grouped[far].max()) <= limit - 1                        # no distance beyond the trained range
    assert int(grouped[far].min()) >= window - g.group                 # and past the neighbour window, about
    assert bool((grouped[far][1:] >= 0).all())


def test_grouped_positions_xl_memory_equals_its_cache():
    # 4x the trained memory: evaluation's key/value cache (keys before rotation) reads as the XL hidden states
    model = grouped_model(mem_len=64, position_range=24)
    x = tokens(B, 96)
    with torch.no_grad():
        full = model(x).logits
        close(run_pieces(model.for_decoding(), x, 8)[0], full)
        close(run_pieces(model, x, 16)[0], full)
        assert (grouped_model(mem_len=64, position_range=0)(x).logits - full).abs().max() > 1e-2


def test_xl_reading_part_of_a_longer_memory_equals_the_shorter_memory(make_model):
    # randomized memory lengths (train.mem_len_max): 32 slots kept, the last 16 read == a memory of 16
    short, long = make_model(kind="xl", mem_len=16), make_model(kind="xl", mem_len=32)
    long.xl.read_len = 16
    x = tokens(B, 64)
    with torch.no_grad():
        logits, state = run_pieces(long, x, 8)
        close(logits, run_pieces(short, x, 8)[0])
        assert state.xl.length == 32                                   # everything kept for the next step
        long.xl.read_len = None
        assert (run_pieces(long, x, 8)[0] - logits).abs().max() > 1e-2
