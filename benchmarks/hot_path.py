"""The model's hot path against plain references, each pair measured side by side in one process (rounds
interleaved, medians), so a busy machine slows both sides alike:

- train: training tokens/s of MemoryLM (kind none) against a raw SDPA decoder of the same size written here
  (nanoGPT's CPU size: 4 layers, d_model 128, 4 heads, batch 12, segment 64; RMSNorm, rotary, GELU MLP,
  ``F.scaled_dot_product_attention``, nothing else), and of XL (mem_len = segment) against none, XL as in
  the paper (the memory's hidden states re-projected by the current weights) and ``xl_kv``, its memory kept as
  the keys/values it was computed with (kind sinks with no sink; what memorizing-transformers-pytorch does).
  Goals (issue 22): none >= 0.95x the raw decoder, xl >= 0.85x none.
- xl_eval: Transformer-XL evaluation against the sliding-window baseline at L = 1,024 (``xl_speed.py``;
  goal >= 500x).
- decode: cached greedy decoding at window 512 against recomputing the window (``gen_memory.py``'s
  setting: 2 layers, d_model 64; goal >= 10x).
- hf: greedy decoding of SmolLM2-135M against transformers on the same weights (``pretrained.py``
  ``speed()``; goal >= 1.0x), when the imported run and the GGUF file are at hand.

    python benchmarks/hot_path.py [--only train,xl_eval,decode,hf] [--quick] [--threads N] [--out runs/bench/hot_path]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZE = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4)


# -- a raw decoder: the reference the plain model is held to -----------------------------------------------
class RawBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        h = q.shape[-1] // 2
        q = q * cos + torch.cat((-q[..., h:], q[..., :h]), dim=-1) * sin            # rotate-half rotary
        k = k * cos + torch.cat((-k[..., h:], k[..., :h]), dim=-1) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                 # (B, H, T, Dh)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class RawDecoder(nn.Module):
    """nanoGPT's shape with Llama's pieces: embedding, pre-norm blocks, final norm, tied head."""

    def __init__(self, *, vocab_size: int, d_model: int, n_layers: int, n_heads: int, segment_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(RawBlock(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        dh = d_model // n_heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, dh, 2).float() / dh))
        f = torch.outer(torch.arange(segment_len).float(), inv)
        self.register_buffer("cos", torch.cat([f.cos(), f.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([f.sin(), f.sin()], -1), persistent=False)

    def forward(self, tokens: torch.Tensor, state=None, targets: torch.Tensor | None = None):
        T = tokens.shape[1]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = F.linear(self.norm(x), self.embed.weight)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else None
        return SimpleNamespace(logits=logits, loss=loss, state=SimpleNamespace(detach=lambda: None))


def train(*, quick: bool, threads: int = 2) -> dict:
    """Training tokens/s: raw decoder, MemoryLM none, MemoryLM xl (mem_len = segment), interleaved."""
    from longmem import MemoryConfig, MemoryLM, ModelConfig
    from longmem.bench import train_rates
    torch.set_num_threads(threads)
    seg, batch = 64, 12
    steps, repeats = (4, 5) if quick else (10, 9)
    data = torch.randint(0, 256, (steps, batch, seg + 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    torch.manual_seed(0)
    raw = RawDecoder(**SIZE, segment_len=seg)
    runs["raw"] = (raw, torch.optim.AdamW(raw.parameters(), lr=1e-4), None)
    # xl_kv: XL's memory kept as the keys/values it was computed with (kind sinks, no sink), as
    # memorizing-transformers-pytorch keeps its XL memory, instead of re-projected by the current weights
    for name, kind in (("none", "none"), ("xl", "xl"), ("xl_kv", "sinks")):
        torch.manual_seed(0)
        m = MemoryLM(ModelConfig(**SIZE, segment_len=seg, memory=MemoryConfig(kind=kind, mem_len=0 if kind == "none"
                                                                                 else seg)))
        runs[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), None)
    med = train_rates(runs, data, repeats=repeats)
    return {"threads": threads, "segment_len": seg, "batch": batch, "tokens_per_s": med,
            "none_over_raw": med["none"] / med["raw"], "xl_over_none": med["xl"] / med["none"],
            "xl_kv_over_none": med["xl_kv"] / med["none"]}


def xl_eval(*, quick: bool, threads: int = 2) -> list[dict]:
    import xl_speed
    torch.set_num_threads(threads)
    return xl_speed.eval_speedup(quick=quick, lengths=(128, 1024) if quick else (128, 256, 512, 1024))


@torch.no_grad()
def decode(*, quick: bool, window: int = 512, threads: int = 1) -> dict:
    """Greedy tokens/s without memory at window W: the cache against recomputing the last W tokens."""
    from gen_memory import _model
    from longmem.generation.generate import TokenStream
    from longmem.generation.processors import SamplingConfig
    torch.set_num_threads(threads)
    model = _model("none", 0, window)
    prompt = torch.randint(0, 256, (window,), generator=torch.Generator().manual_seed(window)).tolist()
    n = {"cached": 100 if quick else 300, "recomputed": 20 if quick else 60}
    rates: dict[str, list[float]] = {"cached": [], "recomputed": []}
    for _ in range(3 if quick else 5):
        for mode in rates:
            s = TokenStream(model, prompt, sampling=SamplingConfig(max_new_tokens=n[mode], temperature=0.0),
                            attention_sink=4, recompute=mode == "recomputed")
            t0 = time.perf_counter()
            toks = list(s)
            rates[mode].append(len(toks) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"window": window, "threads": threads, "tokens_per_s": med, "speedup": med["cached"] / med["recomputed"]}


def hf(*, quick: bool, threads: int = 1) -> list[dict] | None:
    """SmolLM2-135M greedy decoding, longmem vs transformers (``pretrained.speed``), or None without the files."""
    import pretrained
    run_dir = ROOT / "runs" / "bench" / "smollm2"
    gguf = Path.home() / ".cache" / "longmem" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    for folder in ("/tmp/lmcache/smollm2-135m-instruct",):
        if (Path(folder) / gguf.name).is_file():
            gguf = Path(folder) / gguf.name
    if not (run_dir / "config.yaml").is_file() or not gguf.is_file():
        return None
    torch.set_num_threads(threads)
    return pretrained.speed(run_dir, gguf, prompt_len=512, new_tokens=32 if quick else 128,
                            repeats=3 if quick else 5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="train,xl_eval,decode,hf", help="comma-separated parts")
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "hot_path", help="folder for results.json")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for train, xl_eval and decode (0: each part's default: 2, 2, 1)")
    args = p.parse_args(argv)
    parts = args.only.split(",")
    res: dict = {"torch": torch.__version__}
    for name in parts:
        fn = {"train": train, "xl_eval": xl_eval, "decode": decode, "hf": hf}[name]
        res[name] = fn(quick=args.quick, **({"threads": args.threads} if args.threads and name != "hf" else {}))
        print(name, json.dumps(res[name]), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
