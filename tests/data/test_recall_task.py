"""The associative-recall generator: layout, targets, distances, seeding."""
from __future__ import annotations

import pytest
import torch

from longmem.data.tasks.recall import IGNORE_INDEX, RecallTask, recall_accuracy


def test_layout_targets_and_distances():
    task = RecallTask(n_keys=10, n_values=7, n_filler=5)
    b = task.sample(batch_size=3, n_pairs=4, filler=9, generator=torch.Generator().manual_seed(0))
    assert b.tokens.shape == b.targets.shape == b.distance.shape == (3, 4 * 4 + 9)
    for row in range(3):
        tok, tgt, dist = b.tokens[row].tolist(), b.targets[row].tolist(), b.distance[row].tolist()
        stated = dict(zip(tok[0:8:2], tok[1:8:2]))
        assert len(stated) == 4 and all(k < 10 for k in stated) and all(10 <= v < 17 for v in stated.values())
        assert all(17 <= t < 22 for t in tok[8:17])                   # filler is its own range
        answers = [(t, tgt[t]) for t in range(len(tok)) if tgt[t] != IGNORE_INDEX]
        assert len(answers) == 4
        for t, value in answers:
            key = tok[t]
            assert tok[t + 1] == value == stated[key]                 # the next token is the stated value
            assert tok[t - dist[t]] == key and t - dist[t] < 8         # distance points at the statement
    again = task.sample(batch_size=3, n_pairs=4, filler=9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, b.tokens)
    with pytest.raises(ValueError, match="n_pairs"):
        task.sample(batch_size=1, n_pairs=11, filler=0, generator=torch.Generator())


def test_recall_accuracy_counts_only_answers():
    task = RecallTask(n_keys=4, n_values=4, n_filler=2)
    b = task.sample(batch_size=2, n_pairs=3, filler=4, generator=torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):                                    # predicts the true next token
        def forward(self, tokens):
            nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
            return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, task.vocab_size).float()})

    res = recall_accuracy(Oracle(), b, bins=[0, 8])
    assert res["accuracy"] == 1.0 and res["answers"] == 6
    assert sum(x["answers"] for x in res["bins"]) == 6
    wrong = recall_accuracy(lambda t: type("O", (), {"logits": torch.zeros(*t.shape, task.vocab_size)})(), b)
    assert wrong["accuracy"] < 1.0


def test_distinct_values():
    task = RecallTask(n_keys=6, n_values=5, n_filler=2, distinct_values=True)
    b = task.sample(batch_size=4, n_pairs=5, filler=0, generator=torch.Generator().manual_seed(2))
    for row in b.tokens.tolist():
        assert sorted(row[1:10:2]) == list(range(6, 11))              # each value exactly once
    with pytest.raises(ValueError, match="distinct"):
        task.sample(batch_size=1, n_pairs=6, filler=0, generator=torch.Generator())


def test_queries_drawn_with_replacement():
    task = RecallTask(n_keys=8, n_values=8, n_filler=3)
    b = task.sample(batch_size=2, n_pairs=3, filler=5, n_queries=10, generator=torch.Generator().manual_seed(3))
    assert b.tokens.shape == (2, 2 * 3 + 5 + 2 * 10)
    for row in range(2):
        tok, tgt, dist = b.tokens[row].tolist(), b.targets[row].tolist(), b.distance[row].tolist()
        stated = dict(zip(tok[0:6:2], tok[1:6:2]))
        answers = [t for t in range(len(tok)) if tgt[t] != IGNORE_INDEX]
        assert len(answers) == 10 and answers[0] == 11
        for t in answers:                                              # every query asks a stated pair
            assert tgt[t] == tok[t + 1] == stated[tok[t]] and tok[t - dist[t]] == tok[t]
    with pytest.raises(ValueError, match="n_queries"):
        task.sample(batch_size=1, n_pairs=3, filler=0, n_queries=0, generator=torch.Generator())
