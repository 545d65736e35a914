"""Checkpoints for exact resume.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding ``model.safetensors``,
``trainer_state.safetensors`` (optimizer moments, RNG states, the lanes' memory)
and ``trainer_state.json`` (step, schedule position, data position of every lane,
Python/NumPy RNG, early-stopping counters). The folder is written under a
temporary name and renamed, so a kill at any moment leaves only complete
checkpoints. The newest one is also copied to the run directory's top level (the
files a user loads), and the best by validation loss to ``checkpoints/best``.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from longmem.io import atomic_write_bytes, atomic_write_text, read_tensor_file, tensor_file_bytes
from longmem.training.checkpoint import weights_bytes

STATE_FORMAT = "longmem-trainer-state"
STATE_VERSION = 1
TENSORS_VERSION = "1"                  # of trainer_state.safetensors; those written before longmem.io had none
CKPT_DIR = "checkpoints"
WEIGHTS, STATE_T, STATE_J = "model.safetensors", "trainer_state.safetensors", "trainer_state.json"


# -- RNG -----------------------------------------------------------------------
def capture_rng() -> dict:
    """This process's RNG states (torch CPU/CUDA, Python, NumPy)."""
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": _jsonable(random.getstate()),
           "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "rest": [np_state[0], *np_state[2:]]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_tupled(rng["python"]))
    name, pos, has_gauss, cached = rng["numpy"]["rest"]
    np.random.set_state((name, rng["numpy"]["keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


# -- memory state of lanes -----------------------------------------------------
def concat_lane_states(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join per-rank ``State.state_dict()``s along the lane dimension (rank order)."""
    if len(parts) == 1:
        return parts[0]
    out = {"batch_size": torch.tensor(sum(int(p["batch_size"]) for p in parts))}
    for key in parts[0]:
        if key != "batch_size":
            out[key] = torch.cat([p[key] for p in parts], dim=0)
    return out


def slice_lane_state(d: dict[str, torch.Tensor], lanes: range) -> dict[str, torch.Tensor]:
    total = int(d["batch_size"])
    if total == len(lanes):
        return d
    idx = torch.tensor(list(lanes))
    return {"batch_size": torch.tensor(len(lanes)),
            **{k: v.index_select(0, idx) for k, v in d.items() if k != "batch_size"}}


# -- saving / loading ----------------------------------------------------------
def save_checkpoint(out_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler_state: dict | None, info: dict, data: list[dict], memory: dict[str, torch.Tensor],
                    rng: list[dict], keep_last: int, best: bool) -> Path:
    """Write ``checkpoints/step-N`` atomically, refresh the top-level copies, prune old ones."""
    root = out_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    for r, rs in enumerate(rng):
        tensors[f"rng.{r}.torch"] = rs["torch"]
        tensors[f"rng.{r}.numpy"] = rs["numpy"]["keys"]
        if "cuda" in rs:
            tensors[f"rng.{r}.cuda"] = rs["cuda"]
    for k, v in memory.items():
        tensors[f"memory.{k}"] = v.detach().cpu().contiguous()
    if scaler_state:
        for k, v in scaler_state.items():
            if torch.is_tensor(v):
                tensors[f"scaler.{k}"] = v.detach().cpu().reshape(-1)
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, **info,
            "world_size": len(rng), "data": data,
            "optimizer": {"param_groups": opt["param_groups"]},
            "rng": [{"python": rs["python"], "numpy": rs["numpy"]["rest"]} for rs in rng],
            "scaler": {k: v for k, v in (scaler_state or {}).items() if not torch.is_tensor(v)}}
    files = {
        WEIGHTS: weights_bytes(model, info={"step": step}),
        STATE_T: tensor_file_bytes(tensors, format=STATE_FORMAT, version=TENSORS_VERSION, info={"step": step}),
        STATE_J: json.dumps(meta, indent=1).encode(),
    }
    final = root / f"step-{step:08d}"
    _write_folder(final, files)
    for name, data_ in files.items():                     # the run's top-level files = newest checkpoint
        atomic_write_bytes(out_dir / name, data_)
    if best:
        _write_folder(root / "best", files)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_folder(final: Path, files: dict[str, bytes]) -> None:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        atomic_write_bytes(tmp / name, data)
    if final.exists():
        trash = final.with_name(f".old-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete step checkpoint of a run (None if it has none)."""
    root = Path(out_dir) / CKPT_DIR
    for p in sorted(root.glob("step-*"), reverse=True):
        if p.is_dir() and all((p / f).is_file() for f in (WEIGHTS, STATE_T, STATE_J)):
            return p
    return None


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a checkpoint folder; refuses files that are not longmem trainer state."""
    try:
        meta = json.loads((path / STATE_J).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path / STATE_J} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path / STATE_J} is not a longmem trainer state")
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{path / STATE_J} has trainer-state version {meta.get('version')}, "
                         f"this longmem reads {STATE_VERSION}")
    tensors, info = read_tensor_file(path / STATE_T, format=STATE_FORMAT, versions=(TENSORS_VERSION, None),
                                     what="trainer state")
    if str(info.get("step")) != str(meta["step"]):
        raise ValueError(f"{path}: trainer_state.safetensors is for step {info.get('step')} but "
                         f"trainer_state.json for step {meta['step']}")
    return meta, tensors


def optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


def rng_states(meta: dict, tensors: dict[str, torch.Tensor]) -> list[dict]:
    out = []
    for r, rs in enumerate(meta["rng"]):
        d = {"torch": tensors[f"rng.{r}.torch"], "python": rs["python"],
             "numpy": {"keys": tensors[f"rng.{r}.numpy"], "rest": rs["numpy"]}}
        if f"rng.{r}.cuda" in tensors:
            d["cuda"] = tensors[f"rng.{r}.cuda"]
        out.append(d)
    return out


def memory_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("memory."):]: v for k, v in tensors.items() if k.startswith("memory.")}


def scaler_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict | None:
    d = dict(meta.get("scaler") or {})
    for k, v in tensors.items():
        if k.startswith("scaler."):
            d[k[len("scaler."):]] = v
    return d or None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, RecursionError, AttributeError):
            continue                                      # a line torn by a kill
    atomic_write_text(path, "".join(line + "\n" for line in keep))
