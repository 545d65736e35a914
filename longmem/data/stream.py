"""Ordered lanes for recurrent training and evaluation.

Row i of every batch continues row i of the previous batch, so the memory of
lane i holds the true preceding text. A document never shares a segment with
another: its last segment is padded (targets ignored) and the next document
starts a new segment with ``reset`` true for that lane, which clears the lane's
memory.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from longmem.models.transformer import IGNORE_INDEX

PAD_ID = 0


@dataclass
class Batch:
    inputs: torch.Tensor    # (B, T) long
    targets: torch.Tensor   # (B, T) long, IGNORE_INDEX on padding
    reset: torch.Tensor     # (B,) bool: a new document starts in this lane
    n_inputs: int = 0       # input positions that are not padding

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def encode_documents(texts: list[str], tokenizer, *, cache_dir=None) -> list[np.ndarray]:
    """Token arrays of the documents that have at least one target (2+ tokens);
    memory-mapped from a token cache when ``cache_dir`` is given (see data/cache.py)."""
    from longmem.data.cache import encode_texts
    return [d for d in encode_texts(texts, tokenizer, cache_dir=cache_dir) if len(d) >= 2]


class _Lane:
    """One lane: walks through a sequence of documents segment by segment.

    A document is a 1-D array of token ids (every next token is a target) or a
    (2, N) array of token ids and an answer mask (only masked tokens are targets,
    as in the probe tasks)."""

    def __init__(self, next_doc):
        self.next_doc = next_doc          # () -> (np.ndarray, start offset) | (None, 0)
        self.doc: np.ndarray | None = None
        self.offset = 0

    def take(self, seg_len: int) -> tuple[np.ndarray, np.ndarray, bool, bool, int]:
        """(inputs, targets, reset, live, n real inputs) for the next segment of this lane."""
        reset = False
        if self.doc is None or self.offset >= self.doc.shape[-1] - 1:
            (self.doc, self.offset), reset = self.next_doc(), True
        inputs = np.full(seg_len, PAD_ID, dtype=np.int64)
        targets = np.full(seg_len, IGNORE_INDEX, dtype=np.int64)
        if self.doc is None:                                  # lane exhausted (finite streams)
            return inputs, targets, True, False, 0
        chunk = self.doc[..., self.offset:self.offset + seg_len + 1]
        n = chunk.shape[-1] - 1
        if chunk.ndim == 2:                                   # (tokens, answer mask)
            chunk, mask = chunk
            targets[:n] = np.where(mask[1:] > 0, chunk[1:], IGNORE_INDEX)
        else:
            targets[:n] = chunk[1:]
        inputs[:n] = chunk[:-1]
        self.offset += n
        return inputs, targets, reset, True, n


class TrainStream:
    """Endless batches: each lane goes through all training documents, in its own
    seeded order, epoch after epoch.

    ``lanes`` selects which of the ``batch_size`` global lanes this process reads
    (all by default; one slice per rank under DDP), so lane i reads the same text
    whatever the number of processes. ``state_dict()`` is the data position of
    every lane (JSON), for exact resume."""

    def __init__(self, docs: list[np.ndarray], *, batch_size: int, seg_len: int, seed: int,
                 lanes: range | None = None):
        if not docs:
            raise ValueError("no training documents with at least 2 tokens")
        self.docs, self.seg_len, self.seed = docs, seg_len, seed
        self.lane_ids = list(lanes if lanes is not None else range(batch_size))
        self.pos = [{"epoch": 0, "remaining": [], "doc": -1} for _ in self.lane_ids]
        self.lanes = [_Lane(self._doc_iter(j)) for j in range(len(self.lane_ids))]

    def _doc_iter(self, j: int):
        def next_doc():
            pos = self.pos[j]
            if not pos["remaining"]:
                order = list(range(len(self.docs)))
                random.Random(f"{self.seed}/{self.lane_ids[j]}/{pos['epoch']}").shuffle(order)
                pos["remaining"], pos["epoch"] = order, pos["epoch"] + 1
            pos["doc"] = pos["remaining"].pop()
            doc = self.docs[pos["doc"]]
            start = 0
            if pos["epoch"] == 1 and len(pos["remaining"]) == len(self.docs) - 1:
                # a lane's very first document starts at a lane-specific point (golden-ratio spread),
                # so lanes never read the same text in lockstep, even on a one-document corpus
                start = int((len(doc) - 1) * ((self.lane_ids[j] * 0.6180339887) % 1.0))
            return doc, start
        return next_doc

    def state_dict(self) -> dict:
        return {"lanes": self.lane_ids, "n_docs": len(self.docs),
                "positions": [{**p, "remaining": list(p["remaining"]), "offset": lane.offset}
                              for p, lane in zip(self.pos, self.lanes)]}

    def load_positions(self, positions: list[dict]) -> None:
        def fits(p: dict) -> bool:
            return ("remaining" in p and -1 <= p.get("doc", -2) < len(self.docs)
                    and all(0 <= i < len(self.docs) for i in p["remaining"]))
        if len(positions) != len(self.lanes) or not all(map(fits, positions)):
            raise ValueError(f"the saved data position does not fit this run's {len(self.docs)} documents and "
                             f"{len(self.lanes)} lanes: the corpus or the batch size changed")
        for p, lane, saved in zip(self.pos, self.lanes, positions):
            p.update(epoch=saved["epoch"], remaining=list(saved["remaining"]), doc=saved["doc"])
            lane.doc = self.docs[saved["doc"]] if saved["doc"] >= 0 else None
            lane.offset = saved["offset"]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return _stack([lane.take(self.seg_len) for lane in self.lanes])


class TaskStream:
    """Endless batches of generated task examples (the probe tasks): lane ``g`` of
    ``batch_size`` global lanes reads examples ``g, g + batch_size, g + 2 * batch_size, ...``,
    each from the seeded ``make_doc(index, length)`` (a (2, N) array of token ids and
    answer mask), each starting with a reset of the lane's memory.

    ``length`` (tokens per example) may change between steps, e.g. by a curriculum;
    an example already begun keeps its length. ``state_dict()`` is every lane's
    example index, length and offset (JSON), for exact resume."""

    def __init__(self, make_doc, *, batch_size: int, seg_len: int, length: int, lanes: range | None = None):
        self.make_doc, self.batch_size, self.seg_len, self.length = make_doc, batch_size, seg_len, length
        self.lane_ids = list(lanes if lanes is not None else range(batch_size))
        self.pos = [{"index": g - batch_size, "length": length} for g in self.lane_ids]
        self.lanes = [_Lane(self._doc_iter(j)) for j in range(len(self.lane_ids))]

    def _doc_iter(self, j: int):
        def next_doc():
            pos = self.pos[j]
            pos["index"] += self.batch_size
            pos["length"] = self.length
            return self.make_doc(pos["index"], pos["length"]), 0
        return next_doc

    def state_dict(self) -> dict:
        return {"lanes": self.lane_ids, "length": self.length,
                "positions": [{**p, "offset": lane.offset, "begun": lane.doc is not None}
                              for p, lane in zip(self.pos, self.lanes)]}

    def load_positions(self, positions: list[dict]) -> None:
        if len(positions) != len(self.lanes) or any("index" not in p for p in positions):
            raise ValueError("the saved data position is not one of a task run with these lanes: the task or "
                             "the batch size changed")
        for p, lane, saved in zip(self.pos, self.lanes, positions):
            p.update(index=saved["index"], length=saved["length"])
            lane.doc = self.make_doc(saved["index"], saved["length"]) if saved["begun"] else None
            lane.offset = saved["offset"]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return _stack([lane.take(self.seg_len) for lane in self.lanes])


def _balanced_lanes(docs: list[np.ndarray], *, batch_size: int, seg_len: int):
    """Documents dealt to lanes, longest first, each to the lane with the fewest segments.

    A document longer than twice a lane's fair share is cut into pieces of about one
    share that overlap by one token (every target is still read exactly once, only the
    first tokens of a piece lose their context), so one long document, e.g. the
    validation tail of a one-file corpus, does not leave all lanes but one idle."""
    share = max(seg_len, -(-sum(d.shape[-1] - 1 for d in docs) // batch_size))
    pieces = []
    for d in docs:
        n_targets = d.shape[-1] - 1
        n_pieces = -(-n_targets // share) if n_targets > 2 * share else 1
        step = -(-n_targets // n_pieces)
        pieces += [d[..., a:min(a + step, n_targets) + 1] for a in range(0, n_targets, step)]
    docs = pieces
    buckets: list[list[np.ndarray]] = [[] for _ in range(batch_size)]
    totals = [0] * batch_size
    for d in sorted(docs, key=lambda d: d.shape[-1], reverse=True):
        i = totals.index(min(totals))
        buckets[i].append(d)
        totals[i] += -(-(d.shape[-1] - 1) // seg_len)
    return buckets, totals


def n_eval_batches(docs: list[np.ndarray], *, batch_size: int, seg_len: int) -> int:
    """How many batches :func:`eval_batches` yields (without a ``max_segments`` cap)."""
    return max(_balanced_lanes(docs, batch_size=batch_size, seg_len=seg_len)[1], default=0)


def eval_batches(docs: list[np.ndarray], *, batch_size: int, seg_len: int, max_segments: int = 0):
    """Finite batches over every document once, documents balanced over lanes by length.

    Yields until all lanes are exhausted (or ``max_segments`` batches)."""
    buckets, _ = _balanced_lanes(docs, batch_size=batch_size, seg_len=seg_len)
    lanes = [_Lane(_pop_front(b)) for b in buckets]
    n = 0
    while True:
        rows = [lane.take(seg_len) for lane in lanes]
        if not any(row[3] for row in rows):
            return
        yield _stack(rows)
        n += 1
        if max_segments and n >= max_segments:
            return


def _pop_front(items: list):
    items = list(items)
    return lambda: (items.pop(0), 0) if items else (None, 0)


TRIM_MULTIPLE = 16        # a trimmed segment's width is a multiple of this (fewer distinct shapes)


def _stack(rows) -> Batch:
    """One batch of lane rows. When every lane's document ends inside this segment (short task examples
    in a long ``segment_len``), the padding columns after the longest row are dropped (the width rounded
    up to a multiple of :data:`TRIM_MULTIPLE`): attention is causal, so no real position reads them, and
    every lane resets before its next segment, so no memory written from them is read. The same losses,
    without the cost of the padding."""
    inputs, targets, reset, _, n = zip(*rows)
    seg_len, longest = len(inputs[0]), max(n)
    width = min(seg_len, -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE) if longest else seg_len
    return Batch(inputs=torch.from_numpy(np.stack(inputs)[:, :width]),
                 targets=torch.from_numpy(np.stack(targets)[:, :width]),
                 reset=torch.tensor(reset, dtype=torch.bool), n_inputs=sum(n))
