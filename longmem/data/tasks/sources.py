"""The examples of a run's task, per split, rebuilt from its config (training and
``longmem eval`` see the same data).

Splits: ``train`` and ``val`` cut the training examples (``data.val_fraction``
held out, seeded by ``data.seed``, per task); ``test`` is the bAbI test file or,
for generated tasks, examples drawn with another seed.
"""
from __future__ import annotations

import random
from typing import Callable
from pathlib import Path

import numpy as np

from longmem.config import RunConfig
from longmem.data.tasks.babi import GENERATED_TASKS, BabiExample, generate_babi, load_babi
from longmem.data.tasks.pairs import Pair, generate_pairs, read_pairs
from longmem.data.tasks.probes import PROBES, Probe, babi, fit_text, haystack, passkey, recall

SPLITS = ("train", "val", "test")
_TEST_SEED = 1_000_003            # generated test examples never share a seed with training ones


def task_name(cfg: RunConfig) -> str:
    """The task a run trains on: babi for memn2n; pairs (a .jsonl), copy or passage for seq2seq; for a
    language model "lm" (its corpus) or a probe (passkey, recall, babi, haystack)."""
    name, arch = cfg.task.name, cfg.model.arch
    if arch in ("transformer", "lstm"):
        if name in ("copy", "passage"):
            raise ValueError(f"task.name={name} is a source -> target task for model.arch=seq2seq; a language "
                             f"model trains on auto (its corpus), {', '.join(PROBES)}")
        return "lm" if name == "auto" else name
    if arch == "memn2n":
        if name not in ("auto", "babi"):
            raise ValueError(f"model.arch=memn2n answers bAbI questions; task.name must be auto or babi, got {name!r}")
        return "babi"
    if arch == "seq2seq":
        if name == "babi":
            raise ValueError("task.name=babi needs model.arch=memn2n; seq2seq takes copy, passage or a .jsonl data.path")
        if cfg.data.path and Path(cfg.data.path).suffix == ".jsonl":
            return "pairs"
        if cfg.data.path:
            raise ValueError(f"seq2seq data.path must be a .jsonl file of source/target pairs, got {cfg.data.path}")
        return "passage" if name == "auto" else name
    if name in ("passkey", "recall", "haystack"):
        raise ValueError(f"task.name={name} is a probe for language models (model.arch transformer or lstm), "
                         f"not for {arch}")
    raise ValueError(f"model.arch={arch!r} takes no task")


def babi_task_ids(cfg: RunConfig) -> list[int]:
    return [int(p) for p in cfg.task.babi_tasks.split(",") if p.strip()]


def _cut(items: list, *, split: str, val_fraction: float, seed: int) -> list:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
    keep = sorted(order[:n_val]) if split == "val" else sorted(order[n_val:])
    return [items[i] for i in keep]


def babi_examples(cfg: RunConfig, split: str) -> list[BabiExample]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(SPLITS)}")
    d, t = cfg.data, cfg.task
    tasks = babi_task_ids(cfg)
    if d.path:
        if split == "test":
            return load_babi(d.path, split="test", tasks=tasks)
        by_task: dict[int, list[BabiExample]] = {}
        for ex in load_babi(d.path, split="train", tasks=tasks):
            by_task.setdefault(ex.task, []).append(ex)
    else:
        tasks = tasks or list(GENERATED_TASKS)
        if split == "test":
            return [ex for k in tasks for ex in generate_babi(task=k, n=t.n_test, seed=d.seed + _TEST_SEED)]
        by_task = {k: generate_babi(task=k, n=t.n_train, seed=d.seed) for k in tasks}
    return [ex for k, exs in sorted(by_task.items())
            for ex in _cut(exs, split=split, val_fraction=d.val_fraction, seed=d.seed + k)]


def pair_examples(cfg: RunConfig, split: str) -> list[Pair]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(SPLITS)}")
    d, t = cfg.data, cfg.task
    name = task_name(cfg)
    if name == "pairs":
        pairs = read_pairs(d.path)
        if split == "test":                       # a file has no test part: its held-out pairs serve
            split = "val"
        return _cut(pairs, split=split, val_fraction=d.val_fraction, seed=d.seed)
    if split == "test":
        return generate_pairs(name, n=t.n_test, seed=d.seed + _TEST_SEED, source_len=t.source_len)
    pairs = generate_pairs(name, n=t.n_train, seed=d.seed, source_len=t.source_len,
                           min_source_len=t.min_source_len or t.source_len)
    return _cut(pairs, split=split, val_fraction=d.val_fraction, seed=d.seed)


# -- probes for language models --------------------------------------------------
DISTRACTOR_CHARS = 8_000_000          # distractor text kept (tiled when a haystack needs more)


def distractor_text(path: str = "") -> str:
    """The text that hides haystack facts: the corpus at ``path`` or the embedded corpus."""
    from longmem.data.corpus import embedded_corpus, load_documents
    docs = load_documents(path) if path else embedded_corpus()
    return "\n\n".join(docs)[:DISTRACTOR_CHARS]


def probe_fit_texts(cfg: RunConfig) -> list[str]:
    """What a probe run's tokenizer is fitted on: every character its examples may write."""
    name = task_name(cfg)
    stories = babi_examples(cfg, "train") if name in ("babi", "haystack") else []
    source = distractor_text(cfg.task.distractor)[:1_000_000] if name == "haystack" else ""
    return fit_text(stories, source)


def probe_maker(cfg: RunConfig, tokenizer, split: str, *, stories: list[BabiExample] | None = None,
                source: np.ndarray | None = None) -> Callable[[int, int], Probe]:
    """``make(index, length)``: example ``index`` of the run's probe task and ``split``, ``length`` tokens long
    (babi examples have their own length), seeded by data.seed: the same index gives the same example."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(SPLITS)}")
    name, t = task_name(cfg), cfg.task
    if name not in PROBES:
        raise ValueError(f"task.name={name!r} is not a probe ({', '.join(PROBES)})")
    seed = f"{name}/{split}/{cfg.data.seed}"
    if name in ("babi", "haystack") and stories is None:
        stories = babi_examples(cfg, split)          # data.path, else generated tasks 1-3
    if name == "haystack" and source is None:
        source = np.asarray(tokenizer.encode(distractor_text(t.distractor)), dtype=np.int64)

    def make(index: int, length: int) -> Probe:
        rng = random.Random(f"{seed}/{index}")
        if name == "passkey":
            return passkey(tokenizer, length=length, depth=rng.random(), rng=rng)
        if name == "recall":
            return recall(tokenizer, length=length, depth=rng.random(), rng=rng, n_pairs=t.n_pairs)
        ex = stories[rng.randrange(len(stories))]
        return babi(tokenizer, ex) if name == "babi" else haystack(tokenizer, ex, length=length, rng=rng,
                                                                   source=source)
    return make
