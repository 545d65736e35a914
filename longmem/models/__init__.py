"""The memory Transformer (``MemoryLM``), its memories, and the registry of architectures: ``build_model`` builds
the model a config names (``model.arch``); the classic baselines (``longmem.classic``) register themselves."""
from typing import Any, Callable

import torch.nn as nn

from longmem.config import ARCH_CONFIGS
from longmem.models.transformer import IGNORE_INDEX, LMOutput, MemoryLM

ARCHITECTURES: dict[str, Callable] = {"transformer": MemoryLM}


def register_arch(name: str, config_class: type, build: Callable) -> None:
    """Make ``model.arch: name`` read its settings into ``config_class`` and build ``build(config)``."""
    ARCH_CONFIGS[name] = config_class
    ARCHITECTURES[name] = build


def build_model(config: Any) -> nn.Module:
    """The model of a model config (``config.arch``): every place that builds a model from a config uses this.
    ``transformer`` gives a :class:`MemoryLM`; every one keeps its contract (``forward(tokens, state, targets,
    reset) -> LMOutput``, or ``QAOutput`` for memn2n)."""
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={config.arch!r}; accepted: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[config.arch](config)


__all__ = ["ARCHITECTURES", "IGNORE_INDEX", "LMOutput", "MemoryLM", "build_model", "register_arch"]
