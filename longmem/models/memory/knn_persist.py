"""Save one lane's kNN memory to disk and load it into any lane of any state.

This is how a user reads a long document once and asks about it later: the file
is safetensors (one tensor per retrieving layer for keys and one for values, the
entries oldest first) with JSON metadata in its header: format name and version,
dimensions, and a fingerprint of the model weights. Keys and values only mean
something to the weights that produced them, so a memory from another model is
refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longmem.models.memory.state import KNNState, State
from longmem.models.weights import weights_fingerprint

FORMAT = "longmem.knn_memory"
VERSION = 1


def _knn(model, state: State, lane: int) -> KNNState:
    if getattr(model, "knn", None) is None:
        raise ValueError("this model has no kNN memory (memory.kind must be 'knn')")
    if state.knn is None:
        raise ValueError("this state has no kNN part; make it with model.init_state(...) or a forward call")
    if not 0 <= lane < state.batch_size:
        raise ValueError(f"lane {lane} is out of range for a state of {state.batch_size} lanes")
    model.knn.check(state.knn)
    return state.knn


def _meta(model) -> dict:
    knn = model.knn
    return {"format": FORMAT, "version": VERSION, "layers": knn.layers, "n_heads": knn.n_kv_heads,
            "head_dim": knn.head_dim, "normalize": knn.normalize, "weights_fingerprint": weights_fingerprint(model)}


def save_knn_memory(model, state: State, *, lane: int, path: str | Path) -> Path:
    """Write lane ``lane``'s kNN entries (oldest first) to ``path`` (.safetensors), atomically."""
    knn = _knn(model, state, lane)
    C, written = knn.capacity, int(knn.written[lane])
    n = min(written, C)
    order = (torch.arange(n) + (written - n)) % C if C else torch.arange(0)   # ring slots, oldest first
    order = order.to(knn.written.device)
    tensors = {}
    for j, (k, v) in enumerate(zip(knn.keys, knn.values)):
        tensors[f"keys.{j}"] = k[lane].index_select(1, order).cpu().contiguous()     # (H, n, Dh)
        tensors[f"values.{j}"] = v[lane].index_select(1, order).cpu().contiguous()
    meta = {**_meta(model), "entries": n, "written": written}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"longmem": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_knn_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kNN memory file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("longmem")
    except Exception as e:                                                 # not safetensors at all
        raise ValueError(f"{path} is not a safetensors kNN memory file ({e})") from None
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a longmem kNN memory (format {meta.get('format')!r}, want {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} has kNN memory format version {meta.get('version')}; this longmem reads {VERSION}")
    return meta


def load_knn_memory(model, state: State, *, lane: int, path: str | Path) -> State:
    """A copy of ``state`` whose lane ``lane`` holds the saved entries (and nothing else) in its kNN part.

    Raises ValueError if the file was written by a model with other dimensions or other weights.
    If the file holds more entries than the capacity, the newest ones are kept.
    """
    knn = _knn(model, state, lane)
    meta = read_knn_metadata(path)
    mine = _meta(model)
    for key in ("layers", "n_heads", "head_dim", "normalize"):
        if meta.get(key) != mine[key]:
            raise ValueError(f"{path} was written by a model with {key}={meta.get(key)}, this model has "
                             f"{key}={mine[key]}; a kNN memory only fits the model that wrote it")
    if meta["weights_fingerprint"] != mine["weights_fingerprint"]:
        raise ValueError(f"{path} was written by another model (weights fingerprint "
                         f"{meta['weights_fingerprint']}, this model {mine['weights_fingerprint']}); "
                         f"its keys and values mean nothing to these weights")
    C = knn.capacity
    with safe_open(str(path), framework="pt") as f:
        saved_k = [f.get_tensor(f"keys.{j}") for j in range(len(knn.keys))]
        saved_v = [f.get_tensor(f"values.{j}") for j in range(len(knn.keys))]
    n = min(int(meta["entries"]), C)
    keys, values = [], []
    for old_k, old_v, k, v in zip(knn.keys, knn.values, saved_k, saved_v):
        new_k, new_v = old_k.clone(), old_v.clone()
        new_k[lane].zero_()
        new_v[lane].zero_()
        new_k[lane, :, :n] = k[:, k.shape[1] - n:].to(old_k)           # newest n, oldest first, slots 0..n-1
        new_v[lane, :, :n] = v[:, v.shape[1] - n:].to(old_v)
        keys.append(new_k)
        values.append(new_v)
    written = knn.written.clone()
    written[lane] = n
    return state.with_parts(knn=KNNState(keys=tuple(keys), values=tuple(values), written=written))
