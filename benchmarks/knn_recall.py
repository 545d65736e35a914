"""kNN memory quality: associative recall at long distances, none vs xl vs knn.

Pairs ``k v`` are stated, filler follows, then every pair is queried (``longmem.data.tasks.recall``).
Three models of the same size and segment length 128 are trained the same way on short distances
(filler 0-512 tokens), then tested at distances up to 8K tokens: ``none`` (no memory), ``xl``
(mem_len 128) and ``knn`` (kNN memory in block 0, Wu et al. 2022), all with smeared keys. The kNN memory
is detached, so the keys and values it stores are learned through the same layer's local attention; that is
why training mixes short distances (pairs inside the window) with long ones (pairs only in the kNN memory).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from longmem import MemoryConfig, MemoryLM, ModelConfig
from longmem.data.tasks.recall import RecallTask, recall_accuracy

OUT_DIR = Path(__file__).resolve().parents[1]
TASK = RecallTask(n_keys=16, n_values=16, n_filler=32, distinct_values=True)
SEG = 128
N_PAIRS = 16
TRAIN_FILLERS = (0, 0, 32, 64, 128, 256)
TEST_FILLERS = (0, 128, 512, 1024, 2048, 4096, 8192)
BINS = [0, 128, 256, 512, 1024, 2048, 4096, 8192]
STEPS = 1500                                 # the recipe of the kNN section of BENCHMARKS.md
CURRICULUM = 0.5
LR = 1e-3
D_MODEL = 128
# smeared keys (Olsson et al. 2022): without them no model of this size left the plateau of ruling out the values
# already asked (about 0.2) in 1,500-6,000 steps, so the memories had nothing to retrieve (BENCHMARKS.md)
SMEAR_KEYS = True
# the block that retrieves must be the one that learns the key -> value matching on local pairs: the stored keys
# are trained only through its local attention (they are detached in the memory). With smeared keys block 0 does
# the matching alone; a memory in block 1 then held keys nobody matched against (accuracy 0.2 beyond the window)
KNN_LAYER = 0


def make_model(kind: str, *, capacity: int = 1024) -> MemoryLM:
    torch.manual_seed(0)
    mem = {"none": MemoryConfig(kind="none"),
           "xl": MemoryConfig(kind="xl", mem_len=SEG),
           "knn": MemoryConfig(kind="knn", mem_len=0, knn=dict(layers=[KNN_LAYER], k=32, capacity=capacity))}[kind]
    return MemoryLM(ModelConfig(vocab_size=TASK.vocab_size, d_model=D_MODEL, n_layers=2, n_heads=4, segment_len=SEG,
                                smear_keys=SMEAR_KEYS, memory=mem))



def train(model: MemoryLM, *, steps: int, batch_size: int = 16, lr: float = LR, seed: int = 0,
          verbose: bool = True, every=None) -> list[float]:
    """``every``: optional (n, callback(step)) called every n steps (progress reports of long runs)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        # curriculum: pairs inside the window first, so the block's local attention learns to bind
        # keys to values (the stored kNN entries use the same projections), then all distances
        pick = int(torch.randint(len(TRAIN_FILLERS), (1,), generator=g))
        filler = 0 if step < CURRICULUM * steps else TRAIN_FILLERS[pick]
        batch = TASK.sample(batch_size=batch_size, n_pairs=N_PAIRS, filler=filler, generator=g)
        out = model(batch.tokens, targets=batch.targets)           # a fresh memory per sequence
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if verbose and (step + 1) % 50 == 0:
            mask = batch.targets != -100
            acc = (out.logits.argmax(-1) == batch.targets)[mask].float().mean()
            print(f"  step {step + 1}: loss {sum(losses[-50:]) / 50:.3f} filler {filler} acc {acc:.2f}", flush=True)
        if every and (step + 1) % every[0] == 0 and step + 1 < steps:
            every[1](step + 1)
            model.train()
    return losses


def evaluate(model: MemoryLM, *, batch_size: int, fillers=TEST_FILLERS, seed: int = 123) -> dict:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    per_filler = {}
    for filler in fillers:
        batch = TASK.sample(batch_size=batch_size, n_pairs=N_PAIRS, filler=filler, generator=g)
        per_filler[filler] = recall_accuracy(model, batch, bins=BINS)
    return per_filler


def plot(results: dict, path: Path) -> Path | None:
    from longmem.utils import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, res in results.items():
        xs = [r["mean_distance"] for r in res["eval"].values()]
        ys = [r["accuracy"] for r in res["eval"].values()]
        ax.plot(xs, ys, marker="o", label=kind)
    ax.axhline(TASK.chance, color="gray", linestyle=":", label="blind guess")
    ax.axhline(_elimination(), color="gray", linestyle="--", label="ruling out asked values")
    ax.set_xscale("log")
    ax.set_xlabel("tokens between statement and query (mean per test set)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Associative recall, segment {SEG}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _test_model(model: MemoryLM, kind: str) -> MemoryLM:
    if kind != "knn":
        return model
    big = make_model("knn", capacity=16384)  # same weights, a ring large enough for the longest test
    big.load_state_dict(model.state_dict())
    return big


def train_and_eval(kind: str, *, steps: int, fillers=TEST_FILLERS, verbose: bool = False, report=None) -> dict:
    model = make_model(kind)
    t0 = time.perf_counter()
    every = None
    if report:                               # interim results of long runs: (step, accuracy per filler)
        every = (report[0], lambda step: report[1](step, evaluate(_test_model(model, kind), batch_size=8,
                                                                  fillers=(0, 512, 4096))))
    losses = train(model, steps=steps, verbose=verbose, every=every)
    t_train = time.perf_counter() - t0
    model = _test_model(model, kind)
    return {"steps": steps, "train_s": t_train, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "eval": evaluate(model, batch_size=8, fillers=fillers)}


def _elimination() -> float:
    """Expected accuracy of guessing among the values not yet asked (distinct values, all pairs queried)."""
    return sum(1.0 / (N_PAIRS - j) for j in range(N_PAIRS)) / N_PAIRS if TASK.distinct_values else TASK.chance


def render(results: dict, *, steps: int, seconds: float, out_dir: Path, figures: Path | None = None) -> str:
    """The markdown section. The picture goes to ``figures`` (default: ``out_dir``, the folder of the page), linked relative to ``out_dir``."""
    fillers = list(next(iter(results.values()))["eval"])
    png = plot(results, (figures or out_dir) / "knn_recall.png")
    trained = ", ".join(f"{k} {r['steps']}" for k, r in results.items())
    lines = [
        "## kNN memory: associative recall vs distance", "",
        f"Task (`longmem.data.tasks.recall`): {N_PAIRS} pairs `k v` stated, then filler, then every pair queried "
        f"in a random order; {TASK.n_keys} keys, {TASK.n_values} values (each used once per sequence; chance "
        f"{TASK.chance:.3f} for a blind guess, {_elimination():.3f} for a model that only rules out the values "
        f"already asked), disjoint filler tokens. Models: 2 layers, d_model {D_MODEL}, 4 heads, segment {SEG}, "
        f"smeared keys {'on' if SMEAR_KEYS else 'off'} (`model.smear_keys`); "
        f"none | xl (mem_len {SEG}) | knn (mem_len 0, kNN memory in block {KNN_LAYER}, k 32, capacity 1,024 in training "
        f"and 16,384 at test, normalized keys). Trained for "
        f"{trained} steps of batch 16 (AdamW, lr {LR}), the first "
        f"{CURRICULUM:.0%} on filler 0 (pairs inside the window), then fillers {list(TRAIN_FILLERS)}; a fresh "
        f"memory per sequence, loss on answers only. Tested on 8 new sequences per filler length "
        f"({8 * N_PAIRS} answers each). One CPU thread; {seconds:.0f}s in all.", "",
        "| filler | mean distance | " + " | ".join(results) + " |",
        "|---:|---:|" + "---:|" * len(results),
    ]
    for f in fillers:
        dist = next(iter(results.values()))["eval"][f]["mean_distance"]
        accs = " | ".join(f"{results[k]['eval'][f]['accuracy']:.3f}" for k in results)
        lines.append(f"| {int(f):,} | {dist:,.0f} | {accs} |")
    lines += ["", "Accuracy by distance bin (all test sequences pooled):", "",
              "| distance | " + " | ".join(results) + " | answers |", "|---|" + "---:|" * (len(results) + 1)]
    pooled = {}
    for kind, res in results.items():
        for r in res["eval"].values():
            for b in r.get("bins", []):
                acc = pooled.setdefault((b["from"], b["to"]), {}).setdefault(kind, [0.0, 0])
                acc[0] += b["accuracy"] * b["answers"]
                acc[1] += b["answers"]
    for (lo, hi), per in sorted(pooled.items()):
        n = next(iter(per.values()))[1]
        hi_txt = "inf" if hi == float("inf") else f"{int(hi):,}"
        lines.append(f"| [{int(lo):,}, {hi_txt}) | " + " | ".join(
            f"{per[k][0] / per[k][1]:.3f}" if k in per else "-" for k in results) + f" | {n} |")
    lines += ["", "Training time and final training loss (answers only, mean of the last 50 steps): " + "; ".join(
        f"{k} {r['train_s']:.0f}s, {r['final_loss']:.3f}" for k, r in results.items()) + ".", ""]
    if png:
        lines += [f"![recall accuracy vs distance]({png.relative_to(out_dir)})", ""]
    return "\n".join(lines)


def run(quick: bool, *, out_dir: Path, figures: Path | None = None) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # small matmuls: one thread is faster on a shared CPU
    steps = 40 if quick else STEPS            # quick: a smoke run of the pipeline (seconds), not a result
    fillers = (0, 4096) if quick else TEST_FILLERS
    t0 = time.perf_counter()
    results = {kind: train_and_eval(kind, steps=steps, fillers=fillers) for kind in ("none", "xl", "knn")}
    torch.set_num_threads(threads)
    return render(results, steps=steps, seconds=time.perf_counter() - t0, out_dir=out_dir, figures=figures)


if __name__ == "__main__":
    # python benchmarks/knn_recall.py KIND[,KIND...] STEPS OUT.json : train and test some kinds, keep the results
    # python benchmarks/knn_recall.py render OUT.json [...] : write the markdown section from saved results
    import json
    import sys
    torch.set_num_threads(1)
    if sys.argv[1] == "render":
        results, steps, seconds = {}, 0, 0.0
        for path in sys.argv[2:]:
            saved = json.loads(Path(path).read_text())
            for kind, r in saved.items():
                r["eval"] = {int(f): v for f, v in r["eval"].items()}
                results[kind], steps, seconds = r, r["steps"], seconds + r["train_s"]
        results = {k: results[k] for k in ("none", "xl", "knn") if k in results}
        print(render(results, steps=steps, seconds=seconds, out_dir=OUT_DIR, figures=OUT_DIR / "benchmarks"))
    else:
        kinds, steps, out = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
        res = {}
        def interim(step, ev):
            print(f"  interim step {step}:", {f: round(v["accuracy"], 3) for f, v in ev.items()}, flush=True)
        for kind in kinds:
            res[kind] = train_and_eval(kind, steps=steps, verbose=True, report=(1000, interim))
            out.write_text(json.dumps(res))
            print(kind, {f: round(v["accuracy"], 3) for f, v in res[kind]["eval"].items()}, flush=True)
