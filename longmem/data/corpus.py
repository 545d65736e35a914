"""Corpora as lists of documents: a .txt file, a folder of them, or the
embedded default (the text of Python's ``pydoc_data.topics``, which ships with
every CPython, so no download is needed).
"""
from __future__ import annotations

import random
from pathlib import Path


def embedded_corpus() -> list[str]:
    """The pydoc topics of this Python, one document per topic, in a stable order."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def load_documents(path: str | Path | None = None) -> list[str]:
    """Documents from ``path``: a .txt file (one document), a folder of .txt files
    (one document each, sorted by path), or the embedded corpus when ``path`` is empty."""
    if not path:
        return embedded_corpus()
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files in folder {path}")
        docs = [_read(p) for p in files]
    elif path.is_file():
        if path.suffix != ".txt":
            raise ValueError(f"data.path must be a .txt file or a folder of them, got {path}")
        docs = [_read(path)]
    else:
        raise FileNotFoundError(f"data.path not found: {path}")
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{path} holds no text")
    return docs


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text: {e}") from None


def split_documents(docs: list[str], *, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split by document (never inside one). A single document is cut at
    (1 - val_fraction) of its length instead, the usual split of e.g. Tiny Shakespeare."""
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    if not train:
        raise ValueError(f"{len(docs)} documents leave none for training with val_fraction={val_fraction}")
    return [docs[i] for i in train], [docs[i] for i in val]
