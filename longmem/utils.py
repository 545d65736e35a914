"""Small helpers shared across the package."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


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


def check_memory_fits(model_config, *, batch_size: int, device, training: bool) -> None:
    """Refuse a memory configuration whose state alone cannot fit in memory, before allocating it."""
    c = model_config
    window = c.memory.mem_len + c.segment_len
    state = batch_size * c.memory.mem_len * c.d_model * c.n_layers * 4                # XL states, fp32
    scores = batch_size * c.n_heads * c.segment_len * window * 4 * (c.n_layers if training else 1)
    acts = batch_size * window * c.d_model * 4 * 8 * (c.n_layers if training else 1)
    need = state + scores + acts
    free = available_memory_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ValueError(
            f"this memory does not fit: memory.mem_len={c.memory.mem_len} with {batch_size} lanes, "
            f"{c.n_layers} layers and d_model {c.d_model} needs about {need / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB is free on {device}. Lower memory.mem_len or data.batch_size.")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib (extra ``plot``) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
