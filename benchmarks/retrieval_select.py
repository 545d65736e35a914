"""The block search of the retrieval memory (``models/memory/retrieval.py``, ``RetrievalMemory.select``) at
SmolLM2-135M's shapes (3 key heads of 64, 30 layers, bfloat16 store, segments of 512 tokens in 8 query
chunks), against the store size: the scoring einsum it used before (one contraction over heads and
dimensions) and the per-head products summed in float32 it uses now, side by side in one process, rounds
interleaved, medians; and the whole ``select`` per layer, by the torch search and through the persistent
faiss indexes (``memory.retrieval.backend faiss``, flat and HNSW), with the share of the torch search's
blocks each picks and what adding one segment's 512 keys to an index costs.

    python benchmarks/retrieval_select.py [--threads 1] [--sizes 8192,32768,131072] [--no-faiss]

Writes runs/bench/retrieval_select.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from longmem.models.memory.retrieval import RetrievalMemory

ROOT = Path(__file__).resolve().parents[1]
G, DH, LAYERS, SEG, CHUNK = 3, 64, 30, 512, 64


def timed(fn, rounds: int) -> float:
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sizes", default="8192,32768,131072")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss rows")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lines = ["| store entries | einsum (before) ms | per-head products (now) ms | speed-up | select per layer ms | "
             "select x 30 layers per segment s |", "|---:|---:|---:|---:|---:|---:|"]
    extra = ["| store entries | index | select per layer ms | blocks as torch's | add 512 keys ms | index build s |",
             "|---:|---|---:|---:|---:|---:|"]
    for C in (int(x) for x in a.sizes.split(",")):
        g = torch.Generator().manual_seed(C)
        store = torch.randn(1, G, C, DH, generator=g).to(torch.bfloat16)
        qc = torch.randn(1, G, SEG // CHUNK, DH, generator=g).to(torch.bfloat16)
        q = torch.randn(1, 3 * G, SEG, DH, generator=g).to(torch.bfloat16)
        mem = RetrievalMemory(window=1024, n_layers=LAYERS, n_kv_heads=G, head_dim=DH, capacity=C,
                              store_dtype=torch.bfloat16)
        fns = {"einsum": lambda: torch.einsum("bgcd,bgnd->bcn", qc, store).float(),
               "products": lambda: (qc @ store.transpose(-1, -2)).float().sum(dim=1),
               "select": lambda: mem.select(q, store, torch.tensor([C]))}
        torch.testing.assert_close(fns["einsum"](), fns["products"](), rtol=2e-2, atol=0.5)   # bf16 rounding
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()                                                                  # warm-up
        for _ in range(a.rounds):
            for k, fn in fns.items():
                times[k].append(timed(fn, 1))
        m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        lines.append(f"| {C:,} | {m['einsum']:.1f} | {m['products']:.1f} | {m['einsum'] / m['products']:.1f}x | "
                     f"{m['select']:.1f} | {m['select'] * LAYERS / 1e3:.2f} |")
        if not a.no_faiss:
            extra += faiss_rows(mem, q, store, C, a.rounds)
    text = "\n".join(lines) + "\n" + ("" if a.no_faiss else "\n" + "\n".join(extra) + "\n")
    out = ROOT / "runs" / "bench" / "retrieval_select.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text


def faiss_rows(mem: RetrievalMemory, q: torch.Tensor, store: torch.Tensor, C: int, rounds: int) -> list[str]:
    """``select`` through a persistent faiss index of the store (one layer), against the torch search."""
    from longmem.models.memory.retrieval import RetrievalMemory as R, StoreIndexes
    rows = []
    want = set(mem.select(q, store, torch.tensor([C]))[0][0].tolist())
    for kind in ("flat", "hnsw"):
        one = R(window=1024, n_layers=1, n_kv_heads=G, head_dim=DH, capacity=C, store_dtype=torch.bfloat16,
                backend="faiss", index=kind)
        state = one.init(1, device="cpu", dtype=torch.bfloat16)
        before = dataclasses.replace(state, store_k=(store,), written=torch.tensor([C - SEG]))
        t0 = time.perf_counter()
        index = StoreIndexes(before, kind=kind)                    # all but the last segment
        build = time.perf_counter() - t0
        after = dataclasses.replace(before, written=torch.tensor([C]))
        t0 = time.perf_counter()
        index.add(0, store[:, :, C - SEG:], [C - SEG], [SEG], after)
        add = (time.perf_counter() - t0) * 1e3
        got = one.select(q, store, torch.tensor([C]), index, 0)[0][0].tolist()
        ms = statistics.median(timed(lambda: one.select(q, store, torch.tensor([C]), index, 0), 1)
                               for _ in range(rounds)) * 1e3
        rows.append(f"| {C:,} | {kind} | {ms:.1f} | {len(want & set(got)) / len(want):.2f} | {add:.1f} | "
                    f"{build:.1f} |")
    return rows


if __name__ == "__main__":
    main()
