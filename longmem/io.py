"""Files on disk: atomic writes, safetensors reading that never runs a pickle, and the one
tensor file format of longmem (weights, trainer state, chat sessions).

A tensor file is safetensors whose header metadata holds (all strings, as safetensors wants):

| key | what |
|---|---|
| ``format`` | what the file is: ``longmem-weights``, ``longmem-trainer-state``, ``longmem-session`` |
| ``version`` | the version of that format, checked on reading |
| ``fingerprint`` | optional: :func:`weights_fingerprint` of the model the tensors only make sense with |
| ``info`` | optional: a JSON object of whatever else the file says (a step, turn counts) |

This module imports nothing from longmem: it is the bottom layer, beside ``config.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_UMASK = os.umask(0)
os.umask(_UMASK)
_HEADER_KEYS = ("format", "version", "fingerprint", "info")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: a kill at
    any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_safetensors(path: str | Path, *, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else (a pickle, a torn
    file) is refused with a ValueError and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    bad = f"{path} is not a valid safetensors {what}"
    if len(data) < 8:
        raise ValueError(f"{bad} (only {len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or data[8:9] != b"{":
        hint = " (it looks like a pickle, which longmem never loads)" if data[:1] == b"\x80" or data[:2] == b"PK" else ""
        raise ValueError(f"{bad}{hint}")
    try:
        tensors = st_load(data)
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RecursionError) as e:
        raise ValueError(f"{bad}: {e}") from None
    return tensors, metadata


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every weight (first 16 hex digits)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tensor_file_bytes(tensors: dict[str, torch.Tensor], *, format: str, version: str,
                      fingerprint: str | None = None, info: dict | None = None) -> bytes:
    """The bytes of a tensor file (see the module docstring); tensors are stored from the CPU."""
    meta = {"format": format, "version": version}
    if fingerprint is not None:
        meta["fingerprint"] = fingerprint
    if info is not None:
        meta["info"] = json.dumps(info)
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)


def write_tensor_file(path: str | Path, tensors: dict[str, torch.Tensor], *, format: str, version: str,
                      fingerprint: str | None = None, info: dict | None = None) -> None:
    """Write a tensor file atomically."""
    atomic_write_bytes(path, tensor_file_bytes(tensors, format=format, version=version, fingerprint=fingerprint,
                                               info=info))


def read_tensor_file(path: str | Path, *, format: str, versions: tuple[str | None, ...], fingerprint: str | None = None,
                     what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a tensor file, after checking that it is one (not a pickle, not torn), that its
    ``format`` is ``format``, its ``version`` one of ``versions`` (None: a file without one) and, if
    ``fingerprint`` is given, that it was made with those weights; ValueError naming the file otherwise.
    Files from before this format kept their fields flat in the header: those come back as ``info``."""
    tensors, meta = read_safetensors(path, what=what)
    found = meta.get("format")
    if found != format:
        said = f"format {found!r}" if found else "no format"
        raise ValueError(f"{path} is not a longmem {what}: its header names {said}, a longmem {what} has format "
                         f"{format!r}; pass a {what} that longmem wrote")
    if meta.get("version") not in versions:
        readable = ", ".join(v for v in versions if v is not None)
        raise ValueError(f"{path} is a longmem {what} of version {meta.get('version')!r}, this longmem reads "
                         f"version {readable}; use the longmem version that wrote it")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} was made by another model (weights fingerprint {meta.get('fingerprint')}, this "
                         f"model {fingerprint}): a {what} only fits the weights that made it; use it with that "
                         f"model, or delete the file")
    if "info" not in meta:
        return tensors, {k: v for k, v in meta.items() if k not in _HEADER_KEYS}
    try:
        info = json.loads(meta["info"])
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise ValueError(f"{path} is a damaged {what}: its header's 'info' is not a JSON object; delete the file")
    return tensors, info
