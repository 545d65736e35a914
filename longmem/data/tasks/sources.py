"""The examples of a run's task, per split, rebuilt from its config (training and
``longmem eval`` see the same data).

Splits: ``train`` and ``val`` cut the training examples (``data.val_fraction``
held out, seeded by ``data.seed``, per task); ``test`` is the bAbI test file or,
for generated tasks, examples drawn with another seed.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np

from longmem.config import RunConfig
from longmem.data.tasks.babi import GENERATED_TASKS, BabiExample, generate_babi, load_babi
from longmem.data.tasks.probes import PROBES, Probe, babi, fit_text, haystack, passkey, recall

SPLITS = ("train", "val", "test")
TEST_SEED = 1_000_003            # generated test examples never share a seed with training ones


def task_name(cfg: RunConfig) -> str:
    """The task a run trains on. A baseline whose config class has a ``task_name`` (memn2n: babi; seq2seq: pairs,
    copy or passage; ``longmem.classic``) names its own; a language model trains on "lm" (its corpus) or a probe
    (passkey, recall, babi, haystack)."""
    own = getattr(cfg.model, "task_name", None)
    if own is not None:
        return own(cfg)
    return lm_task_name(cfg)


def lm_task_name(cfg: RunConfig) -> str:
    """A language model's task: "lm" (its corpus, task.name auto) or a probe."""
    name = cfg.task.name
    if name != "auto" and name not in PROBES:
        raise ValueError(f"task.name={name} is not a task of a language model (model.arch {cfg.model.arch}); it "
                         f"trains on auto (its corpus) or a probe: {', '.join(PROBES)}")
    return "lm" if name == "auto" else name


def babi_task_ids(cfg: RunConfig) -> list[int]:
    return [int(p) for p in cfg.task.babi_tasks.split(",") if p.strip()]


def cut_split(items: list, *, split: str, val_fraction: float, seed: int) -> list:
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
            return [ex for k in tasks for ex in generate_babi(task=k, n=t.n_test, seed=d.seed + TEST_SEED)]
        by_task = {k: generate_babi(task=k, n=t.n_train, seed=d.seed) for k in tasks}
    return [ex for k, exs in sorted(by_task.items())
            for ex in cut_split(exs, split=split, val_fraction=d.val_fraction, seed=d.seed + k)]


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
