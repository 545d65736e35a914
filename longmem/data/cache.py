"""Tokenize a corpus once into a memory-mapped token file.

Tokens of all documents are concatenated into one ``.npy`` array (uint16 when the
vocabulary fits, else int32) with an offsets array beside it; later runs map the
file instead of tokenizing again and holding Python lists. The cache sits beside
the data (``.longmem-cache/``) or, where that folder is not writable, under
``$LONGMEM_CACHE`` (default ``~/.cache/longmem``). The key hashes the tokenizer
and the text, so an edited corpus or another tokenizer never reads stale tokens.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from longmem.data.tokenizer import start_ids

from longmem.io import atomic_write_bytes


def cache_dir_for(data_path: str | Path) -> Path:
    p = Path(data_path).resolve()
    beside = (p if p.is_dir() else p.parent) / ".longmem-cache"
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return beside
    except OSError:
        fallback = Path(os.environ.get("LONGMEM_CACHE", Path.home() / ".cache" / "longmem"))
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _key(texts: list[str], tokenizer) -> str:
    h = hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha1(t.encode("utf-8", errors="surrogatepass")).digest())
    return h.hexdigest()[:24]


def _encode_all(texts: list[str], tokenizer) -> list[np.ndarray]:
    """Each text's token ids, as a document (a pretrained model's BOS token in front if it expects one)."""
    if tokenizer.kind == "byte":                       # no Python list of ints for bytes
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
    return [np.asarray(start_ids(tokenizer, tokenizer.encode(t)), dtype=np.int64) for t in texts]


def encode_texts(texts: list[str], tokenizer, *, cache_dir: Path | None = None) -> list[np.ndarray]:
    """Token arrays of ``texts`` (views into a memory-mapped file when ``cache_dir`` is given)."""
    if cache_dir is None:
        return _encode_all(texts, tokenizer)
    key = _key(texts, tokenizer)
    tok_path, off_path = cache_dir / f"tokens-{key}.npy", cache_dir / f"offsets-{key}.npy"
    if not (tok_path.is_file() and off_path.is_file()):
        arrays = _encode_all(texts, tokenizer)
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        flat = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
        offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
        for path, arr in ((tok_path, flat), (off_path, offsets)):   # offsets last: it marks completeness
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            atomic_write_bytes(path, buf.getvalue())
    tokens = np.load(tok_path, mmap_mode="r", allow_pickle=False)
    offsets = np.load(off_path, allow_pickle=False)
    return [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
