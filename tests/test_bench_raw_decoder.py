"""The raw SDPA decoder that benchmarks/hot_path.py and benchmarks/peers.py hold longmem's plain model to computes
the same function as MemoryLM kind none given the same weights, so their speed ratio compares like with like."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from longmem import MemoryLM, ModelConfig

from conftest import REPO_ROOT

pytestmark = pytest.mark.parity


def test_raw_decoder_equals_memorylm_none_with_copied_weights():
    spec = importlib.util.spec_from_file_location("hot_path_bench", REPO_ROOT / "benchmarks" / "hot_path.py")
    hot_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hot_path)
    size = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    ours = MemoryLM(ModelConfig(**size, segment_len=16))
    raw = hot_path.RawDecoder(**size, segment_len=16)
    sd = ours.state_dict()
    mapped = {"embed.weight": sd["embed.weight"], "norm.weight": sd["norm.weight"]}
    for i in range(size["n_layers"]):
        p = f"blocks.{i}."
        mapped |= {p + "norm1.weight": sd[p + "norm1.weight"], p + "norm2.weight": sd[p + "norm2.weight"],
                   p + "qkv.weight": torch.cat([sd[p + "attn.q.weight"], sd[p + "attn.kv.weight"]]),
                   p + "proj.weight": sd[p + "attn.out.weight"], p + "up.weight": sd[p + "mlp.up.weight"],
                   p + "down.weight": sd[p + "mlp.down.weight"]}
    raw.load_state_dict(mapped)
    for block in raw.blocks:
        block.norm1.eps = block.norm2.eps = ours.config.norm_eps
    raw.norm.eps = ours.config.norm_eps
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    a = ours(tokens[:, :-1], targets=tokens[:, 1:])
    b = raw(tokens[:, :-1], targets=tokens[:, 1:])
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss)
