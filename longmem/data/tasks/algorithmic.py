"""The algorithmic tasks of the Neural Turing Machine (Graves et al. 2014 §4), as token sequences of random
binary vectors (``BitsTokenizer``: one token per vector, markers for the delimiters).

An example is an input sequence and a target sequence of the same length; a target is ``IGNORE_INDEX``
where the model has nothing to output. While the model answers it reads blanks (``_``), never its own
answers (no teacher forcing), as in the paper.

- copy (§4.1): ``v1 .. vL |`` then L blanks; the targets are v1 .. vL. Training lengths 1..20.
- repeat copy (§4.2): ``v1 .. vL |`` and R repeat markers ``*``, then blanks; the targets are the
  sequence R times and the end marker ``.``.
- associative recall (§4.3): items of 3 vectors, each behind a delimiter ``|``, then a query item
  between ``?`` markers; the target is the item that followed the query item. 2..6 items in training.

The models read and write these tokens as bits (``classic/bits.py``): the input is the vector's bits and
one channel per marker (a blank is all zeros), the output ``width`` bit logits and an end bit, scored
with bitwise cross-entropy and bit errors, as in the paper.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from longmem.data.tokenizer import BitsTokenizer
from longmem.models.transformer import IGNORE_INDEX

SEQUENCE_TASKS = ("copy", "repeat_copy", "associative_recall")
ITEM_LEN = 3                    # vectors per associative-recall item (§4.3)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


@dataclass
class SeqExample:
    inputs: np.ndarray           # (T,) int64 token ids
    targets: np.ndarray          # (T,) int64, IGNORE_INDEX where nothing is output
    info: dict = field(default_factory=dict)      # task, length (copy: vectors; recall: items), repeats

    def __len__(self) -> int:
        return len(self.inputs)


def _vectors(tok: BitsTokenizer, n: int, rng: random.Random) -> list[int]:
    return [rng.getrandbits(tok.width) for _ in range(n)]


def _example(inputs: list[int], targets: list[int], info: dict) -> SeqExample:
    return SeqExample(np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64), info)


def copy_example(tok: BitsTokenizer, *, length: int, rng: random.Random) -> SeqExample:
    """NTM §4.1: ``length`` random vectors and a delimiter, then as many blanks while the model writes them."""
    if length < 1:
        raise ValueError(f"copy needs at least one vector, got length {length}")
    seq = _vectors(tok, length, rng)
    blank = tok.ids[tok.BLANK]
    return _example(seq + [tok.ids[tok.DELIM]] + [blank] * length, [IGNORE_INDEX] * (length + 1) + seq,
                    {"task": "copy", "length": length})


def repeat_copy_example(tok: BitsTokenizer, *, length: int, repeats: int, rng: random.Random) -> SeqExample:
    """NTM §4.2: the sequence, a delimiter and ``repeats`` repeat markers; the model writes the sequence
    ``repeats`` times and then the end marker."""
    if length < 1 or repeats < 1:
        raise ValueError(f"repeat copy needs length >= 1 and repeats >= 1, got {length} and {repeats}")
    seq = _vectors(tok, length, rng)
    head = seq + [tok.ids[tok.DELIM]] + [tok.ids[tok.REPEAT]] * repeats
    out = seq * repeats + [tok.ids[tok.END]]
    return _example(head + [tok.ids[tok.BLANK]] * len(out), [IGNORE_INDEX] * len(head) + out,
                    {"task": "repeat_copy", "length": length, "repeats": repeats})


def recall_example(tok: BitsTokenizer, *, items: int, rng: random.Random) -> SeqExample:
    """NTM §4.3: ``items`` items of ``ITEM_LEN`` vectors, each after a delimiter; a query item (one of
    them but the last) between query markers; the target is the item that followed it."""
    if items < 2:
        raise ValueError(f"associative recall needs at least 2 items, got {items}")
    seq = [_vectors(tok, ITEM_LEN, rng) for _ in range(items)]
    q = rng.randrange(items - 1)
    delim, query = tok.ids[tok.DELIM], tok.ids[tok.QUERY]
    head = [t for item in seq for t in [delim, *item]] + [query, *seq[q], query]
    return _example(head + [tok.ids[tok.BLANK]] * ITEM_LEN, [IGNORE_INDEX] * len(head) + seq[q + 1],
                    {"task": "associative_recall", "length": items, "query": q})


def make_example(name: str, tok: BitsTokenizer, *, length: int, repeats: int, rng: random.Random) -> SeqExample:
    """One example of task ``name`` (``SEQUENCE_TASKS``): ``length`` vectors (copy) or items (recall)."""
    if name == "copy":
        return copy_example(tok, length=length, rng=rng)
    if name == "repeat_copy":
        return repeat_copy_example(tok, length=length, repeats=repeats, rng=rng)
    if name == "associative_recall":
        return recall_example(tok, items=length, rng=rng)
    raise ValueError(f"unknown sequence task {name!r}; accepted: {', '.join(SEQUENCE_TASKS)}")


def sequence_maker(name: str, tok: BitsTokenizer, *, split: str, seed: int, min_len: int, max_len: int,
                   max_repeats: int = 1):
    """``make(index)``: example ``index`` of ``split``, its length drawn uniformly from ``min_len..max_len``
    (and repeats from 1..max_repeats), seeded: the same index always gives the same example, and the
    splits never share a seed."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(SPLIT_SEEDS)}")

    def make(index: int) -> SeqExample:
        rng = random.Random(f"{name}/{split}/{seed}/{index}")
        return make_example(name, tok, length=rng.randint(min_len, max_len), repeats=rng.randint(1, max_repeats),
                            rng=rng)
    return make


def pad_examples(examples: list[SeqExample], *, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) (B, T) of examples of different lengths: inputs padded with ``pad`` (a blank) after
    the end, targets with IGNORE_INDEX."""
    T = max(len(e) for e in examples)
    inputs = np.full((len(examples), T), pad, dtype=np.int64)
    targets = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for b, e in enumerate(examples):
        inputs[b, :len(e)], targets[b, :len(e)] = e.inputs, e.targets
    return inputs, targets
