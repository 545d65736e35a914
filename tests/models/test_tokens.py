"""Recurrent memory tokens (RMT): the state, pieces vs whole, lanes and reset, and
backpropagation through segments (the gradient reaches earlier segments only inside
the bptt window)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from longmem import State
from longmem.data.stream import Batch
from longmem.models import IGNORE_INDEX
from longmem.training.state import concat_lane_states, slice_lane_state
from longmem.training.task import forward_window

pytestmark = pytest.mark.invariant

B, V, SEG, R = 2, 37, 8, 3


def tokens(b: int, n: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def rmt(make_model):
    def make(*, mem_len: int = 0, **kw):
        return make_model(kind="tokens", mem_len=mem_len, segment_len=SEG, n_mem_tokens=R, **kw)
    return make


def run_pieces(model, x: torch.Tensor, piece: int, state: State | None = None) -> tuple[torch.Tensor, State]:
    logits = []
    for start in range(0, x.shape[1], piece):
        out = model(x[:, start:start + piece], state=state)
        state, _ = out.state, logits.append(out.logits)
    return torch.cat(logits, dim=1), state


def test_state_shape_dtype_and_fresh_flags(rmt):
    model = rmt()
    state = model.init_state(B)
    assert state.parts() == ["xl", "tokens"]
    assert state.tokens.mem.shape == (B, R, 16) and state.tokens.mem.dtype == torch.float32
    assert state.tokens.fresh.dtype == torch.bool and state.tokens.fresh.tolist() == [True, True]
    with torch.no_grad():
        out = model(tokens(B, 2 * SEG + 3))
    assert out.logits.shape == (B, 2 * SEG + 3, V)
    assert out.state.tokens.mem.shape == (B, R, 16) and out.state.tokens.mem.dtype == torch.float32
    assert out.state.tokens.fresh.tolist() == [False, False]
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))
    assert any(p is model.tokens.initial for p in model.parameters())     # the initial memory is learned
    from longmem.training.optim import param_groups
    decay, no_decay = param_groups(model, 0.1)
    assert any(p is model.tokens.initial for p in no_decay["params"])    # an embedding: not decayed
    assert all(p is not model.tokens.initial for p in decay["params"])
    x = tokens(B, SEG)
    with torch.no_grad():
        before = model(x).logits
        model.tokens.initial.add_(1.0)                                     # a fresh lane reads it
        assert (model(x).logits - before).abs().max() > 1e-2


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("mem_len", [0, 16])
def test_one_call_equals_calls_of_one_segment_each(rmt, mem_len, gate):
    model = rmt(mem_len=mem_len, token_gate=gate)
    x = tokens(B, 5 * SEG + 3)                      # the last segment is partial
    with torch.no_grad():
        whole = model(x)
        pieces, state = run_pieces(model, x, SEG)
        double, _ = run_pieces(model, x, 2 * SEG)   # each call split into two segments inside
    torch.testing.assert_close(pieces, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(double, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.tokens.mem, whole.state.tokens.mem, atol=1e-5, rtol=0)


def test_memory_carries_the_first_segment_forward(rmt, make_model):
    """Later segments depend on the first one through the memory tokens alone (mem_len 0), unlike
    a model without memory: the pieces-vs-whole test above would pass for a memory that did nothing."""
    model = rmt(mem_len=0)
    none = make_model(kind="none", mem_len=0, segment_len=SEG)
    x = tokens(B, 4 * SEG)
    y = x.clone()
    y[:, :SEG] = tokens(B, SEG, seed=7)             # only the first segment differs
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
        n_a, n_b = none(x).logits, none(y).logits
    assert (a[:, 3 * SEG:] - b[:, 3 * SEG:]).abs().max() > 1e-2       # three segments later
    torch.testing.assert_close(n_a[:, SEG:], n_b[:, SEG:], atol=1e-6, rtol=0)


def test_gated_update_open_replaces_and_closed_keeps_the_memory(rmt):
    plain, gated = rmt(), rmt(token_gate=True)
    gated.load_state_dict(plain.state_dict(), strict=False)          # the same weights, plus the gate
    x = tokens(B, 3 * SEG)
    with torch.no_grad():
        gated.tokens.gate.weight.zero_()
        gated.tokens.gate.bias.fill_(50.0)                           # g = 1: the written outputs replace it
        torch.testing.assert_close(gated(x).logits, plain(x).logits, atol=1e-5, rtol=0)
        gated.tokens.gate.bias.fill_(-50.0)                          # g = 0: the memory never changes
        out = gated(x)
        torch.testing.assert_close(out.state.tokens.mem, gated.tokens.initial.expand(B, R, -1), atol=1e-6, rtol=0)
        fresh = gated(x[:, 2 * SEG:]).logits                         # the last segment read from a fresh state
        torch.testing.assert_close(out.logits[:, 2 * SEG:], fresh, atol=1e-5, rtol=0)
        gated.tokens.gate.bias.fill_(0.0)                            # half-open: differs from both
        assert (gated(x).logits[:, SEG:] - plain(x).logits[:, SEG:]).abs().max() > 1e-3


def test_stretched_gate_closes_and_opens_exactly(rmt):
    """A moderate gate logit (-3) leaves the plain sigmoid gate 5% open, so the memory drifts; stretched
    (token_gate_stretch 0.1) the same logit closes it exactly, and +3 opens it exactly (replacement)."""
    plain, gated = rmt(), rmt(token_gate=True)
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = tokens(B, 3 * SEG)
    initial = gated.tokens.initial.expand(B, R, -1)
    with torch.no_grad():
        gated.tokens.gate.weight.zero_()
        gated.tokens.gate.bias.fill_(-3.0)
        assert (gated(x).state.tokens.mem - initial).abs().max() > 1e-2         # sigmoid(-3) = 0.047
        gated.tokens.stretch = 0.1
        torch.testing.assert_close(gated(x).state.tokens.mem, initial, atol=0, rtol=0)
        gated.tokens.gate.bias.fill_(3.0)
        torch.testing.assert_close(gated(x).logits, plain(x).logits, atol=1e-5, rtol=0)


def test_gate_floor_keeps_the_memory_under_small_gates_and_passes_the_gradient(rmt):
    """memory.token_gate_floor: a gate below it is 0 (memory kept exactly), one above it is unchanged, in
    evaluation and training; the loss still reaches a floored gate (straight through)."""
    model = rmt(token_gate=True)
    model.tokens.stretch = 0.1
    x = tokens(B, 2 * SEG)
    initial = model.tokens.initial.detach().expand(B, R, -1)
    with torch.no_grad():
        model.tokens.gate.weight.zero_()
        model.tokens.gate.bias.fill_(-2.0)                           # g = 1.2 sigmoid(-2) - 0.1 = 0.0430
        crept = model(x).state.tokens.mem
        assert (crept - initial).abs().max() > 1e-3
        model.tokens.floor = 0.05
        torch.testing.assert_close(model(x).state.tokens.mem, initial, atol=0, rtol=0)
        model.tokens.floor = 0.04
        torch.testing.assert_close(model(x).state.tokens.mem, crept, atol=0, rtol=0)
    model.tokens.floor = 0.05
    model.train()
    out = model(x)
    torch.testing.assert_close(out.state.tokens.mem, initial.expand_as(out.state.tokens.mem), atol=0, rtol=0)
    out.logits[:, SEG:].logsumexp(-1).sum().backward()
    assert model.tokens.gate.bias.grad.abs().max() > 0


def test_gate_charge_is_the_aux_loss_of_full_segments_in_training(rmt):
    model = rmt(token_gate=True)
    model.tokens.stretch = 0.1
    x = tokens(B, 3 * SEG + 3)                                       # 3 written segments, one partial
    with torch.no_grad():
        model.tokens.gate.weight.zero_()
        model.tokens.gate.bias.fill_(-1.0)                           # g = 1.2 sigmoid(-1) - 0.1 = 0.2227 everywhere
        assert model(x).aux_loss is None                             # not at evaluation
        model.train()
        aux = model(x).aux_loss
    g = 1.2 * torch.sigmoid(torch.tensor(-1.0)) - 0.1
    torch.testing.assert_close(aux, B * 3 * (g + 0.05))              # charged g + e/2 per lane and write


def test_shut_stretched_gate_learns_to_open_and_penalty_keeps_a_margin(rmt):
    """Straight through: with the gate clipped shut the loss still reaches the gate (it can reopen).
    The penalty pushes an open gate shut, and a shut one further down to half the stretch below 0, no further."""
    model = rmt(token_gate=True)
    model.tokens.stretch = 0.1
    model.train()
    x = tokens(B, 3 * SEG)
    with torch.no_grad():
        model.tokens.gate.weight.mul_(0.01)
        model.tokens.gate.bias.fill_(-5.0)                           # clipped to 0 whatever the written outputs
    out = model(x)
    torch.testing.assert_close(out.state.tokens.mem[0], model.tokens.initial.detach(), atol=0, rtol=0)
    out.logits[:, SEG:].logsumexp(-1).sum().backward()
    assert model.tokens.gate.bias.grad.abs().max() > 0
    # bias 0: open (g = 0.5); -2.5: shut (g = -0.009) inside the margin; -5: shut (g = -0.092) below it
    for bias, pushed in ((0.0, True), (-2.5, True), (-5.0, False)):
        with torch.no_grad():
            model.tokens.gate.bias.fill_(bias)
        model.zero_grad()
        model(x).aux_loss.backward()
        grad = model.tokens.gate.bias.grad
        assert (grad > 0).all() if pushed else (grad == 0).all()    # descent lowers the gate


def test_lanes_are_independent(rmt):
    model = rmt(mem_len=8)
    x = tokens(B, 4 * SEG)
    other = x.clone()
    other[1] = tokens(1, 4 * SEG, seed=9)[0]
    with torch.no_grad():
        a, sa = run_pieces(model, x, SEG)
        b, sb = run_pieces(model, other, SEG)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sa.tokens.mem[0], sb.tokens.mem[0], atol=1e-6, rtol=0)
    assert (a[1] - b[1]).abs().max() > 1e-2


def test_reset_lane_starts_from_the_learned_memory(rmt):
    model = rmt(mem_len=8)
    with torch.no_grad():
        _, state = run_pieces(model, tokens(B, 3 * SEG), SEG)
        x, nxt = tokens(B, SEG, seed=3), tokens(B, SEG, seed=4)
        out = model(x, state=state, reset=torch.tensor([True, False]))
        fresh, kept = model(x), model(x, state=state)
        torch.testing.assert_close(out.logits[0], fresh.logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logits[1], kept.logits[1], atol=1e-6, rtol=0)
        assert (out.logits[0] - kept.logits[0]).abs().max() > 1e-2
        torch.testing.assert_close(model(nxt, state=out.state).logits[0], model(nxt, state=fresh.state).logits[0],
                                   atol=1e-5, rtol=0)
        reset = state.reset(torch.tensor([False, True]))
    assert reset.tokens.fresh.tolist() == [False, True]
    assert reset.tokens.mem[1].abs().max() == 0 and torch.equal(reset.tokens.mem[0], state.tokens.mem[0])


def test_state_round_trips_through_safetensors_and_lane_slices(rmt):
    model = rmt(mem_len=8)
    with torch.no_grad():
        state = model(tokens(B, 2 * SEG)).state.reset(torch.tensor([False, True]))
        d = state.state_dict()
        restored = State.from_state_dict(st_load(st_save(d)))
        assert restored.parts() == ["xl", "tokens"] and restored.tokens.fresh.tolist() == [False, True]
        y = tokens(B, SEG, seed=5)
        torch.testing.assert_close(model(y, state=restored).logits, model(y, state=state).logits, atol=0, rtol=0)
    # checkpoints of several ranks join and split the tokens memory along the lanes
    joined = concat_lane_states([d, d])
    assert joined["tokens.mem"].shape == (2 * B, R, 16)
    back = slice_lane_state(joined, range(B, 2 * B))
    assert torch.equal(back["tokens.mem"], d["tokens.mem"]) and torch.equal(back["tokens.fresh"], d["tokens.fresh"])


def test_a_state_of_another_size_is_refused(rmt, make_model):
    state = rmt()(tokens(B, SEG)).state
    other = make_model(kind="tokens", mem_len=0, segment_len=SEG, d_model=32)
    with pytest.raises(ValueError, match="n_tokens"):
        other(tokens(B, SEG), state=state)


# -- backpropagation through segments -----------------------------------------
def _segments(n: int) -> list[Batch]:
    """n consecutive segments of B lanes; only the last one has targets."""
    out = []
    for i in range(n):
        targets = tokens(B, SEG, seed=100 + i) if i == n - 1 else torch.full((B, SEG), IGNORE_INDEX)
        out.append(Batch(inputs=tokens(B, SEG, seed=10 + i), targets=targets, reset=torch.zeros(B, dtype=torch.bool)))
    return out


def _first_segment_grad(model, *, window: int, checkpoint: bool = False) -> torch.Tensor:
    """Train-loop semantics: windows of ``window`` segments, the state detached between windows;
    returns the gradient at the first segment's input embeddings (zero if none reaches them)."""
    model.train()
    seen = []

    def keep(module, args, output):
        if not seen:
            output.retain_grad()
            seen.append(output)
    handle = model.embed.register_forward_hook(keep)
    batches, state = _segments(2), None
    try:
        for start in range(0, len(batches), window):
            loss, state = forward_window(model, batches[start:start + window], state, device=torch.device("cpu"),
                                         amp_dtype=None, checkpoint=checkpoint)
            if loss.requires_grad:
                loss.backward()
            state = state.detach()
    finally:
        handle.remove()
    return seen[0].grad if seen[0].grad is not None else torch.zeros_like(seen[0])


def test_gradient_reaches_the_first_segment_only_inside_the_bptt_window(rmt, make_model):
    model = rmt(mem_len=0)
    assert _first_segment_grad(model, window=2).abs().max() > 0           # K = 2: through the memory tokens
    model.zero_grad()
    assert _first_segment_grad(model, window=1).abs().max() == 0          # K = 1: detached between segments
    xl = make_model(kind="xl", mem_len=16, segment_len=SEG)
    assert _first_segment_grad(xl, window=2).abs().max() == 0             # XL memory is always detached


def test_activation_checkpointing_gives_the_same_gradients(rmt):
    model = rmt(mem_len=8)
    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        g_first = _first_segment_grad(model, window=2, checkpoint=checkpoint)
        grads.append([g_first] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_generation_token_by_token_equals_one_call_in_bounded_memory(rmt):
    """The decoder feeds memory tokens a token at a time: the logits equal one call over the whole text
    (the memory written once per full segment, as in training), and the state never holds more than
    the memory and one unfinished segment."""
    from longmem.generation.decoding import Decoder
    from longmem.generation.session import state_nbytes
    model = rmt(mem_len=4).eval()
    dec = Decoder(model)
    x = tokens(B, 5 * SEG + 3)
    with torch.no_grad():
        whole = model(x).logits
    memory, sizes = None, []
    for t in range(x.shape[1]):
        logits, memory = dec.feed(x[:, t:t + 1], memory)
        torch.testing.assert_close(logits, whole[:, t], atol=1e-4, rtol=1e-4)
        sizes.append(state_nbytes(memory))
        assert memory.pending.shape[1] == (t + 1) % SEG
    assert max(sizes[SEG:]) == max(sizes[2 * SEG:])                 # bounded: no growth after the first segments
    assert dec.cache_positions() == 4 + SEG - 1


@pytest.mark.e2e
def test_curriculum_grows_the_task_examples_and_the_bptt_window(tmp_path, monkeypatch, one_thread):
    """task passkey, curriculum 1,2 over 4 steps: steps 1-2 read one-segment examples one segment per
    step, steps 3-4 two-segment examples two segments per step (one window = one example)."""
    from longmem.config import RunConfig
    from longmem.data.stream import TaskStream
    from longmem.training.trainer import train
    seen = []
    real = TaskStream.__next__

    def spy(self):
        batch = real(self)
        seen.append((self.length, bool(batch.reset.all())))
        return batch
    monkeypatch.setattr(TaskStream, "__next__", spy)
    cfg = RunConfig().override({
        "task.name": "passkey", "task.length": "256", "task.n_test": "2", "model.d_model": "16",
        "model.n_layers": "1", "model.n_heads": "2", "model.segment_len": "128", "memory.kind": "tokens",
        "memory.tokens.n_tokens": "2", "data.tokenizer": "char", "data.batch_size": "2", "train.max_steps": "4",
        "train.bptt_segments": "4", "train.curriculum": "1,2", "train.eval_every": "0", "train.progress": "false"})
    res = train(cfg, tmp_path / "run")
    assert res.steps == 4
    assert seen == [(128, True), (128, True), (256, True), (256, False), (256, True), (256, False)]


def test_forward_window_adds_the_weighted_aux_loss_only_when_asked(rmt):
    """The trainer's window loss is the summed cross-entropy, plus train.aux_weight times the memories'
    auxiliary loss from train.aux_start on."""
    model = rmt(token_gate=True)
    model.train()
    batches = _segments(3)
    kw = dict(device=torch.device("cpu"), amp_dtype=None)
    with torch.no_grad():
        plain, _ = forward_window(model, batches, None, **kw)
        charged, _ = forward_window(model, batches, None, aux_weight=0.5, **kw)
        whole = model(torch.cat([b.inputs for b in batches], dim=1))          # one call over the 3 segments
    ce = torch.nn.functional.cross_entropy(whole.logits[:, 2 * SEG:].flatten(0, 1), batches[2].targets.flatten(),
                                           reduction="sum")
    torch.testing.assert_close(plain, ce, atol=1e-4, rtol=0)
    assert whole.aux_loss > 0                                    # three segments of a half-open gate charged
    torch.testing.assert_close(charged - plain, 0.5 * whole.aux_loss, atol=1e-4, rtol=0)
