"""NTM copy (Graves et al. 2014 §4.1, Figure 4): a Neural Turing Machine and an LSTM trained on copying
sequences of 1..20 random 8-bit vectors, scored by bit errors per sequence at lengths 10 to 80
(generalisation beyond the training lengths), with the curve as ``ntm_copy.png``.

Target: the NTM copies length 40 with a bit error rate <= 1% where the LSTM fails (the paper's Figure 4:
the LSTM's copies degrade quickly past length 20).

Both models train with the settings of the preset ``ntm-copy`` (the LSTM with its own sizes) through the same ``longmem.training.trainer.train`` path as ``longmem train --task.name
copy``, side by side in two processes of one CPU thread each (``LONGMEM_NTM_WORKERS``, default 2); steps per
model: ``LONGMEM_NTM_STEPS`` (default the preset's 3000; quick 30; ``ntm=4000,lstm=2000`` sets each). The runs are kept
in ``runs/bench/ntm_copy/<model>`` (``LONGMEM_NTM_RUNS`` another folder), so ``longmem eval
runs/bench/ntm_copy/ntm --task copy --lengths 10,20,40,80`` reads them again.

Run alone: ``python benchmarks/ntm_copy.py [--quick]`` writes ``runs/bench/ntm_copy.md`` and ``.json``; in the
suite: ``longmem bench --only ntm_copy`` (not in the default suite: it trains for about 15 minutes).
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from longmem.config import ARCH_CONFIGS, RunConfig, find_config

PRESET = "ntm-copy"                # longmem/configs/ntm-copy.yaml: the NTM and the training settings of both models
MODELS = {
    "ntm": {},                    # the preset's NTM: 100-unit LSTM controller, 128 x 20 memory, 1 read + 1 write head
    # the paper's LSTM baseline: 3 layers of 256 units, trained exactly as the NTM
    "lstm": {"model.arch": "lstm", "model.d_model": "256", "model.n_layers": "3"},
}
RUN = {"train.progress": "false", "train.threads": "1"}
LENGTHS = (10, 20, 30, 40, 60, 80)
N_TEST = 100                     # test sequences per length
TARGET_RATE = 0.01               # bit error rate at length 40


def steps(quick: bool) -> dict[str, int]:
    raw = os.environ.get("LONGMEM_NTM_STEPS", "30" if quick else str(preset().train.max_steps))
    try:
        if "=" in raw:
            out = {k.strip(): int(v) for k, v in (p.split("=") for p in raw.split(",") if p.strip())}
        else:
            out = {m: int(raw) for m in MODELS}
    except ValueError:
        out = {}
    if set(out) != set(MODELS) or min(out.values()) <= 0:
        raise ValueError(f"LONGMEM_NTM_STEPS={raw!r}; give one step count (3000) or one per model "
                         f"(ntm=4000,lstm=2000)")
    return out


def preset() -> RunConfig:
    return RunConfig.load(find_config(PRESET))


def config(model: str, *, max_steps: int, quick: bool) -> RunConfig:
    cfg = preset()
    if MODELS[model].get("model.arch", cfg.model.arch) != cfg.model.arch:     # another architecture: its own sizes
        cfg.model = ARCH_CONFIGS[MODELS[model]["model.arch"]]()
    overrides = {**MODELS[model], **RUN, "train.max_steps": str(max_steps)}
    if quick:
        overrides.update({"train.eval_every": "0", "task.n_test": "8", "train.warmup_steps": "3"})
    return cfg.override(overrides)


def train_and_score(model: str, out: str, max_steps: int, quick: bool) -> dict:
    """In a worker process of one thread: train ``model`` into ``out``, then its bit errors per length."""
    import torch
    torch.set_num_threads(1)
    from longmem.classic.qa import eval_sequences
    from longmem.runs import load_run
    from longmem.training.trainer import train
    cfg = config(model, max_steps=max_steps, quick=quick)
    t0 = time.perf_counter()
    res = train(cfg, out, desc=f"{model} copy")
    seconds = time.perf_counter() - t0
    run = load_run(out)
    scores = eval_sequences(run, "copy", lengths=list(LENGTHS[1:2] if quick else LENGTHS), n=8 if quick else N_TEST)
    return {"model": model, "steps": res.steps, "seconds": seconds, "params": run.model.num_params(),
            "examples": res.steps * cfg.data.batch_size, "val": res.val, "results": scores["results"]}


def run(quick: bool) -> str:
    runs = Path(os.environ.get("LONGMEM_NTM_RUNS", "runs/bench/ntm_copy"))
    n_steps = steps(quick)
    workers = int(os.environ.get("LONGMEM_NTM_WORKERS", "2"))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = {m: pool.submit(train_and_score, m, str(runs / m), n_steps[m], quick) for m in MODELS}
        results = {m: job.result() for m, job in jobs.items()}
    cfg = preset()
    lines = ["## NTM copy: generalising to longer sequences (Graves et al. 2014 §4.1)", "",
             f"Copy {cfg.task.bits}-bit random vectors, trained on lengths {cfg.task.min_len}..{cfg.task.max_len} "
             f"(preset `{PRESET}`: batch {cfg.data.batch_size}, AdamW lr {cfg.train.lr:g} with cosine decay, "
             f"bitwise cross-entropy on the output phase), scored on {8 if quick else N_TEST} test sequences per "
             f"length. Bit errors count every wrong bit of the 8 data bits and the end bit per output vector.", "",
             "| model | params | steps | sequences | train time | " + " | ".join(
                 f"len {n} bits wrong/seq (rate)" for n in (LENGTHS[1:2] if quick else LENGTHS)) + " |",
             "|---|---|---|---|---|" + "---|" * len(LENGTHS[1:2] if quick else LENGTHS)]
    for m, r in results.items():
        cells = " | ".join(f"{x['bit_errors']:.2f} ({100 * x['bit_error_rate']:.2f}%)" for x in r["results"])
        lines.append(f"| {m} | {r['params']:,} | {r['steps']} | {r['examples']:,} | {r['seconds'] / 60:.1f} min | "
                     f"{cells} |")
    rate40 = {m: next((x["bit_error_rate"] for x in r["results"] if x["length"] == 40), None)
              for m, r in results.items()}
    if rate40["ntm"] is not None:
        met = rate40["ntm"] <= TARGET_RATE and (rate40["lstm"] or 0) > TARGET_RATE
        lines += ["", f"Target (NTM bit error rate <= {100 * TARGET_RATE:.0f}% at length 40 where the LSTM fails): "
                      f"{'met' if met else 'not met'} (NTM {100 * rate40['ntm']:.2f}%, LSTM "
                      f"{100 * (rate40['lstm'] or 0):.2f}%). CPU, one thread per model."]
    runs.mkdir(parents=True, exist_ok=True)
    (runs.parent / "ntm_copy.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines += ["", f"![bit error rate against copy length](ntm_copy.png)"] if plot(results, runs.parent) else []
    return "\n".join(lines) + "\n"


def plot(results: dict, folder: Path) -> bool:
    """Bit error rate against sequence length per model (``folder/ntm_copy.png``), the paper's Figure 4 as a
    curve; False when matplotlib is missing."""
    from longmem.utils import pyplot
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for m, r in results.items():
        ax.plot([x["length"] for x in r["results"]], [100 * x["bit_error_rate"] for x in r["results"]], "o-",
                label=m.upper())
    ax.axvline(preset().task.max_len, color="grey", ls=":", label="longest training length")
    ax.set(xlabel="sequence length (vectors)", ylabel="bit error rate (%)", title="Copy: NTM vs LSTM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "ntm_copy.png", dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    text = run("--quick" in sys.argv[1:])
    out = Path(os.environ.get("LONGMEM_NTM_RUNS", "runs/bench/ntm_copy")).parent / "ntm_copy.md"
    out.write_text(text)
    print(text)
