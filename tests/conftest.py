"""Shared fixtures: tiny models on CPU in fp32, seeded."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from longmem.config import MemoryConfig, ModelConfig, TokensConfig
from longmem.models import MemoryLM

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spread_weights(model: MemoryLM, *, seed: int = 0, std: float = 0.3) -> MemoryLM:
    """Re-draw the weights with a large spread.

    The default init (std 0.02) makes attention almost uniform and logits almost
    flat, so a model that mixes up memory slots, positions or lanes would still
    match a reference to 1e-4. With std 0.3 attention is peaked and a wrong key
    changes the logits by O(1).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:                                   # RMSNorm gains
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_config(*, kind: str = "xl", mem_len: int = 16, segment_len: int = 8, vocab_size: int = 37,
                d_model: int = 16, n_layers: int = 2, n_heads: int = 2, n_mem_tokens: int = 3,
                smear_keys: bool = False, token_gate: bool = False, smear_width: int = 2,
                smear_queries: int = 0) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       segment_len=segment_len, smear_keys=smear_keys, smear_width=smear_width,
                       smear_queries=smear_queries,
                       memory=MemoryConfig(kind=kind, mem_len=mem_len,
                                           tokens=TokensConfig(n_tokens=n_mem_tokens,
                                                               gate="sigmoid" if token_gate else "none")))


def tiny_llama(memory: MemoryConfig, *, segment_len: int, n_layers: int = 2, smear_keys: bool = False,
               seed: int = 0, vocab_size: int = 37) -> MemoryLM:
    """A tiny Llama-style model (GQA 4/2 heads, SwiGLU, untied head) in eval mode with spread weights: the
    shape an imported model has, for the memories of pretrained models (retrieval, local_global)."""
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, mlp="swiglu",
                      tie_embeddings=False, segment_len=segment_len, memory=memory, smear_keys=smear_keys)
    torch.manual_seed(seed)
    return spread_weights(MemoryLM(cfg), seed=seed).eval()


def random_tokens(b: int, n: int, seed: int = 1, vocab_size: int = 37) -> torch.Tensor:
    return torch.randint(0, vocab_size, (b, n), generator=torch.Generator().manual_seed(seed))


def feed_pieces(model: MemoryLM, x: torch.Tensor, piece: int, state=None):
    """Read ``x`` (B, N) in pieces of ``piece`` tokens, carrying the state: (logits (B, N, V), final state)."""
    out = []
    for a in range(0, x.shape[1], piece):
        res = model(x[:, a:a + piece], state=state)
        state = res.state
        out.append(res.logits)
    return torch.cat(out, dim=1), state


@pytest.fixture
def make_model():
    """Factory of tiny eval-mode models; the same ``seed`` gives the same weights
    whatever the memory settings (memory adds no parameters)."""
    def make(*, seed: int = 0, **kw) -> MemoryLM:
        model = MemoryLM(tiny_config(**kw))
        return spread_weights(model, seed=seed).eval()
    return make


@pytest.fixture
def one_thread():
    """Token-by-token decoding of tiny models is call overhead; on a shared CPU extra threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tiny_run(path: Path, *, seed: int = 0, kind: str = "xl", mem_len: int = 64, segment_len: int = 8):
    """A run directory (config, weights, byte tokenizer) of a tiny spread-weight model, loaded back."""
    from longmem.config import RunConfig
    from longmem.data.tokenizer import ByteTokenizer, save_tokenizer
    from longmem.runs import CONFIG, TOKENIZER, WEIGHTS, load_run
    from longmem.training.checkpoint import save_weights
    cfg = RunConfig().override({"model.vocab_size": "256", "model.d_model": "16", "model.n_layers": "2",
                                "model.n_heads": "2", "model.segment_len": str(segment_len),
                                "memory.kind": kind, "memory.mem_len": str(mem_len)})
    model = spread_weights(MemoryLM(cfg.model), seed=seed, std=0.5).eval()
    path.mkdir(parents=True)
    cfg.save(path / CONFIG)
    save_weights(model, path / WEIGHTS)
    save_tokenizer(ByteTokenizer(), path / TOKENIZER)
    return load_run(path)


def make_tiny_chat_run(path: Path, *, seed: int = 0, kind: str = "xl", mem_len: int = 512, segment_len: int = 16):
    """A run like :func:`make_tiny_run` whose tokenizer is a pretrained one with a chat template: the tiny
    byte-level BPE of ``tests/pretrained/tiny_pretrained.py`` (ChatML special tokens, SmolLM2's template)."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "pretrained"))
    from tiny_pretrained import CHATML, tiny_tokenizer

    from longmem.config import RunConfig
    from longmem.data.tokenizer import PretrainedTokenizer, save_tokenizer
    from longmem.runs import CONFIG, TOKENIZER, WEIGHTS, load_run
    from longmem.training.checkpoint import save_weights
    tok = PretrainedTokenizer(tiny_tokenizer(300), config={"chat_template": CHATML, "bos_token": "<|im_start|>",
                                                           "eos_token": "<|im_end|>", "add_bos_token": False})
    cfg = RunConfig().override({"model.vocab_size": str(tok.vocab_size), "model.d_model": "16", "model.n_layers": "2",
                                "model.n_heads": "2", "model.segment_len": str(segment_len), "memory.kind": kind,
                                "memory.mem_len": str(mem_len), "data.tokenizer": "pretrained"})
    model = spread_weights(MemoryLM(cfg.model), seed=seed, std=0.5).eval()
    path.mkdir(parents=True)
    cfg.save(path / CONFIG)
    save_weights(model, path / WEIGHTS)
    save_tokenizer(tok, path / TOKENIZER)
    return load_run(path)


@contextlib.contextmanager
def live_server(app):
    """``app`` served by uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


TIERS = ("unit", "invariant", "parity", "e2e")


def pytest_collection_modifyitems(items):
    """Tiers (STYLE.md): a test marked with none is a unit test (tiny, milliseconds): `pytest -m "not e2e"`."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
