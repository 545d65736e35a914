"""``report.md`` of a run: loss curves, tokens/s, the resolved config and the final metrics."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from longmem.config import RunConfig
from longmem.runs import METRICS
from longmem.io import atomic_write_text
from longmem.utils import pyplot


def read_metrics(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):
                continue
    return out


def write_run_report(out_dir: Path, cfg: RunConfig) -> Path:
    rows = read_metrics(out_dir / METRICS)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    plot = _plot(out_dir / "loss.png", train, val)
    lines = ["# Run report", ""]
    if train:
        unit = "tokens" if "tokens_per_s" in train[0] else "examples"      # a language model's, or a task's
        tps = [r[f"{unit}_per_s"] for r in train[1:]] or [train[0][f"{unit}_per_s"]]
        lines += [f"- steps: {train[-1]['step']}, training {unit}: {train[-1][unit]:,}",
                  f"- train loss, the mean per target token of a logged window (as in the summary line): "
                  f"{train[0]['loss']:.4f} (steps 1-{train[0]['step']}) -> {train[-1]['loss']:.4f} (steps "
                  f"{train[-2]['step'] + 1 if len(train) > 1 else 1}-{train[-1]['step']})",
                  f"- {unit}/s: median {sorted(tps)[len(tps) // 2]:,.0f}"]
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        last = val[-1]
        extra = (f"bpc {last['val_bpc']:.4f}" if "val_bpc" in last
                 else f"mean error {last['val_mean_error']:.2f}%" if "val_mean_error" in last
                 else f"exact match {last['val_exact_match']:.3f}" if "val_exact_match" in last
                 else f"bit errors per sequence {last['val_bit_errors']:.3f}" if "val_bit_errors" in last
                 else f"answer accuracy {last.get('val_accuracy', float('nan')):.3f}")
        ppl = f", ppl {last['val_ppl']:.3f}" if "val_ppl" in last else ""      # bit-vector tasks: bitwise loss
        lines += [f"- final validation: loss {last['val_loss']:.4f}{ppl}, {extra} at step {last['step']}",
                  f"- best validation loss: {best['val_loss']:.4f} at step {best['step']}"]
    stops = [r for r in rows if r.get("event") == "early_stop"]
    if stops:
        lines.append(f"- stopped early at step {stops[-1]['step']} (patience {cfg.train.patience})")
    lines.append("")
    if plot is not None:
        lines += [f"![loss curves]({plot.name})", ""]
    lines += ["## Resolved config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```",
              ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _plot(path: Path, train: list[dict], val: list[dict]) -> Path | None:
    if not train:
        return None
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    unit = "tokens" if "tokens_per_s" in train[0] else "examples"          # a language model's, or a task's
    ax2.plot([r["step"] for r in train], [r.get(f"{unit}_per_s", float("nan")) for r in train])
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"{unit}/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
