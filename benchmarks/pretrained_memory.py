"""Long memory for a pretrained model with no training (issue 21): SmolLM2-135M-Instruct read far beyond a
window of W = 1,024 tokens with each training-free memory kind, on the long-range suite.

Kinds (``longmem eval RUN --memory.kind ...``, segments of 512 tokens):
- ``window``: the last W tokens only (kind sinks with no sink: plain sliding-window attention);
- ``sinks``: 4 attention sinks + the last W - 4 tokens (StreamingLLM);
- ``retrieval``: 4 sinks + 8 blocks of 64 evicted tokens retrieved per segment + the last W..W+63 tokens
  (InfLLM-style, ``models/memory/retrieval.py``), the store holding every evicted token;
- ``full``: full attention (a cache holding the whole stream), where it fits the model's trained 8,192;
- ``retrieval-128`` (run only when named): retrieval with the first 128 tokens kept instead of 4 sinks
  (InfLLM's initial tokens).

Probes:
- passkey at 2K, 8K, 32K (depths 0.1-0.9, 2 examples each: 10 per length) and 128K (3 examples);
- BABILong-style QA (``qa``): bAbI tasks 1 and 2 (``../shared/data/babi-en``) hidden in Tiny Shakespeare, 3
  solved training stories first (few-shot), the answer after the question's subject restated ("Answer: Mary
  is in the kitchen", ``--cloze``), at 1K, 4K, 16K (20 questions per task) and 64K (5 per task); ``haystack``
  is the same with plain answers ("Answer: kitchen"), the first format, which the model loses beyond 1K;
- perplexity of Tiny Shakespeare read as one stream (every token), by position, against full attention on
  the first 8,192 tokens;
- chat: 20 conversations of >= 8K tokens through the chat template, a code word given in the first turn and
  asked in the last.

Every cell is one JSON file under OUT/cells/, skipped when it exists: the runs are long (a 135M model on
a CPU thread) and resume where they stopped. ``report`` writes OUT/report.md and the plots from the cells.

    python benchmarks/pretrained_memory.py run --run RUN --out runs/bench/pretrained-memory [--only passkey]
    python benchmarks/pretrained_memory.py report --out runs/bench/pretrained-memory
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BOOK, BABI = DATA / "tinyshakespeare.txt", DATA / "babi-en"
W, SEG, SINKS = 1024, 512, 4
KINDS = {
    "window": {"memory.kind": "sinks", "memory.mem_len": str(W), "memory.n_sinks": "0"},
    "sinks": {"memory.kind": "sinks", "memory.mem_len": str(W - SINKS), "memory.n_sinks": str(SINKS)},
    "retrieval": {"memory.kind": "retrieval", "memory.mem_len": str(W), "memory.n_sinks": str(SINKS),
                  "memory.retrieval.block_size": "64", "memory.retrieval.top_k": "8",
                  "memory.retrieval.store_dtype": "bfloat16"},
    "full": {"memory.kind": "sinks", "memory.n_sinks": "0"},                     # mem_len: the whole stream
}
# retrieval keeping the first 128 tokens for good instead of 4 sinks: InfLLM's "initial tokens" (Xiao et al.
# 2024 §4.1 use 128); in the QA probe they hold the solved examples that set the answer format
KINDS["retrieval-128"] = {**KINDS["retrieval"], "memory.n_sinks": "128"}
TRAINED = 8192                                                                    # SmolLM2's context
PASSKEY = {2048: ([0.1, 0.3, 0.5, 0.7, 0.9], 2), 8192: ([0.1, 0.3, 0.5, 0.7, 0.9], 2),
           32768: ([0.1, 0.3, 0.5, 0.7, 0.9], 2), 131072: ([0.25, 0.5, 0.75], 1)}
HAYSTACK = {1024: 20, 4096: 20, 16384: 20, 65536: 5}
PLANNED = dict(HAYSTACK)


def _overrides(kind: str, length: int) -> dict[str, str]:
    o = {"model.segment_len": str(SEG), **KINDS[kind]}
    if kind == "full":
        o["memory.mem_len"] = str(length)
    if kind.startswith("retrieval"):                            # every evicted token kept, up to 128K
        o["memory.retrieval.capacity"] = str(min(131072, max(1024, -(-length // 64) * 64)))
    return o


def _load(run_dir: Path, kind: str, length: int, dtype):
    from longmem.runs import load_run
    run = load_run(run_dir, overrides=_overrides(kind, length))
    run.model.to(dtype)
    return run


def _cell(out: Path, name: str, fn) -> dict | None:
    path = out / "cells" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    res = _in_child(fn)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)
    print(f"  -> {json.dumps({k: v for k, v in res.items() if k != 'results'})[:300]}", file=sys.stderr, flush=True)
    return res


def _in_child(fn) -> dict:
    """Run ``fn`` in a forked child process, so its peak resident memory is the cell's own (``ru_maxrss`` of
    one process only grows): the result with ``seconds`` and ``peak_rss_mib`` (scope ``cell``)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child():
        t0 = time.perf_counter()
        try:
            res = fn()
            res.update(seconds=round(time.perf_counter() - t0, 1), peak_rss_scope="cell",
                       peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
            send.send(("ok", res))
        except BaseException as e:                       # the parent raises it with the child's message
            send.send(("error", f"{type(e).__name__}: {e}"))
    proc = ctx.Process(target=child)
    proc.start()
    send.close()
    try:
        status, res = recv.recv()
    except EOFError:
        status, res = "error", "the child process died (out of memory?)"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"cell failed: {res}")
    return res


def passkey_cells(run_dir: Path, out: Path, kinds, dtype) -> None:
    from longmem.evaluation.suite import eval_probe
    for length, (depths, n) in PASSKEY.items():
        for kind in kinds:
            if kind == "full" and length > TRAINED:
                continue
            _cell(out, f"passkey-{kind}-{length}", lambda: eval_probe(
                _load(run_dir, kind, length, dtype), "passkey", lengths=[length], depths=depths, n=n, seed=0,
                batch_size=1 if length > 32768 else 2, show_progress=False))


def haystack_cells(run_dir: Path, out: Path, kinds, dtype, *, cloze: bool = False) -> None:
    """BABILong-style QA cells, ``haystack-KIND-LENGTH``; ``cloze``: the answer follows the question's subject
    restated ("Answer: Mary is in the kitchen", ``longmem eval --cloze``), cells ``qa-KIND-LENGTH``."""
    from longmem.evaluation.suite import eval_probe
    for length, n in HAYSTACK.items():
        for kind in kinds:
            if kind == "full" and length > TRAINED:
                continue

            def cell():
                run = _load(run_dir, kind, length, dtype)
                run.config.task.babi_tasks = "1,2"
                return eval_probe(run, "haystack", lengths=[length], depths=[], n=n, seed=0, shots=3,
                                  batch_size=1 if length > 16384 else 4, babi_path=str(BABI),
                                  distractor=str(BOOK), cloze=cloze, show_progress=False)
            planned = n == PLANNED.get(length)
            _cell(out, f"{'qa' if cloze else 'haystack'}-{kind}-{length}" + ("" if planned else f"-n{n}"), cell)


@torch.no_grad()
def book_cells(run_dir: Path, out: Path, kinds, dtype, *, bucket: int = 8192, tokens: int = 0) -> None:
    """Loss of every token of the book read as one stream, per bucket of positions; ``tokens`` > 0 reads only
    the first ``tokens`` (``--book-tokens``; the cell's name then carries the length: ``book-sinks-65536``)."""
    def stream_losses(kind: str, limit: int | None):
        run = _load(run_dir, kind, limit or 65536, dtype)            # retrieval: the last 64K tokens kept
        ids = run.tokenizer.encode(BOOK.read_text(encoding="utf-8"))
        ids = ids[:limit] if limit else ids
        x = torch.tensor([ids])
        state, sums = None, []
        for a in range(0, x.shape[1] - 1, SEG):
            seg, tgt = x[:, a:a + SEG], x[:, a + 1:a + SEG + 1]
            res = run.model(seg[:, :tgt.shape[1]], state=state)
            state = res.state
            nll = torch.nn.functional.cross_entropy(res.logits[0].float(), tgt[0], reduction="none")
            sums.extend(nll.tolist())
        buckets = [sum(sums[i:i + bucket]) / len(sums[i:i + bucket]) for i in range(0, len(sums), bucket)]
        return {"kind": kind, "tokens": len(sums), "loss": sum(sums) / len(sums),
                "first_8k_loss": sum(sums[:TRAINED]) / len(sums[:TRAINED]), "bucket": bucket,
                "bucket_loss": buckets, "max_position_seen": run.model.rope.max_position_seen}
    for kind in kinds:
        limit = TRAINED + 1 if kind == "full" else (tokens + 1 if tokens else None)
        _cell(out, f"book-{kind}" + (f"-{tokens}" if tokens and kind != "full" else ""),
              lambda: stream_losses(kind, limit))


FACT = 'Remember this: the code word is "{word}". Just reply Noted.'
QUESTION = "What is the code word? Answer with the word."
CODE_WORDS = ["amber", "falcon", "violet", "harbor", "cobalt", "meadow", "saffron", "glacier", "ember", "willow",
              "quartz", "lantern", "orchid", "thistle", "canyon", "juniper", "marble", "sparrow", "topaz", "velvet"]


@torch.no_grad()
def chat_cells(run_dir: Path, out: Path, kinds, dtype, *, conversations: int = 20, length: int = 8192,
               passages: str = "book") -> None:
    """A code word given in the first turn of a conversation, asked in its last after >= ``length`` tokens of
    turns (passages of the book to read, answered "Noted."), through the model's chat template; the answer
    is generated greedily and counts when it holds the word."""
    from longmem.generation.decoding import Decoder
    from longmem.generation.generate import TextStream
    from longmem.generation.processors import SamplingConfig
    from longmem.pretrained.chat_template import TurnRenderer, template_variables
    from longmem.data.tasks.probes import FILLER
    book = BOOK.read_text(encoding="utf-8") if passages == "book" else FILLER * 40

    def cell(kind: str) -> dict:
        run = _load(run_dir, kind, 4 * length, dtype)
        tok, results = run.tokenizer, []
        stops = list(tok.end_of_turn().strings)
        for c in range(conversations):
            rng = random.Random(f"chat/{c}")
            word = CODE_WORDS[c % len(CODE_WORDS)]
            turns = TurnRenderer(tok.chat_template, template_variables(tok.config))
            dec, state, fed = Decoder(run.model), None, 0

            def feed(text: str):
                nonlocal state, fed
                ids = tok.encode(text)
                _, state = dec.feed(torch.tensor([ids]), state)
                fed += len(ids)
            feed(turns.user_turn(FACT.format(word=word), first=True)
                 + "Noted." + stops[0] + turns.closing(stops[0]))
            while fed < length:
                start = rng.randrange(len(book) - 3000) if passages == "book" else 0
                feed(turns.user_turn("Read this passage and reply Noted.\n\n" + book[start:start + 2500], first=False)
                     + "Noted." + stops[0] + turns.closing(stops[0]))
            stream = TextStream(run.model, tok, turns.user_turn(QUESTION, first=False),
                                sampling=SamplingConfig(max_new_tokens=12, temperature=0, stop=stops), state=state,
                                decoder=dec)
            answer = "".join(stream)
            results.append({"conversation": c, "word": word, "tokens": fed, "answer": answer,
                            "correct": word in answer.lower()})
        return {"kind": kind, "accuracy": sum(r["correct"] for r in results) / len(results), "results": results}
    for kind in kinds:
        if kind == "full":
            continue
        _cell(out, f"chat-{kind}" + ("" if passages == "book" else f"-{passages}"), lambda: cell(kind))


def report(out: Path) -> str:
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}
    tables = dict(cells)
    for name in [n for n in cells if "-n" in n and n.startswith(("qa-", "haystack-"))]:
        tables.setdefault(name.rsplit("-n", 1)[0], cells[name])         # fewer questions than planned: the table
    lines = ["# Long memory for a pretrained model (SmolLM2-135M-Instruct), no training", ""]
    for probe, lengths, unit in (("passkey", PASSKEY, "examples"), ("haystack", HAYSTACK, "questions"),
                                 ("qa", HAYSTACK, "questions")):
        rows = [k for k in KINDS if any(f"{probe}-{k}-{n}" in tables for n in lengths)]
        if not rows:
            continue
        lines += [f"## {probe}", "", "| kind | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for k in rows:
            vals = []
            for n in lengths:
                c = tables.get(f"{probe}-{k}-{n}")
                vals.append("-" if c is None else f"{c['accuracy']:.2f} ({sum(r['answers'] for r in c['results'])},"
                            f" {c['seconds'] / 60:.0f} min)")
            lines.append(f"| {k} | " + " | ".join(vals) + " |")
        lines += ["", f"Accuracy ({unit} scored, wall time on one CPU thread)."
                  + (" Answers after the question's subject restated (`--cloze`)." if probe == "qa" else ""), ""]
    books = {name.removeprefix("book-"): c for name, c in cells.items() if name.startswith("book-")}
    if books:
        full = books.get("full")
        lines += ["## Tiny Shakespeare as one stream", "", "| kind | tokens | loss | ppl | ppl on the first 8K | "
                  "/ full attention's | ppl of the last 8K | max position |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, c in books.items():
            vs = f"{math.exp(c['first_8k_loss'] - full['first_8k_loss']):.3f}" if full else "-"
            lines.append(f"| {k} | {c['tokens']:,} | {c['loss']:.4f} | {math.exp(c['loss']):.2f} | "
                         f"{math.exp(c['first_8k_loss']):.2f} | {vs} | {math.exp(c['bucket_loss'][-1]):.2f} | "
                         f"{c['max_position_seen']} |")
        lines.append("")
    chats = {name.removeprefix("chat-"): c for name, c in cells.items() if name.startswith("chat-")}
    if chats:
        lines += ["## Chat that remembers", "", "| kind | passages between fact and question | accuracy | conversations |"
                  " mean tokens |", "|---|---|---:|---:|---:|"]
        for name, c in chats.items():
            kind, _, passages = name.partition("-")
            tokens = sum(r["tokens"] for r in c["results"]) / len(c["results"])
            lines.append(f"| {kind} | {passages or 'book'} | {c['accuracy']:.2f} | {len(c['results'])} | {tokens:,.0f} |")
        lines.append("")
    lines += _costs(cells)
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    _plots(out, tables)
    return text


def _cost_points(cells: dict) -> list[dict]:
    """Per cell measured in its own process (``_in_child``): its kind, the tokens it read in all, the length of
    one of its streams (an example, the book, a conversation), tokens/s and peak resident memory."""
    points = []
    for name, c in cells.items():
        if c.get("peak_rss_scope") != "cell":
            continue
        probe, tail = name.split("-", 1)
        kind = max((k for k in KINDS if tail == k or tail.startswith(k + "-")), key=len)   # kinds may hold "-"
        rest = tail[len(kind) + 1:].split("-")
        if probe == "book":
            tokens = stream = c["tokens"]
        elif probe == "chat":
            per = [r.get("tokens", 0) for r in c["results"]]
            tokens, stream = sum(per), sum(per) / max(len(per), 1)
        else:
            stream = int(rest[0])
            tokens = stream * sum(r["answers"] for r in c["results"])
        points.append({"name": name, "kind": kind, "tokens": tokens, "stream": stream,
                       "tokens_per_s": tokens / c["seconds"], "peak_rss_mib": c["peak_rss_mib"]})
    return points


def _costs(cells: dict) -> list[str]:
    """Tokens/s and peak resident memory of the cells measured in their own process (``_in_child``)."""
    rows = [f"| {p['name']} | {p['kind']} | {p['tokens']:,} | {p['tokens_per_s']:.0f} | {p['peak_rss_mib']:,} |"
            for p in _cost_points(cells)]
    if not rows:
        return []
    return ["## Cost", "", "| cell | kind | tokens read | tokens/s | peak RSS MiB |", "|---|---|---:|---:|---:|",
            *rows, "", "One CPU thread; each cell in its own process (its peak resident memory includes loading the model: "
            "a 2,048-token book cell peaks at 1.8 GiB); tokens/s over the cell's wall time, loading included.",
            ""]


def _plots(out: Path, cells: dict) -> None:
    from longmem.utils import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    axes = grid.ravel()
    for ax, (probe, lengths) in zip(axes[:2], (("passkey", PASSKEY), ("qa", HAYSTACK))):
        for k in KINDS:
            pts = [(n, cells[f"{probe}-{k}-{n}"]["accuracy"]) for n in lengths if f"{probe}-{k}-{n}" in cells]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
        if probe == "qa":                                     # bAbI tasks 1-2: one of 6 places
            ax.axhline(1 / 6, color="grey", linestyle="--", linewidth=1, label="chance (1 of 6 places)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("tokens")
        ax.set_ylabel("accuracy")
        ax.set_title({"qa": "BABILong-style QA, bAbI 1-2 (--cloze)"}.get(probe, probe))
        if ax.lines:
            ax.legend()
    ax = axes[2]
    for name, c in cells.items():
        if name.startswith("book-"):
            k = name.removeprefix("book-")
            ax.plot([(i + 0.5) * c["bucket"] for i in range(len(c["bucket_loss"]))],
                    [math.exp(v) for v in c["bucket_loss"]], ".-", label=k)
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel("perplexity (per bucket)")
    ax.set_title("Tiny Shakespeare, one stream")
    if ax.lines:
        ax.legend()
    ax = axes[3]                                                   # chat: accuracy by kind and passages
    chats = [(name.removeprefix("chat-"), c) for name, c in sorted(cells.items()) if name.startswith("chat-")]
    for i, (label, c) in enumerate(chats):
        ax.bar(i, c["accuracy"], color=f"C{list(KINDS).index(label.removesuffix('-filler'))}")
        ax.text(i, c["accuracy"] + 0.02, f"{c['accuracy']:.2f}", ha="center")          # 0 shows too
    ax.set_xticks(range(len(chats)), [label.removesuffix("-filler") + ("\n(filler)" if label.endswith("-filler")
                                                                        else "\n(book)") for label, _ in chats])
    ax.set_ylim(0, 1.03)
    ax.set_ylabel("accuracy")
    ax.set_title("chat: a code word asked after >= 8K tokens")
    points = _cost_points(cells)
    for ax, key, label in ((axes[4], "tokens_per_s", "tokens/s (one thread)"),
                           (axes[5], "peak_rss_mib", "peak resident memory (MiB)")):
        for j, k in enumerate(KINDS):
            pts = sorted((p["stream"], p[key]) for p in points if p["kind"] == k)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=f"C{j}", label=k)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stream length of one example (tokens)")
        ax.set_ylabel(label)
        ax.set_title("cost per cell, by the length it reads")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pretrained_memory.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "smollm2", help="the imported run")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "pretrained-memory")
    p.add_argument("--only", default="passkey,qa,book,chat", help="comma-separated probes: passkey, qa, haystack "
                   "(qa with plain answers, the first format), book, chat")
    p.add_argument("--kinds", default="window,sinks,retrieval,full",
                   help=f"comma-separated kinds out of {', '.join(KINDS)} (retrieval-128: only when named)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="weights and activations (norms and softmax in float32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-length", type=int, default=0, help="skip probe cells longer than this (0: none)")
    p.add_argument("--n", type=int, default=0, help="qa/haystack: questions per bAbI task and length (default: 20, "
                   "5 at 64K); the cell's name then carries it (qa-retrieval-65536-n3)")
    p.add_argument("--lengths", default="", help="probe cells of these lengths only, comma-separated (default: all)")
    p.add_argument("--passages", default="book", choices=["book", "filler"], help="chat: the turns between the fact "
                   "and the question hold passages of the book, or the passkey's filler sentences")
    p.add_argument("--book-tokens", type=int, default=0, help="book: read the first N tokens only (0: the book)")
    args = p.parse_args(argv)
    if args.action == "report":
        print(report(args.out))
        return 0
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kinds = [k for k in args.kinds.split(",") if k]
    keep = {int(n) for n in args.lengths.split(",") if n}
    for table in (PASSKEY, HAYSTACK):
        for n in [n for n in table if (args.max_length and n > args.max_length) or (keep and n not in keep)]:
            del table[n]
    if args.n:
        HAYSTACK.update({length: args.n for length in HAYSTACK})
    for probe in args.only.split(","):
        book = functools.partial(book_cells, tokens=args.book_tokens)
        chat = functools.partial(chat_cells, passages=args.passages)
        qa = functools.partial(haystack_cells, cloze=True)
        {"passkey": passkey_cells, "haystack": haystack_cells, "qa": qa, "book": book, "chat": chat}[probe](
            args.run, args.out, kinds, dtype)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
