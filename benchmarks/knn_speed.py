"""kNN memory speed (issue 5, issue 22 item 1): training throughput with kNN memory vs XL alone (the exact torch
search, and the persistent faiss indexes at 8,192 entries), and retrieval time for one (lane, head) store: the exact
search against the previous one (side by side), and each approximate setting of the persistent per-lane indexes
(build once, update per segment, search, recall@k against the exact result).

    python benchmarks/knn_speed.py [--quick] [--out runs/bench/knn_speed]

One CPU thread (torch and faiss). Writes ``knn_speed.md`` and ``knn_speed.json`` to ``--out`` and prints the
markdown; ``longmem bench`` calls ``run(quick)``.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longmem import MemoryConfig, MemoryLM, ModelConfig
from longmem.bench import interleaved_rates, train_rates
from longmem.models.memory.knn import FifoIndex, Scratch, torch_search

WIDTH = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4)
SEG, BATCH, K = 128, 8, 32
ROOT = Path(__file__).resolve().parents[1]
# approximate training rows at 8,192 entries: (label, knn options)
APPROX_TRAIN = {"ivf": dict(backend="faiss", index="ivf", nprobe=8),
                "hnsw": dict(backend="faiss", index="hnsw", hnsw_m=16, ef_search=64)}
# approximate retrieval settings: (label, FifoIndex options)
APPROX = [("ivf nprobe 8", dict(kind="ivf", nprobe=8)), ("ivf nprobe 32", dict(kind="ivf", nprobe=32)),
          ("hnsw M 32 ef 32", dict(kind="hnsw", hnsw_m=32, ef_search=32)),
          ("hnsw M 32 ef 64", dict(kind="hnsw", hnsw_m=32, ef_search=64)),
          ("hnsw M 32 ef 128", dict(kind="hnsw", hnsw_m=32, ef_search=128))]


def _model(kind: str, *, capacity: int = 0, **knn) -> MemoryLM:
    torch.manual_seed(0)
    mem = (MemoryConfig(kind="xl", mem_len=SEG) if kind == "xl" else
           MemoryConfig(kind="knn", mem_len=SEG, knn=dict(k=K, capacity=capacity, **knn)))
    return MemoryLM(ModelConfig(**WIDTH, segment_len=SEG, memory=mem))


def _full_memory(model: MemoryLM, batch: int):
    """A state whose kNN ring is full (random unit keys), so every step searches all C entries."""
    state = model.init_state(batch)
    if state.knn is None:
        return state
    g = torch.Generator().manual_seed(1)
    keys = tuple(F.normalize(torch.randn(k.shape, generator=g), dim=-1) for k in state.knn.keys)
    values = tuple(torch.randn(v.shape, generator=g) for v in state.knn.values)
    return type(state)(batch_size=batch, xl=state.xl,
                       knn=type(state.knn)(keys=keys, values=values, written=torch.full((batch,), keys[0].shape[2])))


def train_throughput(*, quick: bool, capacities=None, approximate: bool | None = None) -> dict:
    capacities = capacities or ((1024, 8192) if quick else (1024, 2048, 4096, 8192))
    approximate = not quick if approximate is None else approximate
    steps, repeats = (2, 3) if quick else (6, 5)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (steps, BATCH, SEG + 1), generator=g)
    runs = {"xl": _model("xl")}
    for c in capacities:
        runs[f"knn_{c}"] = _model("knn", capacity=c)
    if approximate:
        for name, opts in APPROX_TRAIN.items():
            runs[f"knn_8192_{name}"] = _model("knn", capacity=8192, **opts)
    # the memory starts full and stays full: the ring only ever overwrites
    return train_rates({name: (m, torch.optim.AdamW(m.parameters(), lr=1e-4), _full_memory(m, BATCH))
                        for name, m in runs.items()}, data, repeats=repeats)


# -- the exact search before issue 22 (kept here to measure against, side by side) --------------------------
@torch.no_grad()
def previous_search(queries, keys, count, *, k: int, chunk: int = 4096):
    """longmem <= 0.3's exact search: per chunk of 4,096 entries one matmul into a fresh tensor over all lanes and
    heads, a two-stage block top-k, the chunks merged."""
    B, H, T, _ = queries.shape
    used = min(int(count.max()), keys.shape[2])
    cand_s, cand_i = [], []
    for c0 in range(0, used, chunk):
        c1 = min(c0 + chunk, used)
        s = queries @ keys[:, :, c0:c1].transpose(-1, -2)
        ts, ti = _previous_topk(s, min(k, c1 - c0))
        cand_s.append(ts)
        cand_i.append(ti + c0)
    s, i = torch.cat(cand_s, -1), torch.cat(cand_i, -1)
    best, j = s.topk(k, dim=-1, sorted=False)
    return best, i.gather(-1, j)


def _previous_topk(s, k):
    n = s.shape[-1]
    g = 2 ** int(math.log2(max(1.0, math.sqrt(n / max(k, 1)))))
    if n % g or n // g < 4 * k or g < 4:
        return s.topk(k, dim=-1, sorted=False)
    lead, nb = s.shape[:-1], n // g
    _, block = s.reshape(*lead, g, nb).amax(-2).topk(k, dim=-1, sorted=False)
    slot = (block.unsqueeze(-2) + torch.arange(0, n, nb, device=s.device).view(g, 1)).flatten(-2)
    best, j = s.gather(-1, slot).topk(k, dim=-1, sorted=False)
    return best, slot.gather(-1, j)


def exact_search(*, quick: bool) -> list[dict]:
    """The training step's search (8 lanes x 4 heads x 128 queries, k = 32, unit keys of 32) at each capacity:
    the exact search now and before, side by side (interleaved rounds, medians), and their results compared."""
    rows = []
    scratch = Scratch()
    for C in ((2048, 8192) if quick else (1024, 2048, 4096, 8192, 32768)):
        g = torch.Generator().manual_seed(C)
        q = F.normalize(torch.randn(BATCH, 4, SEG, 32, generator=g), dim=-1)
        keys = F.normalize(torch.randn(BATCH, 4, C, 32, generator=g), dim=-1)
        count = torch.full((BATCH,), C)
        fns = {"now": lambda: torch_search(q, keys, count, k=K, scratch=scratch),
               "before": lambda: previous_search(q, keys, count, k=K)}

        def turn(name):
            t0 = time.perf_counter()
            fns[name]()
            return 1.0 / (time.perf_counter() - t0)
        rate = interleaved_rates(turn, list(fns), repeats=3 if quick else 5)
        a, b = fns["now"](), fns["before"]()
        same = bool(torch.equal(a[0].sort(-1).values, b[0].sort(-1).values))
        rows.append({"capacity": C, "now_ms": 1e3 / rate["now"], "before_ms": 1e3 / rate["before"],
                     "speedup": rate["now"] / rate["before"], "same_scores": same})
    return rows


def retrieval(*, quick: bool, dim: int = 32, n_queries: int = SEG) -> list[dict]:
    """One (lane, head) store of n unit keys of size ``dim``; one segment of ``n_queries`` queries near stored keys,
    k = 32. Per approximate setting: the persistent index built once over the n entries, then one segment's update
    (128 entries added, the 128 oldest evicted: the ring has wrapped), its search, and recall@32 against the exact
    search over the same n entries."""
    sizes = (8192, 32768) if quick else (8192, 32768, 131072)
    try:
        import faiss
        faiss.omp_set_num_threads(1)
    except ImportError:
        return []
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        keys = F.normalize(torch.randn(n + n_queries, dim, generator=g), dim=-1)   # the last segment comes after
        held = keys[n_queries:]                                                     # entries n_queries .. n + n_queries
        pick = torch.randint(0, n, (n_queries,), generator=g)
        q = F.normalize(held[pick] + 0.5 * torch.randn(n_queries, dim, generator=g) / dim ** 0.5, dim=-1)
        count = torch.tensor([n])
        ring = torch.cat([keys[n:], keys[n_queries:n]])          # slot e % n holds entry e
        t0 = time.perf_counter()
        exact_s, exact_i = torch_search(q.view(1, 1, -1, dim), ring.view(1, 1, n, dim), count, k=K)
        t_exact = time.perf_counter() - t0
        exact_sets = [set(e + n if e < n_queries else e for e in r) for r in exact_i[0, 0].tolist()]   # slot -> entry
        row = {"n": n, "exact_ms": 1e3 * t_exact, "settings": {}}
        built: dict[tuple, FifoIndex] = {}
        for label, opts in APPROX:
            opts = dict(opts)
            kind = opts.pop("kind")
            ef = opts.pop("ef_search", 64)
            key = (kind, tuple(sorted(opts.items())))
            if key not in built:                             # efSearch is a search setting: one graph per M
                ix = FifoIndex(kind=kind, capacity=n, dim=dim, ef_search=ef, **opts)
                store = ring.numpy()
                t0 = time.perf_counter()
                ix.add(keys[:n].numpy(), 0, store=keys[:n].numpy())
                build = time.perf_counter() - t0
                t0 = time.perf_counter()
                ix.add(keys[n:].numpy(), n, store=store)
                ix.evict(n_queries)
                update = time.perf_counter() - t0
                built[key] = ix
                ix.build_s, ix.update_ms = build, 1e3 * update
            ix = built[key]
            ix.ef_search = ef
            if kind == "ivf":
                ix.index.nprobe = min(opts.get("nprobe", 32), ix.nlist)
            qn = q.numpy()
            ix.search(qn, K)
            t0 = time.perf_counter()
            _, got = ix.search(qn, K)
            t_search = time.perf_counter() - t0
            recall = sum(len(s & set(r)) for s, r in zip(exact_sets, got.tolist())) / (n_queries * K)
            row["settings"][label] = {"build_s": ix.build_s, "update_ms": ix.update_ms, "search_ms": 1e3 * t_search,
                                      "recall": recall}
        rows.append(row)
    return rows


def render(tp: dict, ex: list[dict], rt: list[dict], *, command: str, seconds: float) -> str:
    m = WIDTH
    load = os.getloadavg()
    lines = [
        "## kNN memory speed", "",
        f"Made by `{command}` in {seconds:.0f} s, torch {torch.__version__}, one CPU thread (torch and faiss), load "
        f"average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; a shared machine: only "
        "ratios measured side by side mean anything).", "",
        f"Model: {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, segment {SEG}, batch {BATCH}; "
        f"XL mem_len {SEG} in both; kNN memory in one block (3/4 depth), k = {K}, the ring pre-filled so every step "
        "searches all C entries per lane and head; exact search: `torch` backend (scores of groups of (lane, head) "
        "into a reused buffer, recursive block top-k, ring written in place). fp32.", "",
        "### Training throughput, kNN + XL vs XL alone", "",
        "| memory | tokens/s (median) | slowdown vs xl |", "|---|---:|---:|",
    ]
    for name, rate in tp.items():
        if name == "xl":
            label = "xl (mem_len 128)"
        elif name.count("_") == 1:
            label = f"knn + xl, capacity {name.split('_')[1]} per lane, exact"
        else:
            kind = name.split("_")[2]
            opts = ", ".join(f"{k} {v}" for k, v in APPROX_TRAIN[kind].items() if k != "backend")
            label = f"knn + xl, capacity 8192 per lane, faiss persistent {opts}"
        lines.append(f"| {label} | {rate:,.0f} | {tp['xl'] / rate:.2f}x |")
    lines += ["", "Target (issue 22): kNN + XL no more than 1.5x slower than XL alone at 8,192 entries.", "",
              "### Exact search, now and before", "",
              f"One training step's search: {BATCH} lanes x 4 heads x {SEG} queries against C unit keys of 32 per "
              f"lane and head, k = {K}, measured side by side (interleaved rounds, medians). Before: one matmul per "
              "chunk of 4,096 entries over all lanes and heads into a fresh tensor, block top-k, merge (longmem <= "
              "0.3). Both exact: equal scores is checked on the results.", "",
              "| entries per lane | now ms | before ms | speed-up | same scores |", "|---:|---:|---:|---:|---|"]
    for r in ex:
        lines.append(f"| {r['capacity']:,} | {r['now_ms']:.1f} | {r['before_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['same_scores'] else 'NO'} |")
    if rt:
        labels = list(rt[0]["settings"])
        lines += ["", "### Approximate search: persistent per-lane faiss indexes", "",
                  f"One lane and head: n unit keys of size 32, one segment of {SEG} queries near stored keys, k = "
                  f"{K}. Each index is built once over n entries, then updated as the ring moves one segment (128 "
                  "entries added, the 128 oldest evicted; never rebuilt); recall@32 against the exact search over "
                  "the same entries. IVF: sqrt(n) lists, removal by id range; HNSW: graphs of n / 2 consecutive "
                  "entries (generations, dropped when overwritten), evicted ids skipped by a selector.", "",
                  "| entries | exact ms | setting | build s | update ms / segment | search ms | recall@32 |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for r in rt:
            for label in labels:
                s = r["settings"][label]
                lines.append(f"| {r['n']:,} | {r['exact_ms']:.1f} | {label} | {s['build_s']:.1f} | "
                             f"{s['update_ms']:.1f} | {s['search_ms']:.2f} | {s['recall']:.3f} |")
    lines.append("")
    return "\n".join(lines)


def run(quick: bool, *, command: str | None = None) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # one thread: stable timings on a shared CPU
    try:
        import faiss
        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    t0 = time.perf_counter()
    try:
        tp = train_throughput(quick=quick)
        ex = exact_search(quick=quick)
        rt = retrieval(quick=quick)
    finally:
        torch.set_num_threads(threads)
    md = render(tp, ex, rt, command=command or f"python benchmarks/knn_speed.py{' --quick' if quick else ''}",
                seconds=time.perf_counter() - t0)
    run.last = {"train_tokens_per_s": tp, "exact_search": ex, "retrieval": rt, "loadavg": os.getloadavg()}
    return md


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else ROOT / "runs" / "bench" / "knn_speed"
    md = run(quick, command="python benchmarks/knn_speed.py " + " ".join(sys.argv[1:]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "knn_speed.md").write_text(md)
    (out / "knn_speed.json").write_text(json.dumps(run.last, indent=1) + "\n")
    print(md)
