"""``longmem import`` and ``longmem export``: a pretrained checkpoint as an ordinary run directory, and a
run directory as a Hugging Face folder.

An imported run is a run like any other (``config.yaml``, ``model.safetensors``, ``tokenizer.json``),
so ``eval``, ``generate``, ``chat``, ``serve`` and ``train --train.init_from`` work on it unchanged. Its
tokenizer is the model's own, written as plain Hugging Face files (``tokenizer.json``,
``tokenizer_config.json`` with the chat template, ``generation_config.json``). Both directions write
into a temporary folder beside the target and rename it into place: a failure leaves nothing half
written.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save as st_save

from longmem.config import DataConfig, MemoryConfig, RunConfig
from longmem.data.tokenizer import HFTokenizer, PretrainedTokenizer, save_tokenizer
from longmem.models import MemoryLM
from longmem.pretrained.checkpoint import read_checkpoint
from longmem.pretrained.convert import (hf_config_from_model, hf_tensors_from_state_dict, model_config_from_hf,
                                        state_dict_from_hf)
from longmem.pretrained.hub import fetch_known, is_known
from longmem.runs import CONFIG, TOKENIZER, WEIGHTS, load_run
from longmem.io import atomic_write_bytes, atomic_write_text
from longmem.training.checkpoint import save_weights

log = logging.getLogger(__name__)

# an imported model reads segments of 512 tokens with a window of 1,536 cached keys/values and 4 attention
# sinks (StreamingLLM): 2,048 keys at most, however long the text; --model.segment_len and --memory.* change it
# (any memory.* setting replaces the default memory as a whole)
IMPORT_DEFAULTS = {"model.segment_len": "512", "memory.kind": "sinks", "memory.mem_len": "1536",
                   "memory.n_sinks": "4"}
SOURCE = "source.json"


@contextmanager
def _new_folder(out: Path, *, overwrite: bool):
    """A temporary folder beside ``out`` that becomes ``out`` when the block ends without an error."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"{out} already exists and is not empty; pass another --out, or --overwrite to "
                             f"replace it")
        if not out.is_dir() or not ((out / CONFIG).is_file() or (out / "config.json").is_file()):
            raise ValueError(f"{out} does not look like a run or model folder (no config.yaml / config.json); "
                             f"refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(src: str) -> Path:
    """A known model's name (fetched into the cache once), a Hugging Face folder or a .gguf file."""
    if is_known(src):
        return fetch_known(src)
    path = Path(src)
    if not path.exists():
        from longmem.pretrained.hub import KNOWN_MODELS
        raise FileNotFoundError(f"{src} is neither a file, a folder nor a known model ({', '.join(KNOWN_MODELS)})")
    return path


def import_pretrained(src: str, out: str | Path, *, overrides: dict[str, str] | None = None,
                      overwrite: bool = False) -> Path:
    """Write the run directory ``out`` for the checkpoint ``src`` (see :func:`resolve_source`).

    ``overrides``: dotted settings on top of :data:`IMPORT_DEFAULTS` (``model.segment_len``, ``memory.*``,
    ``data.*``, ``train.*``); the model's own sizes come from the checkpoint. A memory kind with weights of
    its own (knn, tokens) gets them freshly initialised: train it with ``longmem train --train.init_from``."""
    overrides = dict(overrides or {})
    fixed = [k for k in overrides if k.startswith("model.") and k not in ("model.segment_len", "model.dropout")]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} come from the checkpoint; at import only model.segment_len, "
                         f"model.dropout, memory.*, data.* and train.* can be set")
    path = resolve_source(src)
    ckpt = read_checkpoint(path)
    cfg = RunConfig(model=model_config_from_hf(ckpt.config, segment_len=512, memory=MemoryConfig()),
                    data=DataConfig(tokenizer="pretrained"))
    defaults = {k: v for k, v in IMPORT_DEFAULTS.items()                 # the memory as a whole, or none of it
                if not (k.startswith("memory.") and any(o.startswith("memory.") for o in overrides))}
    cfg = cfg.override({**defaults, **overrides})
    cfg.model.vocab_size = ckpt.config["vocab_size"]
    model = MemoryLM(cfg.model)
    missing, unexpected = model.load_state_dict(state_dict_from_hf(ckpt.tensors, cfg.model), strict=False)
    fresh = sorted({k.split(".")[0] for k in missing})
    if unexpected or any(not any(k.startswith(m.name + ".") for m in model.memories) for k in missing):
        raise ValueError(f"{path}: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    tokenizer = PretrainedTokenizer(ckpt.tokenizer, config=ckpt.tokenizer_config,
                                    generation_config=ckpt.generation_config)
    with _new_folder(Path(out), overwrite=overwrite) as tmp:
        cfg.save(tmp / CONFIG)
        save_weights(model, tmp / WEIGHTS)
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        atomic_write_text(tmp / SOURCE, json.dumps({"source": str(path), "model_type": ckpt.config["model_type"],
                                                    "config": ckpt.config}, indent=1, default=str))
    if fresh:
        log.warning("memory.kind %s adds weights (%s) that start untrained; fine-tune with: longmem train "
                    "--train.init_from %s --config ...", cfg.memory.kind, ", ".join(fresh), out)
    return Path(out)


def export_run(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder ``out`` for a run whose blocks have a Hugging Face equivalent
    (``convert.export_type``): ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
    tokenizer files, which ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load."""
    run = load_run(run_dir)
    config = run.config.model
    hf_config = hf_config_from_model(config)                  # ValueError: no equivalent, and why
    if not isinstance(run.tokenizer, HFTokenizer):
        raise ValueError(f"{run_dir} has a {run.tokenizer.kind} tokenizer, which has no Hugging Face file; export "
                         f"covers runs with a pretrained or bpe tokenizer")
    tensors = hf_tensors_from_state_dict(run.model.state_dict(), config)
    tok = run.tokenizer
    extra = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        if isinstance(tok.config.get(key), str) and tok.hf.token_to_id(tok.config[key]) is not None:
            extra[f"{key}_id"] = tok.hf.token_to_id(tok.config[key])
    with _new_folder(Path(out), overwrite=overwrite) as tmp:
        atomic_write_text(tmp / "config.json", json.dumps({**hf_config, **extra}, indent=1))
        atomic_write_bytes(tmp / "model.safetensors", st_save(tensors, metadata={"format": "pt"}))
        atomic_write_text(tmp / "tokenizer.json", tok.hf.to_str())
        tok_config = {k: v for k, v in tok.config.items() if k != "longmem_tokenizer"}
        tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tok_config, indent=1, ensure_ascii=False))
        generation = dict(tok.generation_config) or {k: v for k, v in extra.items() if k in ("bos_token_id",
                                                                                          "eos_token_id")}
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=1))
    return Path(out)
