"""Save one lane's kNN memory to disk and load it into any lane of any state.

This is how a user reads a long document once and asks about it later: the file
is safetensors (one tensor per retrieving layer for keys and one for values, the
entries oldest first) with JSON metadata in its header: format name and version,
dimensions, and a fingerprint of the model weights. Keys and values only mean
something to the weights that produced them, so a memory from another model is
refused, and so is a damaged file (a header field missing or of the wrong type,
tensors missing, extra, of another dtype or shape, or holding NaN/inf): always
with a ValueError naming the file and what is wrong.
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
_FIELDS = {"layers": list, "n_heads": int, "head_dim": int, "normalize": bool, "weights_fingerprint": str,
           "entries": int, "written": int}                # header fields and their JSON types


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


def _read(path: Path, *, tensors: bool) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The raw ``longmem`` metadata and (if asked) every tensor of a safetensors file."""
    if not path.is_file():
        raise FileNotFoundError(f"kNN memory file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("longmem")
            return raw, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:                       # whatever the reader raises on a torn or foreign file
        raise ValueError(f"{path} is not a readable safetensors kNN memory file ({e})") from None


def read_knn_metadata(path: str | Path) -> dict:
    """The checked header of a kNN memory file (ValueError if it is not one, or is damaged)."""
    path = Path(path)
    raw, _ = _read(path, tensors=False)
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        raise ValueError(f"{path} is damaged: its 'longmem' metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is damaged: its 'longmem' metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a longmem kNN memory (format {meta.get('format')!r}, want {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} has kNN memory format version {meta.get('version')}; this longmem reads {VERSION}")
    wrong = [f"{k}={meta.get(k)!r} (want {t.__name__})" for k, t in _FIELDS.items() if type(meta.get(k)) is not t]
    if not wrong and any(type(i) is not int for i in meta["layers"]):
        wrong.append(f"layers={meta['layers']!r} (want a list of block numbers)")
    if not wrong and not 0 <= meta["entries"] <= meta["written"]:
        wrong.append(f"entries={meta['entries']}, written={meta['written']} (want 0 <= entries <= written)")
    if wrong:
        raise ValueError(f"{path} is damaged: header field(s) {', '.join(wrong)}")
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
    _, tensors = _read(Path(path), tensors=True)
    names = [f"{part}.{j}" for part in ("keys", "values") for j in range(len(knn.keys))]
    missing, extra = [k for k in names if k not in tensors], sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"{path} is damaged: tensors missing {missing}, unexpected {extra[:5]}")
    _, H, _, Dh = knn.keys[0].shape
    want, dtype = (H, meta["entries"], Dh), knn.keys[0].dtype
    for name in names:
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != want:
            raise ValueError(f"{path} is damaged: {name} is {t.dtype} of shape {tuple(t.shape)}, want {dtype} of "
                             f"shape {want} (heads, entries, head_dim)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path} is damaged: {name} holds NaN or inf")
    saved_k = [tensors[f"keys.{j}"] for j in range(len(knn.keys))]
    saved_v = [tensors[f"values.{j}"] for j in range(len(knn.keys))]
    C = knn.capacity
    n = min(meta["entries"], C)
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
