"""Scoring of probe examples (passkey, recall, bAbI, haystack) by a language model.

An example is read segment by segment with the model's memory carried across
segments, as in training and generation, so a model only answers a question
about the far past if its memory carried the fact. Segments are aligned to the
end of the example: the question and answer sit in the last, full segment, so
even the memory-less model sees a whole window before the answer. An answer is
correct when every one of its tokens is the arg-max prediction (teacher-forced,
which equals greedy decoding of the answer).

A model without memory (a Transformer with ``memory.kind`` none) cannot use
earlier segments, so only the segments holding answers are computed for it.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from longmem.data.tasks.probes import Probe
from longmem.evaluation.perplexity import evaluation_view


def _stateless(model) -> bool:
    c = model.config
    return c.arch == "transformer" and c.memory.kind == "none"


def _bounds(n: int, seg: int) -> list[tuple[int, int]]:
    """Segments of ``n`` positions, the last one ending at ``n``; the first may be short."""
    first = n % seg or seg
    return [(0, first)] + [(a, a + seg) for a in range(first, n, seg)]


def _segments(probes: list[Probe], idx: list[int], model) -> list[tuple[int, int]]:
    """The segments the model reads for the batch ``idx``: all of them, or for a model without memory
    only those holding a position that predicts an answer token."""
    bounds = _bounds(len(probes[idx[0]]) - 1, model.config.segment_len)
    if _stateless(model):
        asked = np.any([probes[i].answer[1:] > 0 for i in idx], axis=0)
        bounds = [(a, b) for a, b in bounds if asked[a:b].any()]
    return bounds


def n_segments(probes: list[Probe], model, *, batch_size: int) -> int:
    """Model calls :func:`score_probes` makes (for a progress bar)."""
    return sum(len(_segments(probes, idx, model)) for idx in _batches(probes, batch_size))


def _batches(probes: list[Probe], batch_size: int) -> list[list[int]]:
    """Indices of probes grouped by length (one batch never mixes lengths), in order."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(probes):
        by_len[len(p)].append(i)
    return [idx[a:a + batch_size] for _, idx in sorted(by_len.items()) for a in range(0, len(idx), batch_size)]


@torch.no_grad()
def score_probes(model, probes: list[Probe], *, batch_size: int = 8, progress_bar=None) -> list[list[dict]]:
    """For every probe, for every answer k (in order): ``correct`` (all tokens arg-max), ``loss``
    (summed cross-entropy, nats) and ``tokens``. Each probe starts from a fresh memory."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    run = evaluation_view(model)                       # XL memory as a key/value cache: the same numbers, faster
    out: list[list[dict]] = [[] for _ in probes]
    for idx in _batches(probes, batch_size):
        n = len(probes[idx[0]])
        if n < 2:
            raise ValueError("a probe needs at least 2 tokens")
        tokens = torch.from_numpy(np.stack([probes[i].tokens for i in idx])).to(device)      # (B, N)
        answer = torch.from_numpy(np.stack([probes[i].answer for i in idx]).astype(np.int64))  # (B, N)
        target_ans = answer[:, 1:]                        # position p predicts token p + 1
        n_answers = [int(probes[i].answer.max(initial=0)) for i in idx]
        correct = [[True] * k for k in n_answers]
        loss = [[0.0] * k for k in n_answers]
        count = [[0] * k for k in n_answers]
        state = None
        for a, b in _segments(probes, idx, model):
            rows, cols = torch.nonzero(target_ans[:, a:b], as_tuple=True)
            res = run(tokens[:, a:b], state=state)
            state = res.state
            if progress_bar is not None:
                progress_bar.update(1)
            if len(rows) == 0:
                continue
            logits = res.logits[rows, cols].float()                                    # (M, V)
            gold = tokens[rows, cols + a + 1]
            ce = F.cross_entropy(logits, gold, reduction="none").tolist()
            hit = (logits.argmax(-1) == gold).tolist()
            ks = target_ans[rows, cols + a].tolist()
            for r, k, c, h in zip(rows.tolist(), ks, ce, hit):
                correct[r][k - 1] &= h
                loss[r][k - 1] += c
                count[r][k - 1] += 1
        for r, i in enumerate(idx):
            out[i] = [{"correct": correct[r][k], "loss": loss[r][k], "tokens": count[r][k]}
                      for k in range(n_answers[r])]
    model.train(was_training)
    return out


def summarize(scores: list[list[dict]]) -> dict:
    """Accuracy over answers, mean answer loss per token (nats), and counts."""
    flat = [a for s in scores for a in s]
    if not flat:
        raise ValueError("no answers to score")
    tokens = sum(a["tokens"] for a in flat)
    return {"accuracy": sum(a["correct"] for a in flat) / len(flat),
            "answer_loss": sum(a["loss"] for a in flat) / max(tokens, 1),
            "answers": len(flat), "examples": len(scores)}
