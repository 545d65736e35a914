"""longmem against its peers: each row one longmem model and one peer of the same size, measured side by side in
one process (rounds interleaved, medians; ``longmem.bench.train_rates``), so a busy machine slows both alike and
only the ratios mean anything (issue 22 item 7).

Size: nanoGPT's CPU size (4 layers, d_model 128, 4 heads of 32, batch 12, segment 64), random bytes, fp32,
``--threads`` CPU threads (default 2). Every model is built through its package's public API; longmem's through
``longmem.MemoryLM(ModelConfig(...))``. The peers keep their own defaults (norms, positions, MLPs) except sizes.

| row | longmem | peer |
|---|---|---|
| none | kind none | a raw SDPA decoder (``hot_path.RawDecoder``: RMSNorm, rotary, GELU, tied head) |
| xl | kind xl, mem_len 64 | x-transformers ``TransformerWrapper(max_mem_len=64)`` (rotary, RMSNorm) |
| xl_mt | kind xl, mem_len 64 | memorizing-transformers-pytorch, ``xl_max_memories=64``, no kNN layer |
| xl_kv | kind sinks, mem_len 64, no sink: XL's memory kept as keys/values | the same peer, which keeps its memory so |
| knn | kind knn (capacity 32,768 per lane, k 32, block 2) + XL 64 | memorizing-transformers-pytorch, same kNN (block 3 of 1-based) + XL |
| tokens | kind tokens, 16 memory tokens, no XL | recurrent-memory-transformer-pytorch, 16 memory tokens, no XL |
| knn_eval | kind knn as above, evaluation (no grad) | memorizing-transformers-pytorch as above |

The peers are not installed with longmem; a row whose peer is missing is skipped and says so. To install them
without touching torch::

    pip install --no-deps x-transformers memorizing-transformers-pytorch recurrent-memory-transformer-pytorch \\
        einops einops-exts faiss-cpu hyper-connections torch-einops-utils einx frozendict loguru joblib cloudpickle

    python benchmarks/peers.py [--quick] [--threads 2] [--only none,xl,xl_mt,xl_kv,knn,tokens,knn_eval] [--out runs/bench/peers]

Writes ``peers.md`` (a markdown table) and ``peers.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from hot_path import SIZE, RawDecoder  # noqa: E402  (the raw decoder the hot path is held to)

from longmem import MemoryLM, ModelConfig  # noqa: E402
from longmem.bench import interleaved_rates, train_rates  # noqa: E402

PIP = ("pip install --no-deps x-transformers memorizing-transformers-pytorch recurrent-memory-transformer-pytorch "
       "einops einops-exts faiss-cpu hyper-connections torch-einops-utils einx frozendict loguru joblib cloudpickle")
SEG, BATCH, MEM, KNN_CAP, KNN_K, N_TOKENS = 64, 12, 64, 32768, 32, 16
HEADS, DIM_HEAD = SIZE["n_heads"], SIZE["d_model"] // SIZE["n_heads"]
PEERS = {"xl": "x_transformers", "xl_mt": "memorizing_transformers_pytorch", "xl_kv": "memorizing_transformers_pytorch",
         "knn": "memorizing_transformers_pytorch",
         "tokens": "recurrent_memory_transformer_pytorch", "knn_eval": "memorizing_transformers_pytorch"}


class Carry:
    """A peer's memory between segments: ``detach()`` cuts the graph like longmem's state (truncated BPTT)."""

    def __init__(self, value):
        self.value = value

    def detach(self) -> "Carry":
        v = self.value
        if isinstance(v, torch.Tensor):
            return Carry(v.detach())
        return Carry(None if v is None else [t.detach() for t in v])


def _out(loss, logits, carry) -> SimpleNamespace:
    return SimpleNamespace(loss=loss, logits=logits, state=carry)


def _ce(logits: torch.Tensor, targets: torch.Tensor | None):
    return None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -- the peers, each behind longmem's calling convention model(tokens, state=, targets=) -> (loss, logits, state) --
class XTransformersXL(nn.Module):
    def __init__(self):
        super().__init__()
        from x_transformers import Decoder, TransformerWrapper
        self.net = TransformerWrapper(
            num_tokens=SIZE["vocab_size"], max_seq_len=SEG, max_mem_len=MEM,
            attn_layers=Decoder(dim=SIZE["d_model"], depth=SIZE["n_layers"], heads=HEADS, attn_dim_head=DIM_HEAD,
                                rotary_pos_emb=True, use_rmsnorm=True))

    def forward(self, tokens, state=None, targets=None):
        logits, mems = self.net(tokens, mems=state.value if state else None, return_mems=True)
        return _out(_ce(logits, targets), logits, Carry(mems))


class Memorizing(nn.Module):
    """memorizing-transformers-pytorch; its kNN memories (faiss + memmaps) live in a temporary folder and are
    created once per model for the batch (``create_knn_memories``), as its ``knn_memories_context`` does."""

    def __init__(self, *, knn: bool):
        super().__init__()
        from memorizing_transformers_pytorch import MemorizingTransformer
        self.tmp = tempfile.TemporaryDirectory(prefix="longmem-peers-")
        self.net = MemorizingTransformer(
            num_tokens=SIZE["vocab_size"], dim=SIZE["d_model"], depth=SIZE["n_layers"], heads=HEADS,
            dim_head=DIM_HEAD, memorizing_layers=(3,) if knn else (), max_knn_memories=KNN_CAP,
            num_retrieved_memories=KNN_K, xl_max_memories=MEM, knn_memories_directory=self.tmp.name)
        self.knn = self.net.create_knn_memories(batch_size=BATCH) if knn else []

    def forward(self, tokens, state=None, targets=None):
        res, xl = self.net(tokens, self.knn, xl_memories=state.value if state else None, labels=targets)
        return _out(res if targets is not None else None, None if targets is not None else res, Carry(xl))

    def close(self):
        if self.knn:
            self.knn.cleanup()
        self.tmp.cleanup()


class RMT(nn.Module):
    def __init__(self):
        super().__init__()
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer
        self.net = RecurrentMemoryTransformer(
            SIZE["d_model"], num_tokens=SIZE["vocab_size"], depth=SIZE["n_layers"], heads=HEADS, dim_head=DIM_HEAD,
            num_memory_tokens=N_TOKENS, seq_len=SEG, use_xl_memories=False)

    def forward(self, tokens, state=None, targets=None):
        res, written, _ = self.net(tokens, state.value if state else None, labels=targets)
        return _out(res if targets is not None else None, None if targets is not None else res, Carry(written))


# -- rows ------------------------------------------------------------------------------------------------------
def _longmem(memory: dict) -> MemoryLM:
    return MemoryLM(ModelConfig(**SIZE, segment_len=SEG, memory=memory))


KNN = dict(kind="knn", mem_len=MEM, knn=dict(capacity=KNN_CAP, k=KNN_K, layers=[2]))
ROWS = {  # name -> (what, longmem memory, peer name, peer builder, training?)
    "none": ("no memory vs a raw PyTorch SDPA decoder", dict(kind="none"), "raw SDPA decoder",
             lambda: RawDecoder(**SIZE, segment_len=SEG), True),
    "xl": (f"XL (mem {MEM}) vs x-transformers XL", dict(kind="xl", mem_len=MEM), "x-transformers",
           XTransformersXL, True),
    "xl_mt": ("XL vs memorizing-transformers-pytorch with kNN off", dict(kind="xl", mem_len=MEM),
              "memorizing-transformers-pytorch", lambda: Memorizing(knn=False), True),
    # the peer keeps its XL memory as the keys and values it computed (detached), not re-projected: longmem's kind
    # sinks with no sink is that memory (a key/value cache of the last mem_len positions)
    "xl_kv": ("XL with cached keys/values (kind sinks, no sink) vs memorizing-transformers-pytorch with kNN off",
              dict(kind="sinks", mem_len=MEM), "memorizing-transformers-pytorch", lambda: Memorizing(knn=False), True),
    "knn": (f"kNN ({KNN_CAP:,} entries per lane, top-{KNN_K}, one layer) + XL vs memorizing-transformers-pytorch",
            KNN, "memorizing-transformers-pytorch", lambda: Memorizing(knn=True), True),
    "tokens": (f"{N_TOKENS} memory tokens vs recurrent-memory-transformer-pytorch",
               dict(kind="tokens", tokens=dict(n_tokens=N_TOKENS)), "recurrent-memory-transformer-pytorch", RMT, True),
    "knn_eval": (f"evaluation, batch {BATCH}: kNN vs memorizing-transformers", KNN, "memorizing-transformers-pytorch",
                 lambda: Memorizing(knn=True), False),
}


def missing(row: str) -> str | None:
    """The module the row's peer lacks (the peer itself or one of its imports, pip --no-deps installs none), or
    None when the peer imports."""
    mod = PEERS.get(row)
    if mod is None:
        return None
    try:
        importlib.import_module(mod)
    except ImportError as e:
        return e.name or str(e)
    return None


@torch.no_grad()
def eval_rates(runs: dict, data: torch.Tensor, *, repeats: int) -> dict[str, float]:
    """Median evaluation tokens/s of each ``name -> model``, side by side like ``train_rates`` (one warm-up pass
    that also fills the memory, then turns), the state carried from turn to turn."""
    states = dict.fromkeys(runs)
    steps, batch, seg = data.shape[0], data.shape[1], data.shape[2] - 1

    def turn(name: str) -> float:
        model, state = runs[name], states[name]
        t0 = time.perf_counter()
        for s in range(steps):
            state = model(data[s, :, :-1], state=state).state
        states[name] = state
        return steps * batch * seg / (time.perf_counter() - t0)

    return interleaved_rates(turn, list(runs), repeats=repeats)


def measure(row: str, *, quick: bool) -> dict:
    what, memory, peer_name, build, training = ROWS[row]
    steps, repeats = (3, 3) if quick else (6, 5)
    data = torch.randint(0, SIZE["vocab_size"], (steps, BATCH, SEG + 1), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ours = _longmem(memory)
    torch.manual_seed(0)
    peer = build()
    try:
        if training:
            runs = {m: (model, torch.optim.AdamW(model.parameters(), lr=1e-4), None)
                    for m, model in (("longmem", ours), ("peer", peer))}
            med = train_rates(runs, data, repeats=repeats)
        else:
            med = eval_rates({"longmem": ours.eval(), "peer": peer.eval()}, data, repeats=repeats)
    finally:
        if hasattr(peer, "close"):
            peer.close()
    return {"row": row, "what": what, "peer": peer_name, "mode": "train" if training else "eval",
            "longmem_tokens_per_s": med["longmem"], "peer_tokens_per_s": med["peer"],
            "ratio": med["longmem"] / med["peer"], "steps": steps, "repeats": repeats}


def table(results: list[dict], skipped: list[dict], *, command: str, threads: int) -> str:
    lines = [f"Made by `{command}`: torch {torch.__version__}, {threads} CPU threads; {SIZE['n_layers']} layers, "
             f"d_model {SIZE['d_model']}, {HEADS} heads, batch {BATCH}, segment {SEG}, random bytes; tokens/s are "
             "medians of interleaved rounds (train: forward + backward + AdamW; eval: forward, no grad).", "",
             "| row | longmem tok/s | peer tok/s | longmem / peer |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['what']} | {r['longmem_tokens_per_s'] / 1e3:.1f}k | {r['peer_tokens_per_s'] / 1e3:.1f}k "
                     f"| {r['ratio']:.2f} |")
    for s in skipped:
        lines.append(f"| {s['what']} | skipped | {s['reason']} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows out of {', '.join(ROWS)}")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and rounds")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "peers", help="folder for peers.md/json")
    args = p.parse_args(argv)
    rows = [r for r in args.only.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)}; accepted: {', '.join(ROWS)}")
    if args.threads <= 0:
        p.error(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)
    results, skipped = [], []
    for row in rows:
        gone = missing(row)
        if gone:
            reason = f"{gone} not installed ({PIP})"
            skipped.append({"row": row, "what": ROWS[row][0], "reason": reason})
            print(f"{row}: skipped, {reason}", file=sys.stderr, flush=True)
            continue
        results.append(measure(row, quick=args.quick))
        print(f"{row}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    command = "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = table(results, skipped, command=command.strip(), threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.md").write_text(md)
    (args.out / "peers.json").write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                                     "quick": args.quick, "rows": results, "skipped": skipped},
                                                    indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
