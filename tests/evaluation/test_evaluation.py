"""Perplexity over ordered lanes equals per-document full passes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longmem.data.stream import encode_documents
from longmem.data.tokenizer import ByteTokenizer
from longmem.evaluation.perplexity import evaluate_ppl, predicted_chars

pytestmark = pytest.mark.invariant


def make_docs(lengths: list[int], *, vocab: int = 37, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).astype(np.int64) for n in lengths]


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_lanes_with_memory_equal_one_pass_per_document(make_model, batch_size):
    docs = make_docs([30, 17, 9, 41, 2])
    model = make_model(kind="xl", mem_len=64, segment_len=8).train()
    reference = make_model(kind="none", mem_len=0, segment_len=64)
    reference.load_state_dict(model.state_dict())
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            x = torch.from_numpy(d[:-1])[None]
            y = torch.from_numpy(d[1:])
            total += F.cross_entropy(reference(x).logits[0], y, reduction="sum").item()
            count += len(d) - 1
    res = evaluate_ppl(model, docs, batch_size=batch_size, n_chars=2 * count)
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(total / count, abs=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert res["bits_per_token"] == pytest.approx(res["loss"] / math.log(2))
    assert res["bpc"] == pytest.approx(res["bits_per_token"] / 2)
    assert res["mem_len"] == 64
    assert model.training                                            # mode restored


def test_memory_helps_on_a_repeating_document(make_model):
    # the second half of the document repeats the first: only a memory can look it up
    half = make_docs([24], seed=3)[0]
    docs = [np.concatenate([half, half])]
    model = make_model(kind="xl", mem_len=24, segment_len=24)
    res_mem = evaluate_ppl(model, docs, batch_size=1)
    model.set_mem_len(0)
    res_none = evaluate_ppl(model, docs, batch_size=1)
    assert res_mem["mem_len"] == 24 and res_none["mem_len"] == 0
    assert res_mem["loss"] != pytest.approx(res_none["loss"], abs=1e-3)


def test_max_segments_and_empty_input(make_model):
    model = make_model(kind="xl", mem_len=8, segment_len=4)
    docs = make_docs([33, 21])
    res = evaluate_ppl(model, docs, batch_size=2, max_segments=3)
    assert res["tokens"] == 2 * 3 * 4
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_ppl(model, [], batch_size=2)


def test_bpc_of_ascii_bytes_equals_bits_per_token(make_model):
    """Under the byte tokenizer an ASCII character is one token, so bits per character
    (over the characters that are predicted) must equal bits per token. Here the
    documents are short, so counting every document's first, never-predicted
    character as well would be visible."""
    texts = ["short doc", "another one", "x" * 5, "a slightly longer document of text"]
    n_chars = sum(len(t) for t in texts)
    assert predicted_chars(texts) == n_chars - len(texts)
    model = make_model(vocab_size=256, kind="xl", mem_len=16, segment_len=8)
    res = evaluate_ppl(model, encode_documents(texts, ByteTokenizer()), batch_size=2,
                       n_chars=predicted_chars(texts))
    assert res["tokens"] == n_chars - len(texts)
    assert res["bpc"] == pytest.approx(res["bits_per_token"], rel=1e-9)


@pytest.mark.parametrize("kind,n_sinks", [("xl", 0), ("xl", 2), ("knn", 0), ("tokens", 0)])
def test_evaluation_with_the_cache_equals_the_hidden_state_path(make_model, kind, n_sinks):
    # evaluation reads XL memory as the key/value cache of the same positions (model.for_decoding()): per
    # segment the same losses as re-projecting the hidden states, also across resets and past mem_len
    from longmem.data.stream import eval_batches
    from longmem.evaluation.perplexity import evaluation_view
    docs = make_docs([70, 23, 9, 55], seed=1)
    model = make_model(kind=kind, mem_len=12, segment_len=8)
    model.config.memory.n_sinks = model.xl.n_sinks = n_sinks
    view = evaluation_view(model)
    assert view.xl is None and view.kv is not None                   # the cache, not hidden states
    hidden = cached = None
    with torch.no_grad():
        for batch in eval_batches(docs, batch_size=2, seg_len=8):
            a = model(batch.inputs, state=hidden, reset=batch.reset)
            b = view(batch.inputs, state=cached, reset=batch.reset)
            hidden, cached = a.state, b.state
            torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    assert evaluate_ppl(model, docs, batch_size=2)["loss"] == pytest.approx(
        _hidden_state_loss(model, docs, batch_size=2), abs=1e-5)


def _hidden_state_loss(model, docs, *, batch_size: int) -> float:
    from longmem.data.stream import eval_batches
    from longmem.models import IGNORE_INDEX
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for batch in eval_batches(docs, batch_size=batch_size, seg_len=model.config.segment_len):
            out = model(batch.inputs, state=state, reset=batch.reset)
            state = out.state
            total += F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            count += int((batch.targets != IGNORE_INDEX).sum())
    return total / count
