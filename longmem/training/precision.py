"""Device and precision: one helper resolves ``auto|fp32|bf16|fp16`` and checks the hardware."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA GPU is available; use train.device=cpu or auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` on ``device`` (None: plain fp32)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("train.precision=bf16 but this GPU does not support bfloat16; use fp16 or fp32")
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    raise ValueError(f"unknown precision {name!r}; accepted: auto, fp32, bf16, fp16")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast for the training loop only (modules never autocast themselves)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
