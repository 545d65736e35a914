"""Sparse local + global attention (kind local_global, Longformer-style, causal): with a window covering the stream
it is full causal attention; a token sees nothing beyond its window but the global positions; pieces of any size
equal one pass with the banded mask, also far past the window; lanes are independent, a reset lane is fresh, the
state round-trips, and the cache stays bounded."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from longmem import State
from longmem.config import LocalGlobalConfig, MemoryConfig
from longmem.models import MemoryLM

from conftest import feed_pieces, random_tokens, tiny_llama

pytestmark = pytest.mark.invariant

V = 37


def lg_model(*, window=6, n_global=2, segment_len=8, n_layers=2, kind="local_global", smear=False,
             seed=0) -> MemoryLM:
    """A tiny Llama-style model (GQA 4/2 heads, SwiGLU, untied head) with local + global attention."""
    memory = (MemoryConfig(kind=kind, local_global=LocalGlobalConfig(window=window, n_global=n_global))
              if kind == "local_global" else MemoryConfig())
    return tiny_llama(memory, segment_len=segment_len, n_layers=n_layers, smear_keys=smear, seed=seed)


tokens, feed = random_tokens, feed_pieces


@pytest.mark.parametrize("piece", [8, 3, 1])
def test_a_window_covering_the_stream_is_full_causal_attention(piece):
    model = lg_model(window=64, n_global=0)
    full = lg_model(kind="none", segment_len=40)
    full.load_state_dict(model.state_dict())
    x = tokens(2, 40)
    with torch.no_grad():
        got, _ = feed(model, x, piece)
        torch.testing.assert_close(got, full(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("piece", [8, 3, 1])
def test_pieces_equal_one_pass_with_the_banded_mask(piece):
    """The reference reads the whole stream as one segment (the band is then only a mask, no cache); the pieces
    carry the window and the globals across segments, far past the window."""
    model = lg_model()
    one = lg_model(segment_len=60)
    one.load_state_dict(model.state_dict())
    x = tokens(2, 60)
    with torch.no_grad():
        got, state = feed(model, x, piece)
        torch.testing.assert_close(got, one(x).logits, atol=1e-4, rtol=0)
        whole = model(x).logits                                           # segments of 8 in one call
        torch.testing.assert_close(whole, got, atol=1e-4, rtol=0)
    assert state.local_global.length == 6 + 2 and state.local_global.valid.tolist() == [8, 8]
    dense = lg_model(kind="none", segment_len=60)
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (dense(x).logits - got).abs().max() > 1e-2               # the band really narrows the attention


def test_a_token_sees_nothing_beyond_its_window_except_the_global_positions():
    model = lg_model(window=4, n_global=2)                                # 2 layers: reach 2 * 4 tokens back
    x = tokens(1, 40)
    with torch.no_grad():
        base = model(x).logits[0, 30]

        def changed(position: int) -> float:
            y = x.clone()
            y[0, position] = (y[0, position] + 1) % V
            return float((model(y).logits[0, 30] - base).abs().max())
        assert changed(2) == 0 and changed(10) == 0 and changed(21) == 0   # out of reach, not global
        assert changed(1) > 1e-3 and changed(0) > 1e-3                      # global: seen from anywhere
        assert changed(22) > 1e-3 and changed(29) > 1e-3                    # within two windows


def test_smeared_keys_read_the_cache_at_its_slots_and_stay_banded():
    model = lg_model(window=4, n_global=2, smear=True)
    x = tokens(1, 40)
    with torch.no_grad():
        base, _ = feed(model, x, 8)
        y = x.clone()
        y[0, 10] = (y[0, 10] + 1) % V
        other, _ = feed(model, y, 8)
    assert torch.isfinite(base).all()
    assert float((other[0, 30] - base[0, 30]).abs().max()) == 0


def test_lanes_are_independent_and_a_reset_lane_is_fresh():
    model = lg_model()
    a, b = tokens(1, 50, seed=4), tokens(1, 50, seed=5)
    with torch.no_grad():
        both, state = feed(model, torch.cat([a, b]), 8)
        alone, _ = feed(model, b, 8)
        torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
        y = tokens(2, 20, seed=6)
        reset = model(y, state=state, reset=torch.tensor([True, False])).logits
        torch.testing.assert_close(reset[:1], model(y[:1]).logits, atol=1e-5, rtol=0)


def test_state_round_trips_through_safetensors():
    model = lg_model()
    with torch.no_grad():
        state = model(tokens(2, 30)).state
        back = State.from_state_dict(st_load(st_save(state.state_dict())))
        assert back.parts() == ["local_global"]
        y = tokens(2, 20, seed=9)
        torch.testing.assert_close(model(y, state=back).logits, model(y, state=state).logits, atol=0, rtol=0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="window"):
        LocalGlobalConfig(window=0)
    with pytest.raises(ValueError, match="n_global"):
        LocalGlobalConfig(n_global=-1)


@pytest.mark.e2e
def test_trains_evaluates_and_generates_through_the_cli(tmp_path, capsys):
    from longmem.cli import main
    from longmem.config import PRESETS
    text = tmp_path / "text.txt"
    text.write_text("a window and a few global positions reach far enough for this text. " * 60)
    run = tmp_path / "run"
    args = ["--config", str(PRESETS / "tiny.yaml"), "--data.path", str(text), "--memory.kind", "local_global",
            "--memory.local_global.window", "8", "--memory.local_global.n_global", "2", "--train.progress", "false",
            "--train.threads", "1", "--data.cache", "false"]
    assert main(["train", "--out", str(run), *args, "--train.max_steps", "2"]) == 0
    assert main(["eval", str(run), "--json"]) == 0
    assert main(["generate", str(run), "--prompt", "a window and", "--max-new-tokens", "8", "--seed", "1"]) == 0
    capsys.readouterr()
