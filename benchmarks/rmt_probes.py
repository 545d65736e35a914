"""Recurrent memory tokens (RMT) against the other memories on long-range probes.

Every memory kind (none | xl | knn | tokens | local_global) trains the same small model the same way with
``longmem train`` on a probe task (``task.name passkey`` or ``recall``, loss on answer tokens
only): examples of 4 segments of 128 tokens (``task.length 512``), backpropagation through the
4 segments (``train.bptt_segments 4``), examples growing 1 -> 2 -> 4 segments by stages of equal steps
(``train.curriculum 1,2,4,4``: 1/4 of the steps on one segment, where the model first learns to
copy the key at all, 1/4 on two, the rest on four), 3,000 steps. Every model has smeared keys; the kNN
memory retrieves in block 0. Memory tokens (``RECIPES``) train 6,000 steps with 750 on one segment,
750 on two and the rest on four (``1,2,4,4,4,4,4,4``), through a stretched gate
(``memory.tokens.gate``, ``memory.tokens.stretch``) charged for opening (``train.aux_weight``)
from the first two-segment step (``train.aux_start 750``: on one segment the written memory is
never read), and are scored with gates below 0.05 taken as 0 (``memory.tokens.floor``, an
evaluation setting). Each run is then scored with ``longmem eval``'s probe sweep at 4, 8, 32 and 128
segments (512 tokens to 16K; 1x to 32x the training length), needle depths 0, 0.5 and 1, the context
fed segment by segment through the memory. The kNN store holds one training example (512 entries: a
lane is reset per example) and, at test, the longest context (16,384).

Each training run is a child process, so its wall time and peak resident memory (``wait4``)
are its own. Results go to a JSON file (one entry per task and kind, kept between
invocations, so kinds can be run one at a time); ``--report`` turns it into the markdown
table and plot of BENCHMARKS.md.

    python benchmarks/rmt_probes.py --task passkey --kinds tokens,xl,knn,none
    python benchmarks/rmt_probes.py --report
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "rmt_probes.json"
PLOT = ROOT / "benchmarks" / "rmt_probes.png"
SEG = 128
LENGTHS = [1024, 4096, 16384]
DEPTHS = [0.0, 0.5, 1.0]
# smeared keys (Olsson et al. 2022) for every kind: copying the key is learned in hundreds of steps, not thousands
MODEL = {"model.d_model": 128, "model.n_layers": 2, "model.n_heads": 4, "model.segment_len": SEG,
         "model.smear_keys": "true", "data.tokenizer": "char", "data.batch_size": 16}
CURRICULUM = "1,2,4,4"
STEPS, LR = 3000, 3e-3
# a kind's own training length where it differs: (steps, curriculum); --steps / --curriculum override
RECIPES = {"tokens": (6000, "1,2,4,4,4,4,4,4")}
# evaluation settings: the kNN store holds every test token; gates that settled a little above 0 are shut
TEST_OVERRIDES = {"knn": {"memory.knn.capacity": str(max(LENGTHS))}, "tokens": {"memory.tokens.floor": "0.05"}}
KINDS = {
    "none": {"memory.kind": "none"},
    "xl": {"memory.kind": "xl", "memory.mem_len": SEG},
    # the block that learns the lookup locally retrieves (BENCHMARKS.md, kNN recall)
    "knn": {"memory.kind": "knn", "memory.mem_len": 0, "memory.knn.capacity": 4 * SEG, "memory.knn.layers": "[0]"},
    # gated update (0.83 at the training length against 0.15 with the plain, replacing one), stretched so it can
    # shut exactly and charged for opening (from the first two-segment step of RECIPES' curriculum), so it shuts
    # in filler and the memory stays put; BENCHMARKS.md has the ablations
    "tokens": {"memory.kind": "tokens", "memory.tokens.n_tokens": 8, "memory.mem_len": 0,
               "memory.tokens.gate": "sigmoid", "memory.tokens.stretch": 0.1, "train.aux_weight": 0.002,
               "train.aux_start": 750},
    # Longformer-style sparse attention (Beltagy et al. 2020 §3.1), causal: a window of one segment (as xl's
    # mem_len) plus the first 64 stream positions global (half a segment: the prompt's opening, which holds the
    # passkey needle or the recall pairs when they are stated at depth 0); no weights of its own
    "local_global": {"memory.kind": "local_global", "memory.mem_len": 0, "memory.local_global.window": SEG,
                     "memory.local_global.n_global": 64},
}


def recipe(kind: str) -> tuple[int, str]:
    """(steps, curriculum) that ``kind`` trains with."""
    return RECIPES.get(kind, (STEPS, CURRICULUM))


def train_args(task: str, kind: str, *, steps: int, lr: float, out: Path, curriculum: str = CURRICULUM,
               seed: int = 0) -> list[str]:
    over = {**MODEL, **KINDS[kind], "task.name": task, "task.length": 4 * SEG, "task.n_test": 32,
            "task.n_pairs": 4, "train.bptt_segments": 4, "train.curriculum": curriculum, "train.max_steps": steps,
            "train.lr": lr, "train.min_lr": lr / 10, "train.warmup_steps": 50, "train.weight_decay": 0.0,
            "train.seed": seed,
            "train.eval_every": 0, "train.log_every": 25, "train.threads": 1, "train.progress": "false"}
    return ["train", "--out", str(out), *[x for k, v in over.items() for x in (f"--{k}", str(v))]]


def run_child(args: list[str]) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MiB) of ``python -m longmem ARGS``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "longmem", *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def weights_sha256(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def bench(task: str, kind: str, *, steps: int, lr: float, n: int, runs: Path, lengths=LENGTHS,
          curriculum: str = CURRICULUM, seed: int = 0, reuse: bool = False, stored: dict | None = None) -> dict:
    """Train ``kind`` on ``task`` in a child process (or, with ``reuse``, score the finished run already
    in ``runs``: its command, wall time and peak memory are then those of the ``stored`` entry that trained
    these weights (``weights_sha256``), or unknown) and score it at every length."""
    import torch

    from longmem.evaluation.suite import eval_probe
    from longmem.runs import load_run
    torch.set_num_threads(1)
    out = runs / f"{task}-{kind}"
    args = train_args(task, kind, steps=steps, lr=lr, out=out, curriculum=curriculum, seed=seed)
    trained = {"steps": steps, "lr": lr, "curriculum": curriculum, "seed": seed,
               "command": "python -m longmem " + " ".join(args), "train_seconds": None, "train_peak_rss_mib": None}
    reused = reuse and (out / "model.safetensors").is_file()
    if reused:
        print(f"== {task} {kind}: scoring the finished run {out}", flush=True)
    else:
        print(f"== {task} {kind}: longmem {' '.join(args)}", flush=True)
        code, wall, rss = run_child(args)
        if code != 0:
            raise SystemExit(f"training {task}/{kind} failed with exit code {code}")
        trained.update(train_seconds=round(wall, 1), train_peak_rss_mib=round(rss, 1))
    sha = weights_sha256(out)
    if reused and stored and stored.get("weights_sha256") == sha:      # these weights were trained by this script
        trained = {k: stored[k] for k in trained}
    run = load_run(out, overrides=TEST_OVERRIDES.get(kind))
    start = time.perf_counter()
    res = eval_probe(run, task, lengths=[4 * SEG, *lengths], depths=DEPTHS, n=n, seed=0, batch_size=8,
                     show_progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "val_accuracy" in m][-1]
    entry = {"task": task, "kind": kind, **trained, "n": n, "test_overrides": TEST_OVERRIDES.get(kind, {}),
             "eval_seconds": round(time.perf_counter() - start, 1), "val_accuracy_512": final["val_accuracy"],
             "reused": reused, "weights_sha256": sha, "results": res["results"]}
    print(json.dumps({k: v for k, v in entry.items() if k != "results"}), flush=True)
    for r in res["results"]:
        print(f"   length {r['length']:>6} depth {r['depth']:.1f}: accuracy {r['accuracy']:.3f} "
              f"({r['answers']} answers)", flush=True)
    return entry


def accuracy_by_length(entry: dict) -> dict[int, float]:
    """Mean accuracy over depths (each cell has the same number of answers) per length."""
    by: dict[int, list[float]] = {}
    for r in entry["results"]:
        by.setdefault(r["length"], []).append(r["accuracy"])
    return {length: sum(v) / len(v) for length, v in sorted(by.items())}


def report(results: dict) -> str:
    lines = []
    for task in ("passkey", "recall"):
        entries = [results[k] for k in sorted(results) if results[k]["task"] == task]
        if not entries:
            continue
        order = {k: i for i, k in enumerate(KINDS)}
        entries.sort(key=lambda e: order[e["kind"]])
        lengths = sorted({r["length"] for e in entries for r in e["results"]})
        head = " | ".join(f"{n // SEG} seg ({n:,})" for n in lengths)
        lines += [f"#### {task}: accuracy (mean over depths 0, 0.5, 1) by context length", "",
                  f"| memory | {head} | examples per cell | train steps | train wall | train peak RSS |",
                  "|---|" + "---:|" * (len(lengths) + 4)]
        for e in entries:
            acc = accuracy_by_length(e)
            cells = " | ".join(f"{acc[n]:.3f}" for n in lengths)
            wall = "n/a" if e["train_seconds"] is None else f"{e['train_seconds']:.0f} s"
            rss = "n/a" if e["train_peak_rss_mib"] is None else f"{e['train_peak_rss_mib']:.0f} MiB"
            lines.append(f"| {e['kind']} | {cells} | {e['n']} | {e['steps']:,} | {wall} | {rss} |")
        lines += ["", f"Per depth ({task}; rows: memory and depth):", "",
                  f"| memory | depth | {' | '.join(f'{n // SEG} seg' for n in lengths)} |",
                  "|---|---:|" + "---:|" * len(lengths)]
        for e in entries:
            for depth in DEPTHS:
                cells = {r["length"]: r["accuracy"] for r in e["results"] if r["depth"] == depth}
                lines.append(f"| {e['kind']} | {depth} | " + " | ".join(f"{cells[n]:.3f}" for n in lengths) + " |")
        reused = " (a run trained earlier, scored with --reuse)"
        lines += ["", "Commands:", ""] + [f"- {e['kind']}{reused if e['reused'] else ''}: "
                                          f"`{e['command'].replace(str(ROOT) + '/', '')}`" for e in entries] + [""]
    return "\n".join(lines)


def plot(results: dict, path: Path = PLOT) -> Path | None:
    from longmem.utils import pyplot
    plt = pyplot()
    if plt is None or not results:
        return None
    tasks = [t for t in ("passkey", "recall") if any(e["task"] == t for e in results.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for kind in KINDS:
            e = results.get(f"{task}/{kind}")
            if e is None:
                continue
            acc = accuracy_by_length(e)
            ax.plot([n // SEG for n in acc], list(acc.values()), "o-", label=kind)
        ax.axvline(4, color="gray", lw=0.5, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("segments of 128 tokens (trained on 4)")
        ax.set_ylabel("answer accuracy")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(quick: bool, *, out_dir: Path, figures: Path | None = None) -> str:
    """The ``longmem bench`` module: every kind on passkey (and recall in the full run); ``quick`` is a
    smoke run (12 steps, 1 example per cell, up to 8 segments) whose accuracies mean nothing. The picture goes
    to ``figures`` (default: ``out_dir``, the folder of the page), linked relative to ``out_dir``."""
    import tempfile
    n, lengths = (1, [1024]) if quick else (16, LENGTHS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in (["passkey"] if quick else ["passkey", "recall"]):
            for kind in KINDS:
                steps, curriculum = (12, CURRICULUM) if quick else recipe(kind)
                results[f"{task}/{kind}"] = bench(task, kind, steps=steps, lr=LR, n=n, runs=Path(tmp),
                                                  lengths=lengths, curriculum=curriculum)
    figure = plot(results, (figures or out_dir) / PLOT.name)
    head = ["## Long-range probes: every memory kind" + (" (quick smoke run)" if quick else ""), "",
            f"`python benchmarks/rmt_probes.py` through `longmem bench{' --quick' if quick else ''}`: "
            f"{n} examples per (length, depth).", ""]
    return "\n".join(head) + report(results) + (f"\n![probes]({figure.relative_to(out_dir)})\n" if figure else "")


def gate_trace(run_dir: Path, *, segments: int = 128, depth: float = 0.5, seed: int = 0) -> str:
    """What a gated tokens run writes through one passkey example of ``segments`` segments: per segment, the
    mean gate (``TokenMemory.gates``; 0: the memory kept as it was) and the cosine of the memory with the one
    before and with the one after the first segment. Markdown."""
    import random

    import torch

    from longmem.data.tasks.probes import passkey
    from longmem.runs import load_run, load_run_config
    memory = load_run_config(run_dir).model.memory
    if memory.kind != "tokens" or memory.tokens.gate == "none":
        raise SystemExit(f"{run_dir} has no gated memory tokens (memory.kind tokens, memory.tokens.gate sigmoid)")
    model = (run := load_run(run_dir, overrides=TEST_OVERRIDES["tokens"])).model.eval()    # as it is scored
    probe = passkey(run.tokenizer, length=segments * SEG, depth=depth, rng=random.Random(seed))
    x = torch.as_tensor(probe.tokens).view(1, -1)[:, :segments * SEG]
    write, gates = model.tokens.write, []

    def traced(outputs, *, previous):                           # records each write's mean gate
        gates.append(model.tokens.gates(outputs)[0].flatten())
        return write(outputs, previous=previous)
    model.tokens.write = traced
    mems, state = [], None
    with torch.no_grad():
        for start in range(0, x.shape[1], SEG):                   # a segment per call: one write each
            state = model(x[:, start:start + SEG], state=state).state
            mems.append(state.tokens.mem.flatten())
    cos = torch.nn.functional.cosine_similarity
    lines = [f"gates of {run_dir} (gate floor {model.tokens.floor}), passkey of {segments} segments, "
             f"depth {depth}:", "",
             "| segment | mean gate | cos(previous memory) | cos(memory after segment 1) |", "|---:|---:|---:|---:|"]
    for i in range(1, len(mems)):
        mean = float(gates[i].mean())
        if i < 4 or i % 10 == 0 or mean > 0.05:
            lines.append(f"| {i} | {mean:.4f} | {float(cos(mems[i], mems[i - 1], dim=0)):.6f} | "
                         f"{float(cos(mems[i], mems[1], dim=0)):.4f} |")
    later = torch.cat(gates[1:])                                 # every write after the first
    lines += ["", f"writes 2-{len(gates)}: mean gate {float(later.mean()):.3f}, gate entries at 0.9 or more "
              f"(memory dimensions replaced) {float((later >= 0.9).float().mean()):.1%}"]
    return "\n".join(lines)


def key_errors(run_dir: Path, *, depth: float, n: int = 192) -> str:
    """Passkey answers of a run at 4 segments, split by whether a digit repeats among the key's first four
    (where copying the key by its previous character is ambiguous)."""
    import random

    from longmem.data.tasks.probes import passkey
    from longmem.evaluation.probes import score_probes
    from longmem.runs import load_run, load_run_config
    kind = load_run_config(run_dir).model.memory.kind
    run = load_run(run_dir, overrides=TEST_OVERRIDES.get(kind))
    probes = [passkey(run.tokenizer, length=4 * SEG, depth=depth, rng=random.Random(f"keys/{i}")) for i in range(n)]
    tally = {True: [0, 0], False: [0, 0]}
    for probe, score in zip(probes, score_probes(run.model, probes, batch_size=32)):
        count = tally[len(set(probe.answers[0]["text"].strip()[:4])) < 4]
        count[0] += score[0]["correct"]
        count[1] += 1
    (a, b), (c, d) = tally[True], tally[False]
    return (f"{run_dir}, {n} passkeys of 4 segments at depth {depth}: {a} of {b} right with a digit repeated in "
            f"the key's first four, {c} of {d} without")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["passkey", "recall"], default="passkey")
    p.add_argument("--kinds", default="tokens,xl,knn,none", help="memory kinds, comma-separated")
    p.add_argument("--steps", type=int, help=f"optimizer steps per training run (default {STEPS}, or the kind's "
                   f"own: {RECIPES})")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--curriculum", help=f"segments per example, stage by stage (equal steps; default {CURRICULUM}, "
                   "or the kind's own)")
    p.add_argument("--seed", type=int, default=0, help="the training seed (train.seed)")
    p.add_argument("--n", type=int, default=16, help="examples per (length, depth) cell")
    p.add_argument("--runs", default="runs/rmt_bench", help="where the training runs go")
    p.add_argument("--reuse", action="store_true", help="score a finished run already in --runs instead of "
                   "training it again (its wall time and peak memory are then not measured)")
    p.add_argument("--report", action="store_true", help="print the markdown of the stored results and plot them")
    p.add_argument("--gates", metavar="RUN", help="trace the gate and memory of a gated tokens RUN through a "
                   "128-segment passkey (needle at depth 0.5) and exit")
    p.add_argument("--keys", metavar="RUN", help="score 192 passkeys of RUN at 4 segments, split by whether a digit "
                   "repeats in the key, and exit")
    p.add_argument("--keys-depth", type=float, default=0.0, help="needle depth for --keys (1: in the question's "
                   "segment)")
    args = p.parse_args()
    if args.keys:
        print(key_errors(Path(args.keys), depth=args.keys_depth))
        return
    if args.gates:
        print(gate_trace(Path(args.gates)))
        return
    if args.report:
        print(report(load_results()))
        print(plot(load_results()))
        return
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            raise SystemExit(f"unknown kind {kind!r}; accepted: {', '.join(KINDS)}")
        steps, curriculum = recipe(kind)
        entry = bench(args.task, kind, steps=args.steps or steps, lr=args.lr, n=args.n, runs=ROOT / args.runs,
                      curriculum=args.curriculum or curriculum, seed=args.seed, reuse=args.reuse,
                      stored=load_results().get(f"{args.task}/{kind}"))
        results = load_results()
        results[f"{args.task}/{kind}"] = entry
        RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
