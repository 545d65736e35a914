"""A run directory (``config.yaml``, ``model.safetensors``, ``tokenizer.json``) and loading it back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longmem.config import RunConfig
from longmem.data.tokenizer import Tokenizer, load_tokenizer
from longmem.models import MemoryLM
from longmem.training.checkpoint import load_weights

CONFIG, WEIGHTS, TOKENIZER, METRICS = "config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"


@dataclass
class Run:
    config: RunConfig
    model: MemoryLM
    tokenizer: Tokenizer
    path: Path


def load_run(path: str | Path, *, overrides: dict[str, str] | None = None) -> Run:
    """Rebuild the model of a run from its files; ``overrides`` (dotted keys) may change
    evaluation settings such as ``memory.mem_len``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a finished run: {name} is missing")
    config = RunConfig.load(path / CONFIG)
    tokenizer = load_tokenizer(path / TOKENIZER)
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                         f"{config.model.vocab_size}")
    model = MemoryLM(config.model)
    load_weights(model, path / WEIGHTS)
    if overrides:
        config = config.override(overrides)
        mem_len = config.model.memory.mem_len
        if config.model.memory.kind != model.config.memory.kind:
            raise ValueError("memory.kind cannot change after training; train a new run instead")
        if model.xl is not None:
            model.set_mem_len(mem_len)
    model.eval()
    return Run(config=config, model=model, tokenizer=tokenizer, path=path)
