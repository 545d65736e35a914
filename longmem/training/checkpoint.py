"""Weights files: a model's state dict as a longmem tensor file (``longmem.io``), tied
tensors stored once; loading names every tensor that does not fit the model."""
from __future__ import annotations

from pathlib import Path

import torch

from longmem.io import atomic_write_bytes, read_tensor_file, tensor_file_bytes

WEIGHTS_FORMAT, WEIGHTS_VERSION = "longmem-weights", "1"


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


def weights_bytes(module: torch.nn.Module, *, info: dict | None = None) -> bytes:
    """The bytes of a weights file (``info``: e.g. the training step), for :func:`save_weights` and checkpoints."""
    return tensor_file_bytes(_unique_tensors(module), format=WEIGHTS_FORMAT, version=WEIGHTS_VERSION, info=info)


def save_weights(module: torch.nn.Module, path: str | Path, *, info: dict | None = None) -> None:
    atomic_write_bytes(path, weights_bytes(module, info=info))


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load weights saved by :func:`save_weights`, naming any mismatch of names or shapes."""
    tensors, _ = read_tensor_file(path, format=WEIGHTS_FORMAT, versions=(WEIGHTS_VERSION,), what="weights file")
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
