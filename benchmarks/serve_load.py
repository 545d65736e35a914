"""The server under load: N concurrent clients on loopback for a bounded time.

A real uvicorn server is started on 127.0.0.1 (a free port) over a small model;
each client owns one session and sends completions (every third one streamed)
until the time is up, each request bounded by a timeout. Afterwards the server
is shut down (which writes every session to disk) and each session is replayed
alone through the library: every answer and the final memory must equal what
that client alone would have got. A mixed-up or lost session shows up as a
mismatch.

``python benchmarks/serve_load.py --clients 8 --seconds 30`` runs it alone.
"""
from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SEED_BASE = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_run(folder: Path):
    from longmem.config import RunConfig
    from longmem.data.tokenizer import ByteTokenizer, save_tokenizer
    from longmem.models import MemoryLM
    from longmem.runs import CONFIG, TOKENIZER, WEIGHTS, load_run
    from longmem.training.checkpoint import save_weights
    cfg = RunConfig().override({"model.vocab_size": "256", "model.d_model": "64", "model.n_layers": "2",
                                "model.n_heads": "4", "model.segment_len": "64", "memory.kind": "xl",
                                "memory.mem_len": "128"})
    torch.manual_seed(0)
    model = MemoryLM(cfg.model)
    with torch.no_grad():                                  # peaked attention: memory changes the answers
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    folder.mkdir(parents=True)
    cfg.save(folder / CONFIG)
    save_weights(model, folder / WEIGHTS)
    save_tokenizer(ByteTokenizer(), folder / TOKENIZER)
    return load_run(folder)


def _client(i: int, url: str, deadline: float, log: list, lat: list, errors: list, max_tokens: int) -> None:
    import httpx
    session = f"client{i}"
    k = 0
    with httpx.Client(timeout=60.0) as http:
        while time.time() < deadline:
            prompt = f"[{session} fact {k}: {(i * 7919 + k * 104729) % 100000}] "
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
                    "seed": SEED_BASE + k, "session": session, "stream": k % 3 == 2}
            t0 = time.perf_counter()
            try:
                if body["stream"]:
                    text = ""
                    with http.stream("POST", url, json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"HTTP {r.status_code}")
                        for line in r.iter_lines():
                            if line.startswith("data: ") and line != "data: [DONE]":
                                chunk = json.loads(line[6:])
                                if "error" in chunk:
                                    raise RuntimeError(chunk["error"]["message"])
                                text += chunk["choices"][0]["text"]
                else:
                    r = http.post(url, json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    text = r.json()["choices"][0]["text"]
            except Exception as e:                         # counted, reported
                errors.append(f"{session} request {k}: {e}")
                break
            lat.append(time.perf_counter() - t0)
            log.append((prompt, body["seed"], text))
            k += 1


def load_test(*, clients: int, seconds: float, max_tokens: int = 24, max_batch: int = 8,
              batch_math: str = "exact", live_cap: int = 0) -> dict:
    import uvicorn

    from longmem.generation.generate import TextStream
    from longmem.generation.processors import SamplingConfig
    from longmem.generation.session import SessionStore
    from longmem.serving.config import ServeConfig
    from longmem.serving.server import create_app

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = _make_run(Path(tmp) / "RUN")
        port = _free_port()
        cfg = ServeConfig(host="127.0.0.1", port=port, sessions_dir=str(Path(tmp) / "sessions"),
                          max_live_sessions=live_cap or max(2, clients // 2),   # forces eviction to disk and back
                          max_batch=max_batch, batch_math=batch_math)
        server = uvicorn.Server(uvicorn.Config(create_app(run, cfg), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        logs, lats, errors = [[] for _ in range(clients)], [], []
        deadline = time.time() + seconds
        t0 = time.perf_counter()
        workers = [threading.Thread(target=_client, args=(i, url, deadline, logs[i], lats, errors, max_tokens))
                   for i in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        server.should_exit = True                          # lifespan shutdown writes every session
        thread.join(timeout=60)

        # replay each client's session alone through the library
        store = SessionStore(cfg.sessions_dir, model=run.model)
        mismatched_answers, mismatched_memory = 0, 0
        for i, log in enumerate(logs):
            state = None
            for prompt, seed, text in log:
                s = TextStream(run.model, run.tokenizer, prompt, state=state,
                               sampling=SamplingConfig(max_new_tokens=max_tokens, temperature=0.8, top_k=40,
                                                       seed=seed))
                list(s)
                mismatched_answers += s.text != text
                state = s.state
            saved = store.load(f"client{i}")
            if log and (saved.turns != len(log) or not all(
                    torch.allclose(saved.state.state_dict()[k], v, atol=1e-5)
                    for k, v in state.state_dict().items())):
                mismatched_memory += 1
    lat_ms = sorted(1e3 * x for x in lats)

    def pct(p):
        return lat_ms[min(len(lat_ms) - 1, int(p / 100 * len(lat_ms)))] if lat_ms else float("nan")
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(lat_ms),
            "errors": len(errors), "error_samples": errors[:3], "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "max_ms": lat_ms[-1] if lat_ms else float("nan"),
            "mean_ms": statistics.mean(lat_ms) if lat_ms else float("nan"),
            "mismatched_answers": mismatched_answers, "mismatched_sessions": mismatched_memory,
            "p95_ms": pct(95), "throughput_per_s": len(lat_ms) / wall, "max_batch": max_batch,
            "batch_math": batch_math, "max_tokens": max_tokens, "live_cap": cfg.max_live_sessions}


def run(quick: bool) -> str:
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return "## Server under load\n\nSkipped: the `serve` extra (FastAPI, uvicorn) and httpx are not installed.\n"
    rows = [load_test(clients=n, seconds=5 if quick else 30) for n in ((4, 16) if quick else (4, 16, 32))]
    lines = ["## Server under load", "",
             "`longmem serve` (uvicorn on 127.0.0.1) over a 2-layer d_model 64 XL model (mem_len 128), 1 CPU thread "
             "for the model; N client threads, one session each, sending completions (max_tokens "
             f"{rows[0]['max_tokens']}, temperature 0.8, top-k 40, seeded; every third request streamed) until the "
             "time is up. At most N/2 sessions stay in RAM, so sessions are evicted to disk and read back during "
             "the run. Afterwards every session is replayed alone through the library.", "",
             "| clients | seconds | requests | errors | p50 ms | p95 ms | p99 ms | max ms | answers differing from "
             "the replay | sessions whose memory differs |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['seconds']:.0f} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} "
                     f"| {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['mismatched_answers']} "
                     f"| {r['mismatched_sessions']} |")
    bad = [r for r in rows if r["errors"] or r["mismatched_answers"] or r["mismatched_sessions"]]
    lines += ["", "Target (no errors, no lost or mixed-up session memory): "
              + ("**met**." if not bad else f"**NOT met**: {bad[0]['error_samples']}"),
              "Latency includes waiting in the queue. Requests of different sessions decode together as lanes of "
              "one batch (max_batch 8, batch_math exact: each lane bit for bit as alone); every request of an "
              "over-the-cap client also writes an evicted session to disk (fsync).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-batch", type=int, default=8, help="ServeConfig.max_batch (1: one request at a time)")
    ap.add_argument("--batch-math", default="exact", choices=("exact", "fast"))
    ap.add_argument("--live-cap", type=int, default=0, help="max_live_sessions (default: clients / 2, at least 2)")
    a = ap.parse_args()
    print(json.dumps(load_test(clients=a.clients, seconds=a.seconds, max_tokens=a.max_tokens, max_batch=a.max_batch,
                               batch_math=a.batch_math, live_cap=a.live_cap), indent=1), file=sys.stdout)
