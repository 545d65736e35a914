"""Corpora as lists of documents: a .txt file, a folder of them, or the
embedded default (the text of Python's ``pydoc_data.topics``, which ships with
every CPython, so no download is needed).
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from longmem.utils import install_hint

log = logging.getLogger(__name__)


def embedded_corpus() -> list[str]:
    """The pydoc topics of this Python, one document per topic, in a stable order."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def load_documents(path: str | Path | None = None, *, text_field: str = "text") -> list[str]:
    """Documents from ``path``: a .txt file (one document), a folder of .txt files
    (one document each, sorted by path), a .jsonl file (the ``text_field`` of each
    line), or the embedded corpus when ``path`` is empty."""
    if not path:
        return embedded_corpus()
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files in folder {path}")
        docs = [_read(p) for p in files]
    elif path.is_file():
        if path.suffix == ".jsonl":
            docs = _read_jsonl(path, text_field)
        elif path.suffix == ".txt":
            docs = [_read(path)]
        else:
            raise ValueError(f"data.path must be a .txt or .jsonl file or a folder of .txt files, got {path}")
    else:
        raise FileNotFoundError(f"data.path not found: {path}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"the corpus {path} is empty: it holds no text")
    return docs


def load_hf_documents(name: str, *, config: str = "", split: str = "train", text_field: str = "text") -> list[str]:
    """The ``text_field`` of every row of a Hugging Face dataset (the ``datasets`` package is optional)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"data.hf_dataset needs the `datasets` package: {install_hint('hf')}") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:                      # offline, unknown name, missing config: all arrive as Exception
        raise ValueError(f"cannot load the Hugging Face dataset {name!r} (config {config or 'default'!r}, split "
                         f"{split!r}): {e}. Without network access only datasets already in the local cache "
                         f"load; set HF_DATASETS_OFFLINE=1 to use the cache, or pass data.path instead.") from None
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no field {text_field!r}; its fields: {', '.join(ds.column_names)}")
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise ValueError(f"dataset {name!r} split {split!r} holds no text in field {text_field!r}")
    return docs


def load_corpus(data) -> list[str]:
    """The documents a ``DataConfig`` names (a path, a Hugging Face dataset or the embedded corpus)."""
    if data.hf_dataset:
        return load_hf_documents(data.hf_dataset, config=data.hf_config, split=data.hf_split,
                                 text_field=data.text_field)
    return load_documents(data.path, text_field=data.text_field)


def _read(p: Path) -> str:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        log.warning("%s is not valid UTF-8 (%s at byte %d); decoded with replacement characters", p, e.reason,
                    e.start)
        return raw.decode("utf-8", errors="replace")
    if "\x00" in text[:8192]:
        log.warning("%s looks like a binary file (it holds NUL bytes); read as text anyway", p)
    return text


def iter_jsonl(p: Path):
    """(line number, object) for every non-blank line of a .jsonl file; a bad line names itself."""
    for n, line in enumerate(_read(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{p}:{n} is not valid JSON: {getattr(e, 'msg', 'nested too deeply')}") from None


def _read_jsonl(p: Path, field: str) -> list[str]:
    docs = []
    for n, row in iter_jsonl(p):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{p}:{n} has no text field {field!r} (set data.text_field)")
        docs.append(row[field])
    return docs


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
