"""The Neural Turing Machine (and what it shares with the DNC): addressing on hand examples, the bit-vector
input/output and tasks, the state carried per lane, and one tiny run through the CLI with exact resume."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from longmem.classic.bits import BitEmbedding, bit_errors, bit_loss, bit_tables
from longmem.classic.config import DNCConfig, LSTMConfig, NTMConfig
from longmem.classic.ntm import NTM, content_weights, ntm_address, sharpen, shift, write
from longmem.classic.states import NTM_MEMORY_INIT, NTMState
from longmem.data.tasks.algorithmic import (ITEM_LEN, copy_example, pad_examples, recall_example,
                                            repeat_copy_example, sequence_maker)
from longmem.data.tokenizer import BitsTokenizer, load_tokenizer, save_tokenizer
from longmem.models import IGNORE_INDEX, build_model
from longmem.models.memory import State

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: faster on one thread


def tiny(arch: str, **kw):
    sizes = {"vocab_size": 23, "d_model": 12, "n_layers": 2, **kw}
    if arch == "lstm":
        return build_model(LSTMConfig(**sizes)).eval()
    cls = NTMConfig if arch == "ntm" else DNCConfig
    model = build_model(cls(memory_slots=6, memory_width=5, read_heads=2, **sizes)).eval()
    with torch.no_grad():                       # spread weights: sharp addressing, so a mixed-up lane shows
        for p in model.parameters():
            p.mul_(3.0)
    return model


# -- addressing (Graves et al. 2014 §3.3) ------------------------------------------------------------------
def test_shift_is_a_circular_convolution_on_a_hand_example():
    w = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]])          # (1, 2, 5)
    forward = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])                           # all on +1
    assert torch.equal(shift(w, forward), torch.tensor([[[0.0, 0, 1, 0, 0], [1.0, 0, 0, 0, 0]]]))   # wraps round
    back = torch.tensor([[[1.0, 0.0, 0.0], [0.25, 0.5, 0.25]]])
    assert torch.allclose(shift(w, back), torch.tensor([[[1.0, 0, 0, 0, 0], [0.25, 0, 0, 0.25, 0.5]]]))


def test_sharpening_on_a_hand_example():
    w = torch.tensor([[[0.2, 0.3, 0.5]]])
    assert torch.allclose(sharpen(w, torch.tensor([[2.0]])), torch.tensor([[[0.04, 0.09, 0.25]]]) / 0.38, atol=1e-6)
    assert torch.allclose(sharpen(w, torch.tensor([[1.0]])), w, atol=1e-6)


def test_content_addressing_finds_the_matching_slot_and_write_erases_then_adds():
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])                       # (1, 3, 2)
    w = content_weights(memory, torch.tensor([[[0.0, 2.0]]]), torch.tensor([[50.0]]))
    assert w.argmax().item() == 1 and w[0, 0, 1] > 0.999
    new = write(memory, torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 3.0]]))
    assert torch.allclose(new, torch.tensor([[[1.0, 0.0], [3.0, 4.0], [1.0, 1.5]]]))


def test_ntm_weightings_are_distributions():
    g = torch.Generator().manual_seed(0)
    B, H, S, W = 4, 3, 7, 5
    w = ntm_address(torch.randn(B, S, W, generator=g), torch.softmax(torch.randn(B, H, S, generator=g), -1),
                    key=torch.randn(B, H, W, generator=g), strength=torch.rand(B, H, generator=g) * 10,
                    gate=torch.rand(B, H, generator=g), shifts=torch.softmax(torch.randn(B, H, 3, generator=g), -1),
                    gamma=1 + torch.rand(B, H, generator=g) * 5)
    assert w.shape == (B, H, S) and (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(B, H), atol=1e-5)
    model = tiny("ntm")
    out = model(torch.randint(0, 23, (3, 9)))
    weights = out.state.ntm.weights
    assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones(3, 3), atol=1e-5)


# -- the model and its state ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["ntm", "dnc"])
def test_shapes_tokens_and_bits(arch):
    model = tiny(arch)
    x = torch.randint(0, 23, (3, 7))
    out = model(x, targets=x)
    assert out.logits.shape == (3, 7, 23) and out.loss.ndim == 0
    part = out.state.part(arch)
    assert part.h.shape == (3, 2, 12) and part.memory.shape == (3, 6, 5) and part.reads.shape == (3, 2, 5)
    bits = tiny(arch, bits=4)
    assert isinstance(bits.embed, BitEmbedding)
    out = bits(torch.randint(0, BitsTokenizer(4).vocab_size, (3, 7)), targets=torch.randint(0, 16, (3, 7)))
    assert out.logits.shape == (3, 7, 5) and out.loss.ndim == 0                     # 4 bits and the end bit


@pytest.mark.invariant
@pytest.mark.parametrize("arch", ["ntm", "dnc", "lstm"])
def test_pieces_with_the_state_equal_one_pass_and_a_reset_clears_only_its_lane(arch):
    model = tiny(arch)
    x = torch.randint(0, 23, (2, 10))
    full = model(x)
    first = model(x[:, :4])
    second = model(x[:, 4:], state=first.state)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), full.logits, atol=1e-5)
    reset = model(x[:, 4:], state=first.state, reset=torch.tensor([True, False]))
    fresh = model(x[:1, 4:])
    assert torch.allclose(reset.logits[0], fresh.logits[0], atol=1e-5)            # lane 0 starts afresh
    assert torch.equal(reset.logits[1], second.logits[1])                          # lane 1 untouched
    assert not torch.allclose(reset.logits[0], second.logits[0], atol=1e-3)


@pytest.mark.parametrize("arch", ["ntm", "dnc"])
def test_the_state_round_trips_through_its_tensors_and_resets_to_the_initial_memory(arch):
    model = tiny(arch)
    state = model(torch.randint(0, 23, (3, 5))).state
    back = State.from_state_dict(state.state_dict())
    assert back.parts() == [arch]
    for k, v in state.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    cleared = state.reset(torch.tensor([False, True, False])).part(arch)
    initial = model.init_state(1).part(arch)
    for name, v in vars(cleared).items():
        assert torch.equal(v[1], getattr(initial, name)[0]), name
        assert torch.equal(v[0], getattr(state.part(arch), name)[0]), name
    if arch == "ntm":
        assert isinstance(initial, NTMState) and (initial.memory == NTM_MEMORY_INIT).all()
        assert torch.equal(initial.weights[0, :, 0], torch.ones(3))                 # every head starts on slot 0


# -- bits in, bits out ------------------------------------------------------------------------------------------
def test_bit_tables_bit_loss_and_bit_errors():
    tok = BitsTokenizer(3)
    inp, out = bit_tables(3)
    assert inp.shape == (8 + 5, 3 + 4) and out.shape == (8 + 5, 3 + 1)
    assert inp[0b110].tolist() == [1, 1, 0, 0, 0, 0, 0]                               # most significant first
    assert inp[tok.ids[tok.BLANK]].sum() == 0                                          # a blank reads zeros
    assert inp[tok.ids[tok.DELIM]].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert out[tok.ids[tok.END]].tolist() == [0, 0, 0, 1]
    embed = BitEmbedding(3, 4)
    targets = torch.tensor([[IGNORE_INDEX, 0b101, 0b011]])
    bits, mask = embed.target_bits(targets)
    assert mask.tolist() == [[False, True, True]]
    logits = torch.tensor([[[9.0, 9, 9, 9], [5, -5, 5, -5], [5, 5, 5, -5]]])            # 0b101 right, 0b111 for 0b011
    assert bit_errors(logits, bits, mask).tolist() == [1.0]
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[0, 1:], bits[0, 1:], reduction="sum")
    assert torch.allclose(bit_loss(logits, bits, mask, reduction="sum"), ref)
    assert torch.allclose(bit_loss(logits, bits, mask), ref / 2)


def test_bits_tokenizer_round_trips(tmp_path):
    tok = BitsTokenizer(4)
    ids = tok.encode("0110 1011 | _ _")
    assert ids == [6, 11, tok.ids["|"], tok.ids["_"], tok.ids["_"]] and tok.decode(ids) == "0110 1011 | _ _"
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(back, BitsTokenizer) and back.width == 4
    with pytest.raises(ValueError, match="neither a vector of 4 bits"):
        tok.encode("011")


# -- the tasks (§4) -------------------------------------------------------------------------------------------------
def test_copy_repeat_copy_and_recall_examples():
    tok, rng = BitsTokenizer(4), random.Random(0)
    ex = copy_example(tok, length=3, rng=rng)
    assert len(ex) == 7 and ex.inputs[3] == tok.ids["|"] and (ex.inputs[4:] == tok.ids["_"]).all()
    assert (ex.targets[:4] == IGNORE_INDEX).all() and ex.targets[4:].tolist() == ex.inputs[:3].tolist()
    ex = repeat_copy_example(tok, length=2, repeats=3, rng=rng)
    seq = ex.inputs[:2].tolist()
    assert ex.targets[ex.targets != IGNORE_INDEX].tolist() == seq * 3 + [tok.ids["."]]
    ex = recall_example(tok, items=4, rng=rng)
    q = ex.info["query"]
    items = [ex.inputs[1 + i * (ITEM_LEN + 1):(i + 1) * (ITEM_LEN + 1)].tolist() for i in range(4)]
    assert ex.targets[ex.targets != IGNORE_INDEX].tolist() == items[q + 1]
    make = sequence_maker("copy", tok, split="train", seed=0, min_len=1, max_len=20)
    assert np.array_equal(make(5).inputs, make(5).inputs)                            # seeded by index
    val = sequence_maker("copy", tok, split="val", seed=0, min_len=1, max_len=20)
    assert not np.array_equal(make(5).inputs, val(5).inputs)
    inputs, targets = pad_examples([make(0), make(1)], pad=tok.ids["_"])
    assert inputs.shape == targets.shape == (2, max(len(make(0)), len(make(1))))


# -- end to end ------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_ntm_trains_on_copy_resumes_exactly_and_reports_bit_errors(tmp_path, capsys, monkeypatch):
    from longmem.cli import main
    from longmem.runs import load_run
    args = ["--model.arch", "ntm", "--model.d_model", "16", "--model.n_layers", "1", "--model.memory_slots", "8",
            "--model.memory_width", "6", "--task.name", "copy", "--task.bits", "4", "--task.max_len", "4",
            "--task.n_test", "8", "--data.batch_size", "8", "--train.max_steps", "12", "--train.lr", "0.01",
            "--train.warmup_steps", "0", "--train.checkpoint_every", "4", "--train.keep_last", "3",
            "--train.log_every", "1", "--train.progress", "false"]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 0

    def losses():
        return {e["step"]: e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in e}
    ref = losses()
    assert sorted(ref) == list(range(1, 13)) and ref[12] < ref[1]
    run = load_run(out)
    assert isinstance(run.model, NTM) and run.config.model.bits == 4 and run.tokenizer.kind == "bits"
    shutil.rmtree(out / "checkpoints" / "step-00000012")
    assert main(["train", "--resume", str(out)]) == 0
    got = losses()
    assert sorted(got) == list(range(1, 13)) and all(abs(ref[s] - got[s]) <= 1e-6 for s in ref), (ref, got)
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "copy", "--lengths", "4,8", "--n", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "copy" and [r["length"] for r in res["results"]] == [4, 8]
    assert all(r["n"] == 5 and 0 <= r["bit_error_rate"] <= 1 for r in res["results"])
    assert main(["eval", str(out), "--task", "babi"]) == 2                  # a bit-vector run: a clear error
    assert "a bit-vector run is scored with: copy" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "0110 |"]) == 2            # bits out, not text
    assert "trained on bit vectors" in capsys.readouterr().err
    import longmem.serving.server as server

    def never(*args, **kwargs):
        raise AssertionError("a bit-vector run reached the server")
    monkeypatch.setattr(server, "serve", never)
    for command in ("chat", "serve"):                                       # refused before any loop or socket
        assert main([command, str(out)]) == 2
        assert "trained on bit vectors" in capsys.readouterr().err
