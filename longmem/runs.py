"""A run directory (``config.yaml``, ``model.safetensors``, ``tokenizer.json``) and loading it back."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from longmem.config import SECTIONS, RunConfig, flatten, valid_keys
from longmem.data.tokenizer import Tokenizer, load_tokenizer
from longmem.models import MemoryLM, build_model
from longmem.models.memory.base import TRAINING_FREE
from longmem.training.checkpoint import load_weights
from longmem.utils import check_model_fits

CONFIG, WEIGHTS, TOKENIZER, METRICS = "config.yaml", "model.safetensors", "tokenizer.json", "metrics.jsonl"
TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"     # what train.loggers tensorboard and wandb write
# grouped distant positions (Self-Extend): how a trained model reads a longer memory, no weights of their own
POSITION_KEYS = ("model.position_range", "model.position_window")
# how a trained model reads a stream, no weights of their own: the segment length (with no memory a model attends
# within its segment; a model trained on whole examples in one segment reads a longer stream through a memory in
# shorter segments, e.g. kind retrieval with model.segment_len 128)
READ_KEYS = ("model.segment_len", *POSITION_KEYS)
# model settings that evaluation may change; everything else is fixed by the weights
# settings that size, search or threshold the memory, not its weights: a run may be evaluated with other
# values (e.g. a kNN store larger than in training, as Wu et al. 2022 evaluate)
EVAL_MODEL_KEYS = ("memory.mem_len", "memory.knn.capacity", "memory.knn.k", "memory.knn.backend",
                   "memory.knn.index", "memory.knn.chunk", "memory.knn.nprobe", "memory.knn.ef_search",
                   "memory.tokens.floor", *READ_KEYS)
# every memory setting: a kind that needs no training (none, xl, sinks, retrieval) may replace the trained one at
# evaluation, with any settings (eval_config refuses what would not fit the weights)
MEMORY_KEYS = tuple(k for k in valid_keys() if k.startswith("memory."))
# the config keys a command reading a finished run honours (the CLI refuses the others): the memory settings and
# torch's CPU threads; eval also the text and examples it scores, rebuilt from data.* and task.*
# (the run's tokenizer.json fixes data.tokenizer and data.vocab_size)
RUN_KEYS = (*MEMORY_KEYS, *READ_KEYS, "train.threads")
EVAL_KEYS = (*RUN_KEYS, "data.path", "data.text_field", "data.hf_dataset", "data.hf_config", "data.hf_split",
             "data.cache", "data.val_fraction", "data.batch_size", "data.seed", "task.babi_tasks", "task.n_train",
             "task.n_test", "task.source_len", "task.min_source_len", "task.n_pairs", "task.distractor")


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


# what `longmem import` may set: how the imported model reads (its sizes come from the checkpoint)
IMPORT_KEYS = ("model.segment_len", "model.dropout", *MEMORY_KEYS,
               *(k for k in valid_keys() if k.split(".")[0] in ("data", "train")))


def eval_config(config: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """The run's config with evaluation-time overrides: the settings of ``EVAL_MODEL_KEYS``, ``data.*``, and a
    training-free memory kind (``--memory.kind sinks --memory.mem_len 1024``: it adds no weights); anything
    else would not fit the trained weights and is refused."""
    trained = flatten(config.to_dict())
    if overrides.get("memory.kind") == "none":              # no memory: the run's memory length and sinks go too
        overrides = {"memory.mem_len": "0", "memory.n_sinks": "0", **overrides}
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
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a run directory (the folder `longmem train --out` writes, "
                         f"holding {CONFIG}, {WEIGHTS} and {TOKENIZER})")
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
    check_model_fits(config.model, device="cpu", training=False)
    model = build_model(config.model)
    load_weights(model, path / WEIGHTS)
    model.eval()
    return Run(config=config, model=model, tokenizer=tokenizer, path=path)


# what a run directory holds: the run's files, its checkpoints, and what eval and chat write into it by default
RUN_ENTRIES = {CONFIG, WEIGHTS, TOKENIZER, METRICS, "trainer_state.safetensors", "trainer_state.json", "report.md",
               "loss.png", "checkpoints", "eval", "sessions", TENSORBOARD_DIR, WANDB_DIR}


def prepare_run_dir(path: str | Path, *, overwrite: bool = False) -> None:
    """Make ``path`` ready for a new run. A directory that already holds files is refused (a second run would be
    mixed into the first: checkpoints, metrics.jsonl); with ``overwrite`` its files are deleted, but only when it
    is a longmem run directory (a run config.yaml and nothing but run files) and not the root, the home or the
    current directory (or one holding it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; --out takes a directory (new or empty) for the run")
    if not path.exists() or not any(path.iterdir()):
        return
    names = sorted(p.name for p in path.iterdir())
    foreign = [n for n in names if n not in RUN_ENTRIES and not (n.startswith(".") and n.endswith(".tmp"))]
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    is_run = not foreign and _is_run_config(path / CONFIG)
    if not overwrite:
        if is_run:
            raise ValueError(f"{path} already holds a run ({shown}); continue it with `longmem train --resume "
                             f"{path}`, write the new run to another --out, or pass --overwrite to delete the old "
                             f"run first")
        raise ValueError(f"{path} is not empty ({shown}); give --out a new or empty directory")
    here = Path.cwd().resolve()
    real = path.resolve()
    if real in (Path(real.anchor), Path.home().resolve(), here) or real in here.parents:
        raise ValueError(f"--overwrite never clears {path}: it is the root, the home or the current directory, or "
                         f"holds it; give --out the run directory itself")
    if not is_run:
        raise ValueError(f"--overwrite deletes only a longmem run directory; {path} "
                         + (f"also holds {', '.join(foreign[:6])}" if foreign else f"has no run {CONFIG}")
                         + "; delete it yourself or give --out another directory")
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a run's config.yaml: a YAML mapping of config sections."""
    try:
        return path.is_file() and set(RunConfig.read(path)) <= set(SECTIONS)
    except (ValueError, OSError):
        return False
