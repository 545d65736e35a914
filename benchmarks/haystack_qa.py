"""Long-document QA from scratch (BABILong-style, issue 23): a small model trained on 2 CPU cores answers bAbI
questions whose facts are scattered through long text, read far beyond its training length.

The recipe (presets ``haystack-stories`` then ``haystack``):
1. ``stories``: the bAbI stories alone as text (no distractor), the loss on the answer, BPE tokens, keys and
   queries mixed with the keys before them (``model.smear_width``, ``model.smear_queries``);
2. ``haystack``: from the first stage's weights (``--train.init_from``), the same stories hidden in 1,024 tokens of
   the embedded corpus, a whole example in one segment (full attention);
3. evaluation on the bAbI 1k test stories (``--task haystack``) at each length, read through retrieval of evicted
   keys/values (no training: a window of 384, 12 blocks of 32 retrieved per 128-token segment, all inside the
   1,024 positions trained), and once with a distractor never seen in training (Tiny Shakespeare).

Each step writes its files under OUT and is skipped when they exist (a run folder: resume by running again).

    python benchmarks/haystack_qa.py --out runs/bench/haystack-qa [--seed 0] [--lengths 2k,16k,64k] [--n 20]
    python benchmarks/haystack_qa.py --out runs/bench/haystack-qa --report     # the markdown table of the cells

Stage 1 reads generated stories of tasks 1 and 2 (20,000 per task, fresh: the 900 bAbI training stories per task
are learned by heart on their own, validation loss rising from step 250); stage 2 reads the bAbI 1k training
stories of tasks 1 and 2 in the haystack; the test stories are bAbI 1k's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from longmem.data.tasks.probes import parse_lengths  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
BABI, BOOK = DATA / "babi-en", DATA / "tinyshakespeare.txt"
LONGMEM = [sys.executable, "-m", "longmem"]
# how the trained model reads a long text: retrieval of evicted keys/values in 128-token segments
READ = ["--model.segment_len", "128", "--memory.kind", "retrieval", "--memory.mem_len", "384",
        "--memory.n_sinks", "4", "--memory.retrieval.block_size", "32", "--memory.retrieval.top_k", "12",
        "--memory.retrieval.query_chunk", "16"]


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd``, its output to ``log``; the wall time in seconds (raises on failure)."""
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.time() - t0


def train(out: Path, *, seed: int, threads: int) -> dict:
    """Both stages (skipped when their run is finished); their wall times."""
    times_file = out / "train_times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    common = ["--train.seed", str(seed), "--train.threads", str(threads), "--train.progress", "false"]
    stages = {
        "stories": ["train", "--config", "haystack-stories", "--out", str(out / "stories"), "--task.babi_tasks", "1,2",
                    "--task.n_train", "20000", "--model.segment_len", "256", "--data.batch_size", "32"],
        "haystack": ["train", "--config", "haystack", "--out", str(out / "haystack"), "--train.init_from",
                     str(out / "stories"), "--data.path", str(BABI), "--task.babi_tasks", "1,2"],
    }
    for name, args in stages.items():
        if not (out / name / "model.safetensors").exists() or name not in times:
            times[name] = round(run(LONGMEM + args + common, out / f"{name}.log"), 1)
            times_file.write_text(json.dumps(times))
    return times


def evaluate(out: Path, *, lengths: str, n: int, threads: int) -> None:
    """One eval per (length, distractor) cell, skipped when its JSON exists."""
    cells = [(length, "") for length in lengths.split(",")] + [("16k", str(BOOK))]
    for length, distractor in cells:
        name = f"{length}{'-shakespeare' if distractor else ''}"
        target = out / "cells" / f"{name}.json"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        capacity = str(max(16384, -(-parse_length(length) // 32) * 32))         # the store holds the whole text
        cmd = LONGMEM + ["eval", str(out / "haystack"), "--task", "haystack", "--lengths", length, "--n", str(n),
                         "--babi", str(BABI), "--task.babi_tasks", "1,2", *READ,
                         "--memory.retrieval.capacity", capacity, "--train.threads", str(threads),
                         "--out", str(target)]
        if distractor:
            cmd += ["--distractor", distractor]
        seconds = run(cmd, out / "cells" / f"{name}.log")
        res = json.loads(target.read_text())
        res["wall_s"] = round(seconds, 1)
        target.write_text(json.dumps(res, indent=1))


def parse_length(text: str) -> int:
    return parse_lengths(text)[0]


def report(out: Path) -> str:
    """Markdown rows: length, distractor, accuracy per bAbI task, examples, wall time."""
    rows = ["| length (tokens) | distractor | task 1 | task 2 | questions per task | eval wall time |",
            "|---:|---|---:|---:|---:|---:|"]
    for path in sorted((out / "cells").glob("*.json"), key=lambda p: (parse_length(p.stem.split("-")[0]), p.stem)):
        res = json.loads(path.read_text())
        acc = {int(c["babi_task"]): c for c in res["results"]}
        rows.append(f"| {path.stem.split('-')[0]} | {'Tiny Shakespeare (unseen)' if 'shakespeare' in path.stem else 'embedded corpus (seen)'} "
                    f"| {acc[1]['accuracy']:.2f} | {acc[2]['accuracy']:.2f} | {acc[1]['answers']} | "
                    f"{res.get('wall_s', 0) / 60:.1f} min |")
    times = out / "train_times.json"
    if times.exists():
        t = json.loads(times.read_text())
        rows.append(f"\nTraining: stories {t.get('stories', 0) / 60:.1f} min, haystack {t.get('haystack', 0) / 60:.1f} min.")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "haystack-qa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", default="2k,16k,64k")
    p.add_argument("--n", type=int, default=20, help="test questions per bAbI task and length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only print the table of the cells written")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report:
        train(a.out, seed=a.seed, threads=a.threads)
        evaluate(a.out, lengths=a.lengths, n=a.n, threads=a.threads)
    table = report(a.out)
    (a.out / "report.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
