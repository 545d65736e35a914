"""Speed and memory against context length for each memory kind: which grow
linearly and which quadratically.

A context of L tokens is read once, in evaluation mode, batch 1:
- none: one window of L tokens (full causal attention: compute grows as L^2);
- xl, knn, tokens, local_global, lstm: segments of 128 tokens with the memory carried
  (compute grows as L; the kNN store grows as L up to its capacity; local_global, Longformer's sliding
  window + global positions, attends to the 128 tokens before each token and the stream's first 64).
Each (kind, L) runs in its own process (``python benchmarks/profiles.py --child
KIND L REPEATS``) so its peak resident memory (``ru_maxrss``) is its own; the table
gives the growth of the peak over the process's resident memory just before
reading. The growth exponent is the slope of log(time) and log(memory) against
log(L) over the two longest contexts. ``--kinds none,local_global`` measures some kinds only;
``--repeats N`` reads each context N times in its process and keeps the fastest read (on a loaded
machine the single read of the default is noisy).
"""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

WIDTH = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4)
SEGMENT = 128
FULL, QUICK = (1024, 2048, 4096, 8192, 16384), (512, 1024, 2048)


def kinds() -> list[str]:
    from longmem.config import BUILTIN_KINDS
    return list(BUILTIN_KINDS) + ["local_global", "lstm"]


def _model(kind: str, length: int):
    from longmem import MemoryConfig, ModelConfig
    from longmem.models import build_model
    if kind == "lstm":
        cfg = ModelConfig(arch="lstm", vocab_size=256, d_model=128, n_layers=2, segment_len=SEGMENT)
    elif kind == "none":
        cfg = ModelConfig(**WIDTH, segment_len=length)
    else:
        mem = dict(kind=kind, mem_len=SEGMENT)
        if kind == "knn":
            mem.update(knn=dict(capacity=max(length, 1024), k=32))
        if kind == "local_global":                               # as benchmarks/rmt_probes.py trains it
            mem.update(mem_len=0, local_global=dict(window=SEGMENT, n_global=64))
        cfg = ModelConfig(**WIDTH, segment_len=SEGMENT, memory=MemoryConfig(**mem))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


@torch.no_grad()
def child(kind: str, length: int, repeats: int = 1) -> dict:
    torch.set_num_threads(1)
    model = _model(kind, length)
    seg = model.config.segment_len
    warm = torch.randint(0, 256, (1, min(seg, 256)), generator=torch.Generator().manual_seed(1))
    model(warm)                                                   # allocator and kernels warmed up
    tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    before = _rss_mib()
    seconds = math.inf
    for _ in range(repeats):                                      # the fastest read: the least disturbed
        t0 = time.perf_counter()
        state = None
        for a in range(0, length, seg):                          # logits dropped segment by segment
            state = model(tokens[:, a:a + seg], state=state).state
        seconds = min(seconds, time.perf_counter() - t0)
    return {"kind": kind, "length": length, "seconds": seconds, "tokens_per_s": length / seconds,
            "peak_growth_mib": max(0.0, _peak_mib() - before)}


def _slope(rows: list[dict], key: str) -> float | None:
    a, b = rows[-2], rows[-1]
    if a[key] <= 0 or b[key] <= 0:
        return None
    return math.log(b[key] / a[key]) / math.log(b["length"] / a["length"])


def measure(*, quick: bool, only: list[str] | None = None, repeats: int = 1) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = []
    for kind in only or kinds():
        for length in (QUICK if quick else FULL):
            res = subprocess.run([sys.executable, __file__, "--child", kind, str(length), str(repeats)],
                                 capture_output=True, text=True, env=env, timeout=900)
            if res.returncode != 0:
                raise RuntimeError(f"profiles child {kind} {length} failed: {res.stderr[-2000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def _plot(rows: list[dict], path: Path) -> Path | None:
    from longmem.utils import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == kind]
        ax1.loglog([r["length"] for r in rs], [r["seconds"] for r in rs], "o-", label=kind)
        ax2.loglog([r["length"] for r in rs], [max(r["peak_growth_mib"], 0.1) for r in rs], "o-", label=kind)
    ax1.set_xlabel("context length (tokens)")
    ax1.set_ylabel("seconds to read the context")
    ax2.set_xlabel("context length (tokens)")
    ax2.set_ylabel("peak memory growth (MiB)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool, *, out_dir: Path, figures: Path | None = None, only: list[str] | None = None,
        repeats: int = 1) -> str:
    """The markdown section. The picture goes to ``figures`` (default: ``out_dir``, the folder of the page), linked relative to ``out_dir``."""
    rows = measure(quick=quick, only=only, repeats=repeats)
    plot = _plot(rows, (figures or out_dir) / "profiles.png")
    lengths = sorted({r["length"] for r in rows})
    lines = ["## Speed and memory against context length", "",
             f"Model: {WIDTH['n_layers']} layers, d_model {WIDTH['d_model']}, {WIDTH['n_heads']} heads "
             f"(LSTM: 2 layers, d 128); batch 1, evaluation, fp32, one CPU thread, a fresh process per cell. "
             f"none reads the context as one window (full attention); the others in segments of {SEGMENT} "
             f"with mem_len {SEGMENT} (knn: + a store of every past token, k 32; local_global: a window of "
             f"{SEGMENT} + the first 64 positions global). "
             + (f"Fastest of {repeats} reads per cell. " if repeats > 1 else "") + "Exponent: slope of "
             f"log(time) and log(peak growth) against log(length) over the two longest contexts "
             f"(1 = linear, 2 = quadratic).", "",
             "| kind | " + " | ".join(f"{n:,} tok/s" for n in lengths) + " | time exponent | "
             + " | ".join(f"{n:,} MiB" for n in lengths) + " | memory exponent |",
             "|---|" + "---:|" * (2 * len(lengths) + 2)]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["length"])
        t_exp, m_exp = _slope(rs, "seconds"), _slope(rs, "peak_growth_mib")
        lines.append(f"| {kind} | " + " | ".join(f"{r['tokens_per_s']:,.0f}" for r in rs)
                     + f" | {t_exp:.2f} | " + " | ".join(f"{r['peak_growth_mib']:,.1f}" for r in rs)
                     + f" | {'-' if m_exp is None else f'{m_exp:.2f}'} |")
    if plot:
        lines += ["", f"![speed and memory against context length]({plot.relative_to(out_dir)})"]
    return "\n".join(lines + [""])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        here = Path(__file__).resolve().parent                  # the section of BENCHMARKS.md, beside benchmarks/
        only = sys.argv[sys.argv.index("--kinds") + 1].split(",") if "--kinds" in sys.argv else None
        unknown = sorted(set(only or []) - set(kinds()))
        if unknown:
            raise SystemExit(f"unknown kinds {unknown}; accepted: {', '.join(kinds())}")
        figures = here if only is None else here.parent / "runs" / "bench"    # a subset keeps the page's picture
        figures.mkdir(parents=True, exist_ok=True)
        repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 1
        print(run(quick="--quick" in sys.argv, out_dir=here.parent, figures=figures, only=only, repeats=repeats))
