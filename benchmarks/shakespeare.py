"""Tiny Shakespeare, character level, at nanoGPT's CPU configuration.

4 layers, 4 heads, 128 dims, segment 64, batch 12, 2000 steps, lr 1e-3 decaying,
dropout 0, first 90% train / last 10% validation. nanoGPT reports validation loss
1.88 there. We train without memory, then with XL memory 64/128/256 at the same
steps, and report validation loss (memory carried across validation segments)
and wall time. Run: ``python benchmarks/shakespeare.py --data ../shared/data/tinyshakespeare.txt``
or through ``longmem bench`` (which looks for the file in ../shared/data).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from longmem.config import RunConfig

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT = {"model.d_model": 128, "model.n_layers": 4, "model.n_heads": 4, "model.segment_len": 64,
           "model.dropout": 0.0, "data.tokenizer": "char", "data.batch_size": 12, "data.val_fraction": 0.1,
           "train.max_steps": 2000, "train.lr": 1e-3, "train.min_lr": 1e-4, "train.warmup_steps": 100,
           "train.weight_decay": 0.1, "train.beta2": 0.99, "train.eval_every": 0, "train.log_every": 100,
           "train.progress": False}


def run_one(data: Path, *, mem_len: int, steps: int, out: Path) -> dict:
    from longmem.training.trainer import train
    over = {**NANOGPT, "data.path": str(data), "train.max_steps": steps,
            "memory.kind": "xl" if mem_len else "none", "memory.mem_len": mem_len}
    cfg = RunConfig().override({k: v for k, v in over.items()})
    res = train(cfg, out / f"mem{mem_len}", desc=f"shakespeare mem {mem_len}")
    return {"mem_len": mem_len, "val_loss": res.val["loss"], "val_bpc": res.val["bpc"], "seconds": res.seconds,
            "steps": res.steps}


def table(rows: list[dict], *, steps: int) -> str:
    base = rows[0]["seconds"]
    lines = [f"| memory | val loss | val bpc | wall time (s) | time vs none |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        name = "none" if r["mem_len"] == 0 else f"xl, mem_len {r['mem_len']}"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_bpc']:.4f} | {r['seconds']:.0f} "
                     f"| {r['seconds'] / base:.2f}x |")
    return "\n".join(lines)


def run(quick: bool, *, data: Path = DEFAULT_DATA, mems=(0, 64, 128, 256)) -> str:
    if not data.is_file():
        return (f"## Tiny Shakespeare (character level)\n\nSkipped: {data} not found (pass --data).\n")
    steps = 100 if quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_one(data, mem_len=m, steps=steps, out=Path(tmp)) for m in (mems[:2] if quick else mems)]
    none = rows[0]["val_loss"]
    return "\n".join([
        "## Tiny Shakespeare, character level (nanoGPT CPU configuration)", "",
        f"4 layers, 4 heads, d_model 128, segment 64, batch 12, {steps} steps, lr 1e-3 cosine to 1e-4, "
        f"dropout 0, first 90% train / last 10% validation, validation read in ordered lanes with the memory "
        f"carried. nanoGPT reports validation loss 1.88 at 2000 steps.", "",
        table(rows, steps=steps), "",
        f"Target (no memory, 2000 steps): val loss <= 1.88 -> measured {none:.4f}"
        f"{'' if quick else (' (met)' if none <= 1.88 else ' (NOT met)')}.", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="tinyshakespeare.txt")
    p.add_argument("--quick", action="store_true", help="100 steps, none and mem 64 only")
    p.add_argument("--out", type=Path, default=None, help="also write the section to this markdown file")
    args = p.parse_args()
    text = run(args.quick, data=args.data)
    print(text)
    if args.out:
        args.out.write_text(f"Made by `python {' '.join(sys.argv)}`\n\n" + text)


if __name__ == "__main__":
    main()
