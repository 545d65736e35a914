"""Long-range probes as text, for any tokenizer: passkey retrieval, multi-query
associative recall, bAbI stories and bAbI facts hidden in a long haystack.

Each generator returns a :class:`Probe`: the token ids of one example and, for
every token, the number of the answer it belongs to (0: not an answer). The
loss and the score count answer tokens only. Lengths are exact token counts
(filler is cut to fit), so a sweep over lengths and depths places the needle
where asked. Everything is seeded: the same ``random.Random`` state gives the
same example.

- passkey (Mohtashami & Jaggi 2023): a number hidden in repeated filler at a
  chosen depth; the question at the end asks for it.
- recall (multi-query associative recall, Arora et al. 2023): ``key=value``
  pairs stated at a chosen depth, all keys asked again at the end.
- babi (Weston et al. 2015): a story, its question, the answer.
- haystack (BABILong, Kuratov et al. 2024): the same story's sentences
  scattered in order at random places through distractor text of any corpus.
"""
from __future__ import annotations

import random
import re
import string
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from longmem.data.tasks.babi import BabiExample

PROBES = ("passkey", "recall", "babi", "haystack")

# the prompt of Mohtashami & Jaggi (2023), shortened so a probe fits in one 128-token segment
PASSKEY_PREFIX = "Find the pass key.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? It is"
RECALL_PREFIX = "Remember these pairs:"
RECALL_QUESTION = "\nRecall:"
# characters every probe may write: a char tokenizer fitted for probe training sees them all
ALPHABET = string.ascii_letters + string.digits + " .,:;=?!'\n"


@dataclass
class Probe:
    tokens: np.ndarray                  # (N,) int64 token ids
    answer: np.ndarray                  # (N,) int32: k > 0 on the tokens of answer k, 0 elsewhere
    info: dict = field(default_factory=dict)          # task, length, depth, ...
    answers: list[dict] = field(default_factory=list)  # per answer k (index k - 1): text, distance, ...

    def __len__(self) -> int:
        return len(self.tokens)

    def as_doc(self) -> np.ndarray:
        """(2, N) int64: token ids and the answer mask, the document form the lanes read."""
        return np.stack([self.tokens, (self.answer > 0).astype(np.int64)])


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,16k,1m' -> [1024, 4096, 16384, 1048576] (k = 1024, m = 1024 ** 2; plain integers too)."""
    out = []
    for part in filter(None, (p.strip().lower() for p in str(text).split(","))):
        scale = {"k": 1024, "m": 1024 ** 2}.get(part[-1], 1)
        digits = part[:-1] if scale > 1 else part
        try:
            value = int(float(digits) * scale)
        except ValueError:
            raise ValueError(f"length {part!r}: write token counts like 512, 4k or 1m, separated by commas") from None
        if value <= 0:
            raise ValueError(f"length {part!r} must be positive")
        out.append(value)
    if not out:
        raise ValueError(f"no lengths in {text!r}; write token counts like 1k,4k,16k")
    return out


def parse_depths(text: str) -> list[float]:
    """'0,0.25,0.5,1' -> [0.0, 0.25, 0.5, 1.0]; each in [0, 1] (0: at the start, 1: just before the question)."""
    try:
        out = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"depths {text!r}: write fractions in [0, 1] separated by commas, e.g. 0,0.5,1") from None
    if not out or not all(0.0 <= d <= 1.0 for d in out):
        raise ValueError(f"depths {text!r}: each depth must be in [0, 1] (0: start, 1: just before the question)")
    return out


class _Text:
    """Token ids of fixed pieces of text, encoded once per tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            ids = np.asarray(self.tok.encode(text), dtype=np.int64)
            if getattr(self.tok, "kind", "") == "char" and text and (ids == 0).any():
                missing = sorted({c for c in text if self.tok.encode(c) == [0]})
                raise ValueError(f"this run's character tokenizer cannot write {''.join(missing)!r}, which the "
                                 f"probe needs; train with --data.tokenizer byte (or a corpus that has them)")
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return ids


    def answer(self, text: str, k: int) -> list[tuple[np.ndarray, int]]:
        """Pieces of an answer text: its leading tokens that are only whitespace (the space before a word or a
        number, a token of its own for many pretrained tokenizers) are context, the rest is answer ``k``."""
        ids = self(text)
        n = 0
        while n < len(ids) - 1 and not self.tok.decode([int(ids[n])]).strip():
            n += 1
        return [(ids[:n], 0), (ids[n:], k)]


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _texts(tokenizer) -> _Text:
    if tokenizer not in _ENCODERS:
        _ENCODERS[tokenizer] = _Text(tokenizer)
    return _ENCODERS[tokenizer]


def _filler(enc: _Text, n: int, rng: random.Random, source: np.ndarray | None = None) -> np.ndarray:
    """``n`` filler tokens: a random window of ``source`` (tiled if shorter), or of repeated FILLER sentences."""
    base = source if source is not None and len(source) else enc(FILLER)
    if n <= 0:
        return base[:0]
    start = rng.randrange(len(base))
    reps = -(-(start + n) // len(base))
    return np.tile(base, reps)[start:start + n] if reps > 1 else base[start:start + n]


def _assemble(pieces: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Concatenate (tokens, answer id) pieces; returns tokens, answer array and each piece's start."""
    starts, pos = [], 0
    for ids, _ in pieces:
        starts.append(pos)
        pos += len(ids)
    tokens = np.concatenate([ids for ids, _ in pieces]).astype(np.int64)
    answer = np.concatenate([np.full(len(ids), k, dtype=np.int32) for ids, k in pieces])
    return tokens, answer, starts


def _check_room(task: str, length: int, fixed: int) -> int:
    room = length - fixed
    if room < 0:
        raise ValueError(f"{task}: length {length} is too short for this tokenizer; the fixed text alone takes "
                         f"{fixed} tokens (use a length >= {fixed})")
    return room


def passkey(tokenizer, *, length: int, depth: float, rng: random.Random, digits: int = 5) -> Probe:
    """A ``digits``-digit pass key hidden at ``depth`` of ``length`` tokens of filler; the answer is the key."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    enc = _texts(tokenizer)
    key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    needle = enc(f" The pass key is {key}. Remember it. ")
    prefix, question, answer = enc(PASSKEY_PREFIX), enc(PASSKEY_QUESTION), enc.answer(" " + key, 1)
    room = _check_room("passkey", length, len(prefix) + len(needle) + len(question)
                       + sum(len(ids) for ids, _ in answer))
    before = round(depth * room)
    filler = _filler(enc, room, rng)
    tokens, ans, starts = _assemble([(prefix, 0), (filler[:before], 0), (needle, 0), (filler[before:], 0),
                                     (question, 0), *answer])
    return Probe(tokens, ans, info={"task": "passkey", "length": length, "depth": depth, "needle": starts[2]},
                 answers=[{"text": " " + key, "distance": starts[6] - starts[2]}])


def recall(tokenizer, *, length: int, depth: float, rng: random.Random, n_pairs: int = 8,
           source: np.ndarray | None = None) -> Probe:
    """``n_pairs`` pairs ``key=value`` (three-letter keys, two-digit values) stated at ``depth``; every key is
    asked again, in a new order, at the end. One answer per key; chance is 1 in 100."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"recall depth must be in [0, 1], got {depth}")
    if n_pairs < 1:
        raise ValueError(f"recall needs n_pairs >= 1, got {n_pairs}")
    enc = _texts(tokenizer)
    keys: list[str] = []
    while len(keys) < n_pairs:
        k = "".join(rng.choices(string.ascii_lowercase, k=3))
        if k not in keys:
            keys.append(k)
    values = [f"{rng.randrange(100):02d}" for _ in keys]
    stated = [(enc(RECALL_PREFIX), 0)]
    for k, v in zip(keys, values):
        stated += [(enc(f" {k}="), 0), (enc(v), 0), (enc(","), 0)]
    order = list(range(n_pairs))
    rng.shuffle(order)
    asked = [(enc(RECALL_QUESTION), 0)]
    for n, i in enumerate(order, 1):
        asked += [(enc(f" {keys[i]}="), 0), (enc(values[i]), n), (enc(","), 0)]
    fixed = sum(len(ids) for ids, _ in stated + asked)
    room = _check_room("recall", length, fixed)
    before = round(depth * room)
    filler = _filler(enc, room, rng, source)
    pieces = [(filler[:before], 0)] + stated + [(filler[before:], 0)] + asked
    tokens, ans, starts = _assemble(pieces)
    value_start = {i: starts[1 + 3 * i + 2] for i in range(n_pairs)}          # where value i is stated
    asked_start = [starts[len(stated) + 2 + 3 * j + 2] for j in range(n_pairs)]
    answers = [{"text": values[i], "key": keys[i], "distance": asked_start[j] - value_start[i]}
               for j, i in enumerate(order)]
    return Probe(tokens, ans, info={"task": "recall", "length": length, "depth": depth, "n_pairs": n_pairs},
                 answers=answers)


_WHERE = re.compile(r"Where is (.+)\?$")


def answer_lead(question: str) -> str:
    """The answer's lead-in restating the question's subject ("Where is Mary?" -> "Mary is in the"), or "" for
    a question of another form. With it a pretrained model's next token is the answer itself, as BABILong's
    prompts ask for "The most recent location of X is Y" (Kuratov et al. 2024, appendix); without it a small
    model far from the question's format often answers with something other than a place."""
    m = _WHERE.match(question.strip())
    if m is None:
        return ""
    subject = m.group(1)
    return f" {subject[0].upper()}{subject[1:]} is in the"


def _answer_text(ex: BabiExample, lead: bool) -> str:
    return (answer_lead(ex.question) if lead else "") + " " + ex.answer


def _story_pieces(enc: _Text, ex: BabiExample, lead: bool = False
                  ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, int]]]:
    sentences = [enc(" " + s) for s in ex.story]
    head = f"\nQuestion: {ex.question} Answer:" + (answer_lead(ex.question) if lead else "")
    tail = [(enc(head), 0), *enc.answer(" " + ex.answer, 1), (enc("\n"), 0)]
    return sentences, tail


def _demo_pieces(enc: _Text, demos: Sequence[BabiExample], lead: bool = False) -> list[tuple[np.ndarray, int]]:
    """Solved examples put first (few-shot demonstrations, as BABILong prompts pretrained models): context."""
    return [(enc(" ".join(d.story) + f"\nQuestion: {d.question} Answer:{_answer_text(d, lead)}\n\n"), 0)
            for d in demos]


def story_length(tokenizer, ex: BabiExample, demos: Sequence[BabiExample] = (), *, cloze: bool = False) -> int:
    """Tokens of ``ex`` as text (demonstrations, story, question, answer): the shortest haystack that holds it."""
    enc = _texts(tokenizer)
    sentences, tail = _story_pieces(enc, ex, cloze)
    return (sum(len(ids) for ids, _ in _demo_pieces(enc, demos, cloze)) + sum(map(len, sentences))
            + sum(len(ids) for ids, _ in tail))


def babi(tokenizer, ex: BabiExample, *, demos: Sequence[BabiExample] = (), cloze: bool = False) -> Probe:
    """A bAbI story as text, its question and the answer (the answer tokens are the target), after
    ``demos`` (solved examples, context). ``cloze``: the answer follows the question's subject restated
    ("Answer: Mary is in the kitchen", see :func:`answer_lead`)."""
    enc = _texts(tokenizer)
    sentences, tail = _story_pieces(enc, ex, cloze)
    tokens, ans, _ = _assemble(_demo_pieces(enc, demos, cloze) + [(s, 0) for s in sentences] + tail)
    return Probe(tokens, ans, info={"task": "babi", "babi_task": ex.task, "length": len(tokens)},
                 answers=[{"text": ex.answer, "babi_task": ex.task}])


def haystack(tokenizer, ex: BabiExample, *, length: int, rng: random.Random, source: np.ndarray,
             demos: Sequence[BabiExample] = (), cloze: bool = False) -> Probe:
    """The sentences of ``ex``'s story, in order, at random places in ``length`` tokens of ``source`` text
    (a random window of it, tiled if shorter); the question and answer at the end. ``demos`` (solved
    examples, context) come first, before the text. ``cloze``: as in :func:`babi`."""
    enc = _texts(tokenizer)
    sentences, tail = _story_pieces(enc, ex, cloze)
    head = _demo_pieces(enc, demos, cloze)
    fixed = sum(len(ids) for ids, _ in head) + sum(map(len, sentences)) + sum(len(ids) for ids, _ in tail)
    room = _check_room("haystack", length, fixed)
    filler = _filler(enc, room, rng, source)
    cuts = sorted(rng.randrange(room + 1) for _ in sentences)
    pieces, prev = list(head), 0
    for cut, s in zip(cuts, sentences):
        pieces += [(filler[prev:cut], 0), (s, 0)]
        prev = cut
    pieces += [(filler[prev:], 0)] + tail
    tokens, ans, starts = _assemble(pieces)
    question_at = starts[len(pieces) - len(tail)]
    sentence_at = [starts[len(head) + 2 * i + 1] for i in range(len(sentences))]
    first = sentence_at[0] if sentences else question_at
    supporting = [sentence_at[i] for i in ex.supporting if i < len(sentences)]
    return Probe(tokens, ans, info={"task": "haystack", "babi_task": ex.task, "length": length},
                 answers=[{"text": ex.answer, "babi_task": ex.task, "distance": question_at - first,
                           "support_distance": question_at - min(supporting) if supporting else None}])


def fit_text(babi_examples: list[BabiExample] = (), source_text: str = "") -> list[str]:
    """Texts to fit a tokenizer for probe training: every character a probe may write."""
    return ([ALPHABET, PASSKEY_PREFIX, FILLER, PASSKEY_QUESTION, RECALL_PREFIX, RECALL_QUESTION, source_text]
            + [" ".join(ex.story) + f" Question: {ex.question} Answer: {ex.answer}" for ex in babi_examples])
