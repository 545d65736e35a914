"""The classic baselines at tiny sizes: LSTM LM, seq2seq Transformer, MemN2N."""
from __future__ import annotations

import pytest
import torch

from longmem.classic.config import LSTMConfig, MemN2NConfig, Seq2SeqConfig
from longmem.config import ModelConfig, RunConfig
from longmem.data.tasks.babi import babi_batch, babi_texts, encode_babi, generate_babi
from longmem.classic.pairs import Pair, pairs_batch
from longmem.data.tokenizer import ByteTokenizer, WordTokenizer
from longmem.classic.qa import evaluate_babi, evaluate_pairs
from longmem.generation.generate import generate_ids
from longmem.classic.decoding import answer_story, decode_seq2seq
from longmem.models import build_model
from longmem.classic.lstm import LSTMLM
from longmem.classic.memn2n import MemN2N, position_encoding
from longmem.models.memory import State
from longmem.classic.seq2seq import Seq2Seq
from longmem.training.optim import lr_at, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: faster on one thread


def lstm(**kw) -> LSTMLM:
    return build_model(LSTMConfig(vocab_size=23, d_model=12, n_layers=2, **kw)).eval()


# -- LSTM -----------------------------------------------------------------------------------------------
def test_lstm_shapes_and_tied_output():
    model = lstm()
    x = torch.randint(0, 23, (3, 10))
    out = model(x, targets=x)
    assert out.logits.shape == (3, 10, 23)
    assert out.state.lstm.h.shape == (3, 2, 12) and out.state.lstm.c.shape == (3, 2, 12)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model.head.weight is model.embed.weight


def test_lstm_state_carried_across_segments_equals_one_pass():
    model = lstm()
    x = torch.randint(0, 23, (2, 29))
    full = model(x).logits
    state, pieces = None, []
    for start, size in ((0, 1), (1, 7), (8, 13), (21, 8)):
        out = model(x[:, start:start + size], state=state)
        state, pieces = out.state, pieces + [out.logits]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)
    # without the state the second piece is different: the test above can fail
    assert (model(x[:, 8:21]).logits - full[:, 8:21]).abs().max() > 1e-3


def test_lstm_reset_clears_only_that_lane_and_state_round_trips():
    model = lstm()
    x = torch.randint(0, 23, (2, 12))
    state = model(x[:, :6]).state
    out = model(x[:, 6:], state=state, reset=torch.tensor([True, False]))
    torch.testing.assert_close(out.logits[0], model(x[:1, 6:]).logits[0], atol=1e-6, rtol=0)   # fresh lane
    torch.testing.assert_close(out.logits[1], model(x[1:, :]).logits[0, 6:], atol=1e-5, rtol=0)  # carried lane
    back = State.from_state_dict(state.state_dict())
    torch.testing.assert_close(model(x[:, 6:], state=back).logits, model(x[:, 6:], state=state).logits)
    assert not state.detach().lstm.h.requires_grad


def test_lstm_generation_carries_state_token_by_token():
    model = lstm(segment_len=4)
    prompt = [1, 5, 7, 2, 9, 3]
    ids = list(generate_ids(model, prompt, max_new_tokens=5, temperature=0))
    seq = list(prompt)
    for _ in range(5):                                         # greedy on the full history, no window
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ids == seq[len(prompt):]


# -- seq2seq --------------------------------------------------------------------------------------------
def s2s(n_layers: int = 2) -> Seq2Seq:
    return build_model(Seq2SeqConfig(vocab_size=256, d_model=32, n_heads=2, n_layers=n_layers)).eval()


def test_seq2seq_shapes_causal_decoder_and_padding_invariance():
    model = s2s()
    batch = pairs_batch([Pair("abcdef", "xyz"), Pair("gh", "q")], ByteTokenizer())
    out = model(**batch)
    assert out.logits.shape == (2, 4, 256) and torch.isfinite(out.loss)
    # the decoder is causal: changing the last target input leaves earlier logits alone
    changed = dict(batch, target_in=batch["target_in"].clone())
    changed["target_in"][0, -1] = 77
    logits2 = model(**changed).logits
    torch.testing.assert_close(logits2[0, :-1], out.logits[0, :-1])
    assert (logits2[0, -1] - out.logits[0, -1]).abs().max() > 1e-4
    # padding of the source is hidden: row 1 alone (no padding) gives the same logits
    alone = pairs_batch([Pair("gh", "q")], ByteTokenizer())
    torch.testing.assert_close(model(**alone).logits[0], out.logits[1, :2], atol=1e-5, rtol=0)
    # the source matters (cross-attention is wired)
    other = pairs_batch([Pair("zzzzzz", "xyz")], ByteTokenizer())
    assert (model(**other).logits[0] - out.logits[0]).abs().max() > 1e-4


def test_cross_attention_reads_the_matching_key_however_far_and_never_a_masked_one():
    from longmem.classic.seq2seq import CrossAttention
    D, S = 32, 24
    attn = CrossAttention(d_model=D, n_heads=1, dropout=0.0).eval()
    with torch.no_grad():                                       # q = 16 x sqrt(D), k = v = x, out = identity
        attn.q.weight.copy_(16 * torch.eye(D) * D ** 0.5)
        attn.kv.weight.copy_(torch.cat([torch.eye(D), torch.eye(D)]))
        attn.out.weight.copy_(torch.eye(D))
    keys = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0][:S]   # orthonormal
    memory = keys[None]                                         # (1, S, D): the answer sits at position 0
    valid = torch.ones(1, 1, 1, S, dtype=torch.bool)
    y = attn(keys[None, :1], memory=memory, mask=valid)[0, 0]   # query = key 0, the farthest from the end
    torch.testing.assert_close(y, keys[0], atol=1e-3, rtol=0)
    masked = valid.clone()
    masked[..., 0] = False                                      # the same query with key 0 masked out
    y = attn(keys[None, :1], memory=memory, mask=masked)[0, 0]
    assert (y - keys[0]).norm() > 0.5 and y @ keys[0] < 1e-3


def test_seq2seq_overfits_a_tiny_copy_set():
    torch.manual_seed(0)
    model = s2s(n_layers=1).train()
    tok = ByteTokenizer()
    pairs = [Pair(s, s) for s in ("abcde", "hello", "qwzx", "mnopq", "lstm", "ctrl")]
    batch = pairs_batch(pairs, tok)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-2)
    for step in range(120):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=1e-2, min_lr=1e-3, warmup=10, total=120)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert decode_seq2seq(model, tok, [p.source for p in pairs], max_new_tokens=10) == [p.target for p in pairs]
    res = evaluate_pairs(model, tok, pairs)
    assert res["exact_match"] == 1.0 and res["bleu"] == pytest.approx(1.0) and res["rouge_l"] == 1.0
    sampled = decode_seq2seq(model, tok, ["hello"], max_new_tokens=10, temperature=1.0, seed=3)
    assert sampled == decode_seq2seq(model, tok, ["hello"], max_new_tokens=10, temperature=1.0, seed=3)


# -- MemN2N ---------------------------------------------------------------------------------------------
def test_position_encoding_matches_the_paper_and_the_code_formulas():
    J, d = 4, 3
    paper = position_encoding(torch.tensor([J]), J, d, "paper")[0]   # (J, D)
    code = position_encoding(torch.tensor([J]), J, d, "code")[0]
    for j in range(1, J + 1):
        for k in range(1, d + 1):
            assert paper[j - 1, k - 1].item() == pytest.approx((1 - j / J) - (k / d) * (1 - 2 * j / J))
            assert code[j - 1, k - 1].item() == pytest.approx(1 + 4 * (k - (d + 1) / 2) * (j - (J + 1) / 2) / (d * J))
    assert code.mean().item() == pytest.approx(1.0, abs=1e-6) and paper.mean().item() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="code, paper"):
        MemN2NConfig(pe_formula="papr")


@pytest.mark.parametrize("formula", ["code", "paper"])
def test_memn2n_bags_equal_explicit_position_encoding_and_tying(formula):
    model = MemN2N(MemN2NConfig(vocab_size=30, d_model=8, hops=2, pe_formula=formula))
    words = torch.tensor([[3, 4, 5, 0, 0], [7, 1, 0, 0, 0]])
    tables = model.embed.weight.view(30, 3, 8)                     # C^0, C^1, C^2
    pe = position_encoding((words != 0).sum(-1), 5, 8, formula) * (words != 0)[..., None]
    expected = torch.stack([(tables[:, k][words] * pe).sum(-2) for k in range(3)], dim=1)
    torch.testing.assert_close(model.encode(words), expected, atol=1e-6, rtol=0)
    # word order matters through position encoding
    assert (model.encode(torch.tensor([[4, 3, 5]])) - model.encode(torch.tensor([[3, 4, 5]]))).abs().max() > 1e-4


def babi_data(n: int, *, task: int = 1, seed: int = 0):
    ex = generate_babi(task=task, n=n, seed=seed)
    tok = WordTokenizer.fit(babi_texts(ex))
    return ex, tok, encode_babi(ex, tok)


def test_memn2n_shapes_and_attention_sums_to_one_per_hop():
    _, tok, data = babi_data(16)
    model = MemN2N(MemN2NConfig(vocab_size=tok.vocab_size, d_model=16, hops=3, memory_size=20))
    import random
    batch = babi_batch(data, list(range(16)), memory_size=20, noise=0.2, rng=random.Random(0))
    out = model(**batch)
    B, M = batch["story"].shape[:2]
    assert out.logits.shape == (16, tok.vocab_size) and out.attention.shape == (16, 3, M)
    # the weights over the memory_size slots, the empty ones (up to 20) included, sum to 1 per hop
    torch.testing.assert_close(out.attention.sum(-1) + out.empty, torch.ones(16, 3))
    assert out.empty.min() > 0 and out.empty.max() < 1
    # one empty slot at score 0 weighs as one more sentence that reads zero
    story, n, q = batch["story"][:1], batch["n_memories"][:1], batch["question"][:1]
    scores = torch.bmm(model.encode(story)[:, :, 0] + model.temporal(n - 1 - torch.arange(story.shape[1]).clamp(
        max=int(n - 1)))[None, :, :16], model.encode(q)[:, 0, :, None])[0, :int(n), 0]
    expected_empty = (20 - n.item()) / ((20 - n.item()) + scores.exp().sum())
    assert model(story[:, :int(n)], n, q).empty[0, 0].item() == pytest.approx(expected_empty.item(), rel=1e-4)
    closed = MemN2N(MemN2NConfig(**{**vars(model.config), "attend_empty": False}))
    closed.load_state_dict(model.state_dict())
    out_closed = closed(**batch)
    torch.testing.assert_close(out_closed.attention.sum(-1), torch.ones(16, 3))
    assert out_closed.empty.abs().max() == 0
    empty = torch.arange(M)[None, :] >= batch["n_memories"][:, None]
    assert empty.any() and out.attention.masked_select(empty[:, None, :].expand(-1, 3, -1)).abs().max() == 0
    assert model(**batch, linear=True).attention.sum(-1).sub(1).abs().max() > 1e-3   # linear start: no softmax
    with pytest.raises(ValueError, match="memory_size"):
        model(torch.zeros(16, 21, 3, dtype=torch.long), batch["n_memories"], batch["question"])


def test_memn2n_trains_to_95_percent_on_generated_task_1():
    ex, tok, data = babi_data(1000)
    test_ex = generate_babi(task=1, n=300, seed=99)
    torch.manual_seed(0)
    model = MemN2N(MemN2NConfig(vocab_size=tok.vocab_size, d_model=20, hops=3, memory_size=20))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    import random
    rng = random.Random(0)
    for step in range(350):
        idx = rng.sample(range(len(data)), 32)
        loss = model(**babi_batch(data, idx, memory_size=20, noise=0.1, rng=rng)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = evaluate_babi(model, encode_babi(test_ex, tok))
    assert res["accuracy"] >= 0.95, res
    assert res["per_task"]["1"]["n"] == 300 and res["mean_error"] == pytest.approx(100 * (1 - res["accuracy"]))
    answer, attention = answer_story(model, tok, "Mary went to the kitchen. John moved to the garden. "
                                                 "Mary travelled to the office. Where is John?")
    assert answer == "garden"
    assert attention.shape == (3, 3) and int(attention[0].argmax()) == 1      # first hop reads John's move


def test_build_model_and_config_validation():
    assert isinstance(build_model(LSTMConfig()), LSTMLM)
    with pytest.raises(ValueError, match="model.arch"):
        RunConfig().override({"model.arch": "gru"})
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig(arch="lstm")                        # the baselines have config classes of their own
    # the Transformer's settings left in a section switched to a baseline are dropped; a baseline's own
    # setting on the Transformer names the arch it belongs to
    lstm_cfg = RunConfig().override({"model.arch": "lstm", "model.d_model": "24"}).model
    assert isinstance(lstm_cfg, LSTMConfig) and lstm_cfg.d_model == 24 and not hasattr(lstm_cfg, "n_heads")
    with pytest.raises(ValueError, match="model.hops is a setting of model.arch memn2n"):
        RunConfig().override({"model.hops": "2"})
    with pytest.raises(ValueError, match="memory.kind must be 'none'"):
        RunConfig().override({"model.arch": "lstm", "memory.kind": "xl", "memory.mem_len": "8"})
    with pytest.raises(ValueError, match="model.hops"):
        MemN2NConfig(hops=0)
    with pytest.raises(ValueError, match="task.babi_tasks"):
        RunConfig().override({"task.babi_tasks": "1,21"})
    with pytest.raises(ValueError, match="task.time_noise"):
        RunConfig().override({"task.time_noise": "1.5"})
    # the task section round-trips through config.yaml
    cfg = RunConfig().override({"model.arch": "memn2n", "task.babi_tasks": "1,2", "task.linear_start_steps": "5"})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
