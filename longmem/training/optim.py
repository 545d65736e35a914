"""The optimizer and the learning-rate schedule of the trainer.

AdamW with weight decay on matrices only (Loshchilov & Hutter 2019), or plain SGD as End-To-End
Memory Networks train (Sukhbaatar et al. 2015 §4.2); linear warm-up then cosine decay, or halving steps.
"""
from __future__ import annotations

import math

import torch

from longmem.models.memory import Memory


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int, halve_every: int = 0) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``, or
    with ``halve_every`` > 0 a step schedule: ``lr`` halved every ``halve_every`` steps after the warm-up."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if halve_every:
        return lr * 0.5 ** ((step - warmup) // halve_every)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, the (tied) embedding or what a memory asks to be
    spared (``Memory.no_weight_decay``, e.g. the initial memory tokens)."""
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    embed |= {id(p) for m in model.modules() if isinstance(m, Memory) for p in m.no_weight_decay()}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, t, *, fused: bool = False) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW with decay on matrices only, or plain SGD (no momentum, no decay)."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr)
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=t.lr, alpha=0.95, momentum=0.9, eps=1e-6)
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
