"""kNN memory quality: associative recall at long distances, none vs xl vs knn.

Pairs ``k v`` are stated, filler follows, then every pair is queried (``longmem.data.tasks.recall``).
Three models of the same size and segment length 128 are trained the same way on short distances
(filler 0-512 tokens), then tested at distances up to 8K tokens: ``none`` (no memory), ``xl``
(mem_len 128) and ``knn`` (kNN memory in the top block, Wu et al. 2022). The kNN memory is detached,
so the keys and values it stores are learned through the same layer's local attention; that is why
training mixes short distances (pairs inside the window) with long ones (pairs only in the kNN memory).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from longmem import MemoryConfig, MemoryLM, ModelConfig
from longmem.data.tasks.recall import RecallTask, recall_accuracy

OUT_DIR = Path(__file__).resolve().parents[1]
TASK = RecallTask(n_keys=64, n_values=64, n_filler=64)
SEG = 128
N_PAIRS = 32
TRAIN_FILLERS = (0, 32, 64, 128, 256, 512)
TEST_FILLERS = (0, 128, 512, 1024, 2048, 4096, 8192)
BINS = [0, 128, 256, 512, 1024, 2048, 4096, 8192]
STEPS = 300


def make_model(kind: str, *, capacity: int = 1024) -> MemoryLM:
    torch.manual_seed(0)
    mem = {"none": MemoryConfig(kind="none"),
           "xl": MemoryConfig(kind="xl", mem_len=SEG),
           "knn": MemoryConfig(kind="knn", mem_len=0, knn_layers=[1], knn_k=32, knn_capacity=capacity)}[kind]
    return MemoryLM(ModelConfig(vocab_size=TASK.vocab_size, d_model=64, n_layers=2, n_heads=4, segment_len=SEG,
                                memory=mem))


def train(model: MemoryLM, *, steps: int, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
          verbose: bool = True) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        filler = TRAIN_FILLERS[int(torch.randint(len(TRAIN_FILLERS), (1,), generator=g))]
        batch = TASK.sample(batch_size=batch_size, n_pairs=N_PAIRS, filler=filler, generator=g)
        out = model(batch.tokens, targets=batch.targets)           # a fresh memory per sequence
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if verbose and (step + 1) % 25 == 0:
            print(f"  step {step + 1}: loss {sum(losses[-25:]) / 25:.3f}", flush=True)
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
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, res in results.items():
        xs = [r["mean_distance"] for r in res["eval"].values()]
        ys = [r["accuracy"] for r in res["eval"].values()]
        ax.plot(xs, ys, marker="o", label=kind)
    ax.axhline(TASK.chance, color="gray", linestyle=":", label="chance")
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


def run(quick: bool) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # small matmuls: one thread is faster on a shared CPU
    steps = 150 if quick else STEPS
    fillers = (0, 512, 4096) if quick else TEST_FILLERS
    results = {}
    t_start = time.perf_counter()
    for kind in ("none", "xl", "knn"):
        model = make_model(kind)
        t0 = time.perf_counter()
        losses = train(model, steps=steps, verbose=False)
        t_train = time.perf_counter() - t0
        if kind == "knn":                    # same weights, a ring large enough for the longest test
            big = make_model("knn", capacity=16384)
            big.load_state_dict(model.state_dict())
            model = big
        results[kind] = {"train_s": t_train, "final_loss": sum(losses[-20:]) / 20,
                         "eval": evaluate(model, batch_size=8, fillers=fillers)}
    torch.set_num_threads(threads)
    png = plot(results, OUT_DIR / "benchmarks" / "knn_recall.png")
    lines = [
        "## kNN memory: associative recall vs distance", "",
        f"Task (`longmem.data.tasks.recall`): {N_PAIRS} pairs `k v` stated, then filler, then every pair queried "
        f"in a random order; {TASK.n_keys} keys, {TASK.n_values} values (chance {TASK.chance:.3f}), disjoint "
        f"filler tokens. Models: 2 layers, d_model 64, 4 heads, segment {SEG}; none | xl (mem_len {SEG}) | "
        f"knn (mem_len 0, kNN memory in block 1, k 32, capacity 1,024 in training and 16,384 at test, "
        f"normalized keys). Each trained {steps} steps of batch 8 on fillers {list(TRAIN_FILLERS)} "
        f"(fresh memory per sequence, loss on answers only), then tested on 8 new sequences per filler "
        f"length ({8 * N_PAIRS} answers each). One CPU thread; {time.perf_counter() - t_start:.0f}s in all.", "",
        "| filler | mean distance | " + " | ".join(results) + " |",
        "|---:|---:|" + "---:|" * len(results),
    ]
    for f in fillers:
        dist = results["knn"]["eval"][f]["mean_distance"]
        accs = " | ".join(f"{results[k]['eval'][f]['accuracy']:.3f}" for k in results)
        lines.append(f"| {f:,} | {dist:,.0f} | {accs} |")
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
        n = per["knn"][1]
        hi_txt = "inf" if hi == float("inf") else f"{int(hi):,}"
        lines.append(f"| [{int(lo):,}, {hi_txt}) | " + " | ".join(
            f"{per[k][0] / per[k][1]:.3f}" for k in results) + f" | {n} |")
    lines += ["", "Training time and final training loss (answers only): " + "; ".join(
        f"{k} {r['train_s']:.0f}s, {r['final_loss']:.3f}" for k, r in results.items()) + ".", ""]
    if png:
        lines += [f"![recall accuracy vs distance]({png.relative_to(OUT_DIR)})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    torch.set_num_threads(1)
    kind, steps = sys.argv[1], int(sys.argv[2])
    m = make_model(kind)
    t0 = time.time()
    losses = train(m, steps=steps)
    print(kind, f"{time.time() - t0:.0f}s", [round(sum(losses[i:i + 20]) / 20, 3) for i in range(0, steps, 20)])
    if kind == "knn":
        big = make_model("knn", capacity=16384)
        big.load_state_dict(m.state_dict())
        m = big
    t0 = time.time()
    r = evaluate(m, batch_size=8, fillers=(0, 512, 4096))
    print({f: round(v["accuracy"], 3) for f, v in r.items()}, f"{time.time() - t0:.0f}s")
