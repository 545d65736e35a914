"""A run directory (``config.yaml``, ``model.safetensors``, ``tokenizer.json``) and loading it back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longmem.config import RunConfig, flatten
from longmem.data.tokenizer import Tokenizer, load_tokenizer
from longmem.models import MemoryLM, build_model
from longmem.models.memory.base import TRAINING_FREE
from longmem.training.checkpoint import load_weights

CONFIG, WEIGHTS, TOKENIZER, METRICS = "config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"
# model settings that evaluation may change; everything else is fixed by the weights
# settings that size, search or threshold the memory, not its weights: a run may be evaluated with other
# values (e.g. a kNN store larger than in training, as Wu et al. 2022 evaluate)
EVAL_MODEL_KEYS = ("memory.mem_len", "memory.knn.capacity", "memory.knn.k", "memory.knn.backend",
                   "memory.knn.index", "memory.knn.chunk", "memory.tokens.floor")


@dataclass
class Run:
    config: RunConfig
    model: MemoryLM                 # or LSTMLM / Seq2Seq / MemN2N (model.arch)
    tokenizer: Tokenizer
    path: Path


# model settings added after runs were written with their old behaviour: (arch, key) -> the value those runs
# were trained with. A run's config.yaml without the key gets that value, not today's default.
LEGACY_MODEL = {("memn2n", "pe_formula"): "paper", ("memn2n", "attend_empty"): False}


def load_run_config(run: str | Path) -> RunConfig:
    """The config of the run directory ``run``, settings its file lacks set as the run was trained (LEGACY_MODEL);
    a config given to ``train --config`` is read with ``RunConfig.load`` instead, today's defaults filling gaps."""
    d = RunConfig.read(Path(run) / CONFIG)
    model = d.get("model")
    if isinstance(model, dict):
        for (arch, key), value in LEGACY_MODEL.items():
            if model.get("arch") == arch:
                model.setdefault(key, value)
    return RunConfig.from_dict(d)


def eval_config(config: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """The run's config with evaluation-time overrides: the settings of ``EVAL_MODEL_KEYS``, ``data.*``, and a
    training-free memory kind (``--memory.kind sinks --memory.mem_len 1024``: it adds no weights); anything
    else would not fit the trained weights and is refused."""
    trained = flatten(config.to_dict())
    config = config.override(overrides)
    now = flatten(config.to_dict())
    allowed = set(EVAL_MODEL_KEYS)
    if now["memory.kind"] in TRAINING_FREE:                   # it adds no weights: any of its settings may change
        allowed |= {k for k in now if k.startswith("memory.")}
    changed = [k for k in now if k.split(".")[0] in ("model", "memory") and now[k] != trained.get(k)
               and k not in allowed]
    if changed:
        raise ValueError(f"{', '.join(changed)} cannot change after training (only {', '.join(sorted(allowed))}, "
                         f"data.*, and memory.kind to a kind that needs no training: "
                         f"{', '.join(sorted(TRAINING_FREE))}); train a new run instead")
    return config


def load_run(path: str | Path, *, overrides: dict[str, str] | None = None) -> Run:
    """Rebuild the model of a run from its files; ``overrides`` (dotted keys) may change
    evaluation settings such as ``memory.mem_len``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a finished run: {name} is missing")
    config = load_run_config(path)
    tokenizer = load_tokenizer(path / TOKENIZER)
    if tokenizer.vocab_size > config.model.vocab_size or (tokenizer.vocab_size != config.model.vocab_size
                                                          and tokenizer.kind != "pretrained"):
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                         f"{config.model.vocab_size}")
    if overrides:
        config = eval_config(config, overrides)
    model = build_model(config.model)
    load_weights(model, path / WEIGHTS)
    model.eval()
    return Run(config=config, model=model, tokenizer=tokenizer, path=path)
