"""Small helpers shared across the package."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def install_hint(extra: str) -> str:
    """How to install an optional extra: from the checkout (the name longmem on PyPI is another project)."""
    return f"pip install -e '.[{extra}]' in the longmem checkout"


def progress(*, total: int | None, desc: str, enabled: bool = True, unit: str = "it") -> tqdm:
    """A progress bar on stderr (hidden when ``enabled`` is false)."""
    # redraw often on a terminal, rarely in a log file (CI, pipes)
    interval = 0.1 if sys.stderr.isatty() else 15.0
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, unit=unit, dynamic_ncols=True,
                leave=True, mininterval=interval, maxinterval=max(10.0, interval))


def available_memory_bytes(device) -> int | None:
    """Free memory on ``device`` (MemAvailable on the host for CPU); None if unknown."""
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_need_bytes(model_config, *, batch_size: int, training: bool) -> int:
    """A rough fp32 estimate of what the memory configuration needs: the memories' states (``Memory.nbytes``),
    and the scores and activations of one segment over its window (positions memories add included)."""
    from longmem.models.memory import build_memories
    c = model_config
    memories = build_memories(c)                                    # a baseline's config: kind none, no memory
    n_layers, segment_len = getattr(c, "n_layers", 1), getattr(c, "segment_len", 0)
    state = sum(m.nbytes(batch_size=batch_size, d_model=c.d_model, n_layers=n_layers) for m in memories)
    window = c.memory.mem_len + c.memory.n_sinks + segment_len + sum(m.added_positions for m in memories)
    scores = batch_size * getattr(c, "n_heads", 0) * segment_len * window * 4 * (n_layers if training else 1)
    acts = batch_size * window * c.d_model * 4 * 8 * (n_layers if training else 1)
    return state + scores + acts


def parameter_count(model_config) -> int | None:
    """Parameters of the model ``model_config`` describes, built on the meta device (nothing allocated);
    None when it cannot be built there."""
    import torch
    from longmem.models import build_model
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build_model(model_config).parameters())
    except Exception:                                    # a module that needs real tensors to build: no estimate
        return None


def check_model_fits(model_config, *, device, training: bool) -> None:
    """Refuse a model whose weights (in training with their gradients and AdamW moments) cannot fit in memory,
    before allocating them."""
    c = model_config
    free = available_memory_bytes(device)
    params = parameter_count(c) or 0
    weights = params * 4 * (4 if training else 1)        # fp32
    if free is not None and weights > 0.9 * free:
        raise ValueError(
            f"this model does not fit: {params:,} parameters (model.vocab_size {c.vocab_size}, model.d_model "
            f"{c.d_model}, model.d_ff {c.d_ff}, model.n_layers {c.n_layers}) need about {weights / 2**30:.1f} GiB"
            f"{' with their gradients and optimizer state' if training else ''}, but only {free / 2**30:.1f} GiB "
            f"is free on {device}. Make the model smaller.")


def check_memory_fits(model_config, *, batch_size: int, device, training: bool) -> None:
    """Refuse a model (``check_model_fits``) or a memory configuration whose state cannot fit in memory, before
    allocating them."""
    check_model_fits(model_config, device=device, training=training)
    c, m = model_config, model_config.memory
    free = available_memory_bytes(device)
    need = memory_need_bytes(c, batch_size=batch_size, training=training)
    if free is not None and need > 0.9 * free:
        what = (f"memory.knn.capacity={m.knn.capacity} and memory.mem_len={m.mem_len}" if m.kind == "knn"
                else f"memory.mem_len={m.mem_len}")
        lower = "memory.knn.capacity, memory.mem_len" if m.kind == "knn" else "memory.mem_len"
        raise ValueError(
            f"this memory does not fit: {what} with {batch_size} lanes, "
            f"{c.n_layers} layers and d_model {c.d_model} needs about {need / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB is free on {device}. Lower {lower} or data.batch_size.")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib (extra ``plot``) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
