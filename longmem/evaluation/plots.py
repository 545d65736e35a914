"""Pictures of evaluation results: the needle-in-a-haystack heatmap (accuracy by
length and depth, or by length and bAbI task) and perplexity against memory length."""
from __future__ import annotations

from pathlib import Path

from longmem.utils import pyplot


def _length_label(n: int) -> str:
    for unit, size in (("M", 1024 ** 2), ("K", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def plot_result(res: dict, path: str | Path) -> Path | None:
    """Write the picture of an ``eval`` result to ``path`` (PNG); None if there is nothing to draw
    (a single number) or matplotlib (extra ``plot``) is missing."""
    plt = pyplot()
    rows = res.get("results") or []
    if plt is None or len(rows) < 2:
        return None
    path = Path(path)
    if res["task"] == "ppl":
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["mem_len"] for r in rows], [r["ppl"] for r in rows], "o-")
        ax.axvline(res["segment_len"], color="gray", lw=0.5, ls=":", label="segment length")
        ax.set_xlabel("evaluation memory length (tokens)")
        ax.set_ylabel(f"{res['split']} perplexity")
        ax.legend()
    elif res["task"] == "babi":
        fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(rows)), 3.5))
        ax.bar([str(r["babi_task"]) for r in rows], [r["accuracy"] for r in rows])
        ax.set_xlabel("bAbI task")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
    else:
        inner = "depth" if res["task"] in ("passkey", "recall") else "babi_task"
        xs = sorted({r["length"] for r in rows})
        ys = sorted({r[inner] for r in rows})
        grid = [[float("nan")] * len(xs) for _ in ys]
        for r in rows:
            grid[ys.index(r[inner])][xs.index(r["length"])] = r["accuracy"]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(xs), 1.2 + 0.5 * len(ys)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(xs)), [_length_label(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth" if inner == "depth" else "bAbI task")
        fig.colorbar(im, ax=ax, label="accuracy")
    title = f"{res['task']}: {res.get('memory', '')} memory" + (f", mem_len {res['mem_len']}" if res.get("mem_len") else "")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
