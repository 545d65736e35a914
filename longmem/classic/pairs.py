"""Source -> target pairs for the encoder-decoder: a ``.jsonl`` file with ``source``
and ``target`` fields, or seeded generated tasks.

Generated tasks (characters, for byte/char tokenizers):
- ``copy``: the target is the source (random lower-case letters).
- ``passage``: a long passage whose *start* holds four ``key:value`` facts, then
  filler, then a question ``key?`` at the very end; the target is that key's
  value. The answer depends on the far part of the source, so a model that reads
  only the end of its input is at chance (1 in 10,000).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from longmem.data.corpus import iter_jsonl
from longmem.models import IGNORE_INDEX

BOS, EOS = "\x02", "\x03"        # start / end of text (ASCII STX, ETX): a byte or char token each
GENERATED_PAIRS = ("copy", "passage")


@dataclass
class Pair:
    source: str
    target: str


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs of a .jsonl file: one JSON object per line with text fields ``source`` and ``target``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    out = []
    for n, obj in iter_jsonl(path):
        if not (isinstance(obj, dict) and isinstance(obj.get("source"), str) and isinstance(obj.get("target"), str)):
            raise ValueError(f"{path}:{n}: each line needs text fields 'source' and 'target'")
        out.append(Pair(source=obj["source"], target=obj["target"]))
    if not out:
        raise ValueError(f"{path} holds no pairs")
    return out


def generate_pairs(name: str, *, n: int, seed: int, source_len: int, min_source_len: int = 0) -> list[Pair]:
    """``n`` seeded pairs of the generated task ``name`` (copy | passage) with sources of about ``source_len``
    chars; with ``min_source_len`` each passage's length is drawn between it and ``source_len`` (the facts
    and the question always fit: a short passage has less filler)."""
    if name not in GENERATED_PAIRS:
        raise ValueError(f"generated seq2seq tasks are {', '.join(GENERATED_PAIRS)}; got {name!r}")
    rng = random.Random(f"pairs/{name}/{seed}")
    out = []
    for _ in range(n):
        length = rng.randint(min_source_len, source_len) if 0 < min_source_len < source_len else source_len
        if name == "copy":
            k = rng.randint(max(1, source_len // 2), source_len)
            text = "".join(rng.choices(string.ascii_lowercase, k=k))
            out.append(Pair(source=text, target=text))
            continue
        keys = rng.sample(string.ascii_lowercase, 4)
        values = ["".join(rng.choices(string.digits, k=4)) for _ in keys]
        facts = " ".join(f"{k}:{v}" for k, v in zip(keys, values)) + " "
        asked = rng.randrange(len(keys))
        question = f" {keys[asked]}?"
        n_fill = max(0, length - len(facts) - len(question))
        filler = "".join(rng.choices(string.ascii_uppercase + " ", k=n_fill))   # no key letters, no digits
        out.append(Pair(source=facts + filler + question, target=values[asked]))
    return out


def pairs_batch(pairs: list[Pair], tokenizer) -> dict[str, torch.Tensor]:
    """source (B, S) ids, source_mask (B, S), target_in (B, T) = BOS + target, targets (B, T) = target + EOS
    (IGNORE_INDEX on padding)."""
    bos, eos = tokenizer.encode(BOS), tokenizer.encode(EOS)
    src = [tokenizer.encode(p.source) or eos for p in pairs]
    tgt = [tokenizer.encode(p.target) for p in pairs]
    B, S, T = len(pairs), max(map(len, src)), max(map(len, tgt)) + 1
    source = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.bool)
    target_in = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (s, t) in enumerate(zip(src, tgt)):
        source[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = True
        target_in[b, :len(t) + 1] = torch.tensor(bos + t)
        targets[b, :len(t) + 1] = torch.tensor(t + eos)
    return {"source": source, "source_mask": mask, "target_in": target_in, "targets": targets}


def pair_examples(cfg, split: str) -> list[Pair]:
    """The source -> target pairs of a seq2seq run's task and ``split`` (train/val cut from the training pairs,
    test generated with another seed; a .jsonl file's held-out pairs serve as its test)."""
    from longmem.data.tasks.sources import SPLITS, TEST_SEED, cut_split, task_name
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(SPLITS)}")
    d, t = cfg.data, cfg.task
    name = task_name(cfg)
    if name == "pairs":
        pairs = read_pairs(d.path)
        if split == "test":                       # a file has no test part: its held-out pairs serve
            split = "val"
        return cut_split(pairs, split=split, val_fraction=d.val_fraction, seed=d.seed)
    if split == "test":
        return generate_pairs(name, n=t.n_test, seed=d.seed + TEST_SEED, source_len=t.source_len)
    pairs = generate_pairs(name, n=t.n_train, seed=d.seed, source_len=t.source_len,
                           min_source_len=t.min_source_len or t.source_len)
    return cut_split(pairs, split=split, val_fraction=d.val_fraction, seed=d.seed)
