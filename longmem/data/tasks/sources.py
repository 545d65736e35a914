"""The examples of a run's task, per split, rebuilt from its config (training and
``longmem eval`` see the same data).

Splits: ``train`` and ``val`` cut the training examples (``data.val_fraction``
held out, seeded by ``data.seed``, per task); ``test`` is the bAbI test file or,
for generated tasks, examples drawn with another seed.
"""
from __future__ import annotations

import random
from pathlib import Path

from longmem.config import RunConfig
from longmem.data.tasks.babi import GENERATED_TASKS, BabiExample, generate_babi, load_babi
from longmem.data.tasks.pairs import Pair, generate_pairs, read_pairs

SPLITS = ("train", "val", "test")
_TEST_SEED = 1_000_003            # generated test examples never share a seed with training ones


def task_name(cfg: RunConfig) -> str:
    """The task a run trains on: babi for memn2n; pairs (a .jsonl), copy or passage for seq2seq."""
    name, arch = cfg.task.name, cfg.model.arch
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
    raise ValueError(f"model.arch={arch!r} is a language model; tasks are for seq2seq and memn2n")


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
