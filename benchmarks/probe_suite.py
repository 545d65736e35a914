"""Every memory kind on the long-range probes: train on a probe at a short length,
evaluate at longer ones.

For each memory kind (none, xl, knn, tokens when built, and the LSTM) and each
probe (passkey, recall), a model is trained with the probe's preset
(``configs/passkey.yaml``, ``configs/recall.yaml``: 2 layers, d_model 128,
segments of 128, examples of ``TRAIN_LENGTH`` tokens) and evaluated with
``longmem eval --task PROBE`` at each of ``LENGTHS`` tokens and needle depths
0, 0.5 and 1. Each (kind, probe) runs in its own process (``python
benchmarks/probe_suite.py --child KIND PROBE STEPS OUT``), so its wall time and
peak resident memory are its own.

Also usable by hand: ``python benchmarks/probe_suite.py --kinds none,xl --probes passkey
--steps 1500 --out BENCH.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_LENGTH = 512
LENGTHS = {True: (512, 2048), False: (512, 2048, 8192)}
DEPTHS = (0.0, 0.5, 1.0)
STEPS = {True: 30, False: 1500}
N = {True: 4, False: 20}
PLOT = Path(__file__).resolve().parent / "probe_suite.png"


def kinds() -> list[str]:
    from longmem.config import IMPLEMENTED_KINDS
    return [k for k in ("none", "xl", "knn", "tokens") if k in IMPLEMENTED_KINDS] + ["lstm"]


def overrides(kind: str) -> dict[str, str]:
    """The preset's model with memory ``kind`` (xl memory of 128 for xl and knn; tokens: 16 memory tokens)."""
    if kind == "lstm":
        return {"model.arch": "lstm", "memory.kind": "none", "memory.mem_len": "0"}
    over = {"memory.kind": kind, "memory.mem_len": "0" if kind in ("none", "tokens") else "128"}
    if kind == "knn":
        over.update({"memory.knn_capacity": "16384", "memory.knn_layers": "[1]"})
    return over


def child(kind: str, probe: str, steps: int, out: str, quick: bool) -> dict:
    import torch

    from longmem.config import RunConfig
    from longmem.evaluation.suite import eval_probe
    from longmem.runs import load_run
    from longmem.training.trainer import train
    torch.set_num_threads(1)
    cfg = RunConfig.load(ROOT / "configs" / f"{probe}.yaml").override({
        **overrides(kind), "task.length": str(TRAIN_LENGTH), "train.max_steps": str(steps),
        "train.eval_every": "0", "train.progress": "false", "task.n_test": str(N[quick])})
    t0 = time.perf_counter()
    res = train(cfg, out, desc=f"{kind} {probe}")
    seconds = time.perf_counter() - t0
    ev = eval_probe(load_run(out), probe, lengths=list(LENGTHS[quick]), depths=list(DEPTHS), n=N[quick],
                    show_progress=False)
    return {"kind": kind, "probe": probe, "steps": res.steps, "train_seconds": seconds,
            "val_accuracy": res.val.get("accuracy"), "peak_rss_mib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "eval": ev}


def measure(*, quick: bool, kinds_: list[str], probes: list[str], steps: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for probe in probes:
            for kind in kinds_:
                cmd = [sys.executable, __file__, "--child", kind, probe, str(steps), str(Path(tmp) / f"{kind}-{probe}")]
                res = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    raise RuntimeError(f"probe_suite child {kind} {probe} failed: {res.stderr[-2000:]}")
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def _by_length(row: dict) -> dict[int, float]:
    """Accuracy per evaluation length, over depths (weighted by answers)."""
    acc: dict[int, list[float]] = {}
    for r in row["eval"]["results"]:
        acc.setdefault(r["length"], []).extend([r["accuracy"] * r["answers"], r["answers"]])
    return {n: sum(v[0::2]) / sum(v[1::2]) for n, v in acc.items()}


def _plot(rows: list[dict]) -> Path | None:
    from longmem.utils import pyplot
    plt = pyplot()
    if plt is None:
        return None
    probes = list(dict.fromkeys(r["probe"] for r in rows))
    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.6), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        for r in (r for r in rows if r["probe"] == probe):
            acc = _by_length(r)
            ax.semilogx(list(acc), list(acc.values()), "o-", base=2, label=r["kind"])
        ax.axvline(TRAIN_LENGTH, color="gray", lw=0.5, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{probe} (trained at {TRAIN_LENGTH})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return PLOT


def render(rows: list[dict], *, quick: bool, command: str) -> str:
    lengths = LENGTHS[quick]
    steps = rows[0]["steps"] if rows else 0
    lines = ["## Long-range probes: every memory kind", "",
             f"Made by `{command}`. Each model: the probe's preset (`configs/passkey.yaml`, `configs/recall.yaml`: "
             f"2 layers, d_model 128, 4 heads, segments of 128, char tokenizer, batch 8, lr 1e-3), trained "
             f"{steps} steps on examples of {TRAIN_LENGTH} tokens (4 segments), loss on answer tokens only; "
             f"xl and knn with mem_len 128, knn retrieving in block 1 (k 32, capacity 16,384), lstm 2 layers. "
             f"Evaluated on {N[quick]} new examples per length and needle depth ({', '.join(map(str, DEPTHS))}); "
             f"accuracy over depths. One CPU thread per model; wall time and peak resident memory of training "
             f"plus evaluation.", "",
             "| probe | memory | " + " | ".join(f"acc @ {n:,}" for n in lengths)
             + " | chance | train s | peak MiB |",
             "|---|---|" + "---:|" * (len(lengths) + 3)]
    for r in rows:
        acc = _by_length(r)
        lines.append(f"| {r['probe']} | {r['kind']} | " + " | ".join(f"{acc.get(n, float('nan')):.2f}" for n in lengths)
                     + f" | {r['eval']['chance']:.2g} | {r['train_seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    plot = _plot(rows)
    if plot:
        lines += ["", f"![accuracy against evaluation length](benchmarks/{plot.name})"]
    return "\n".join(lines + [""])


def run(quick: bool) -> str:
    probes = ["passkey"] if quick else ["passkey", "recall"]
    rows = measure(quick=quick, kinds_=kinds(), probes=probes, steps=STEPS[quick])
    return render(rows, quick=quick, command=f"longmem bench{' --quick' if quick else ''} (module probe_suite)")


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], "--quick" in sys.argv)))
        sys.exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(kinds()))
    p.add_argument("--probes", default="passkey,recall")
    p.add_argument("--steps", type=int, default=STEPS[False])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="also write the section to this file")
    args = p.parse_args()
    rows = measure(quick=args.quick, kinds_=args.kinds.split(","), probes=args.probes.split(","), steps=args.steps)
    text = render(rows, quick=args.quick, command="python benchmarks/probe_suite.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).write_text(text)
    print(text)
