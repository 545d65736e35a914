"""A run directory (``config.yaml``, ``model.safetensors``, ``tokenizer.json``) and loading it back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longmem.config import RunConfig
from longmem.data.tokenizer import Tokenizer, load_tokenizer
from longmem.models import MemoryLM, build_model
from longmem.training.checkpoint import load_weights

CONFIG, WEIGHTS, TOKENIZER, METRICS = "config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"
# model settings that evaluation may change; everything else is fixed by the weights
# settings that size, search or threshold the memory, not its weights: a run may be evaluated with other
# values (e.g. a kNN store larger than in training, as Wu et al. 2022 evaluate)
EVAL_MODEL_KEYS = ("memory.mem_len", "memory.knn_capacity", "memory.knn_k", "memory.knn_backend",
                   "memory.knn_index", "memory.knn_chunk", "memory.token_gate_floor")


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
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model expects "
                         f"{config.model.vocab_size}")
    if overrides:
        trained = config.to_dict()
        config = config.override(overrides)
        now = config.to_dict()
        changed = [f"{s}.{k}" for s in ("model", "memory") for k in now[s]
                   if now[s][k] != trained[s][k] and f"{s}.{k}" not in EVAL_MODEL_KEYS]
        if changed:
            raise ValueError(f"{', '.join(changed)} cannot change after training (only "
                             f"{', '.join(EVAL_MODEL_KEYS)} and data.* can); train a new run instead")
    model = build_model(config.model)
    load_weights(model, path / WEIGHTS)
    model.eval()
    return Run(config=config, model=model, tokenizer=tokenizer, path=path)
