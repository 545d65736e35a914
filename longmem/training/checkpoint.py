"""Files of a run: atomic writes, weights in safetensors, loading that refuses
anything that is not what it claims to be."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

WEIGHTS_FORMAT = "longmem-weights"
_UMASK = os.umask(0)
os.umask(_UMASK)


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


def _unique_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters stored once (the first name wins)."""
    out, seen = {}, set()
    for name, t in module.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def save_weights(module: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    meta = {"format": WEIGHTS_FORMAT, "version": "1", **(metadata or {})}
    atomic_write_bytes(path, st_save(_unique_tensors(module), metadata=meta))


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


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load weights saved by :func:`save_weights`, naming any mismatch of names or shapes."""
    tensors, meta = read_safetensors(path, what="weights file")
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not longmem weights (format={meta.get('format')!r})")
    expected = module.state_dict()
    stored_names = set(_unique_tensors(module))
    missing = sorted(stored_names - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shape_diff = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(tensors) & set(expected)) if tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shape_diff:
        problems.append("shape mismatch " + "; ".join(shape_diff[:5]))
    if problems:
        raise ValueError(f"{path} does not fit this model: " + ", ".join(problems))
    nonfinite = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        raise ValueError(f"{path}: tensor {nonfinite[0]!r} holds NaN or infinite values"
                         f"{f' (and {len(nonfinite) - 1} more tensors)' if len(nonfinite) > 1 else ''}; "
                         f"these weights cannot be used (a diverged or damaged run): load an earlier checkpoint")
    module.load_state_dict(tensors, strict=False)
