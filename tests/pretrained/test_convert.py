"""Parity with Hugging Face transformers (tier 3): tiny random Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k
norm) models built offline, mapped onto MemoryLM, give the same logits in one call and in pieces with a
memory covering the stream, and the same greedy tokens; export maps back to equal tensors."""
from __future__ import annotations

import pytest
import torch

from longmem.config import MemoryConfig
from longmem.generation.generate import TokenStream
from longmem.generation.processors import SamplingConfig
from longmem.models import MemoryLM
from longmem.pretrained.convert import (export_type, hf_config_from_model, hf_tensors_from_state_dict,
                                        model_config_from_hf, state_dict_from_hf)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.parity

V, N = 101, 300


def tiny_hf(model_type: str, *, seed: int = 0, tie: bool = False):
    """A tiny random model of ``model_type`` with weights spread wide enough that attention is peaked
    (a wrong key or position changes the logits by O(1))."""
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=V, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=tie,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if model_type == "qwen3":
        kw["head_dim"] = 8
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.1))
    return model


def longmem_of(hf, *, segment_len: int, memory: MemoryConfig | None = None) -> MemoryLM:
    config = model_config_from_hf(hf.config.to_dict(), segment_len=segment_len, memory=memory)
    model = MemoryLM(config).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), config), strict=False)
    return model


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_logits_equal_transformers_in_one_call_and_in_pieces(model_type):
    hf = tiny_hf(model_type)
    x = tokens(N)
    with torch.no_grad():
        want = hf(x).logits                                                    # (1, N, V)
        whole = longmem_of(hf, segment_len=N)(x).logits
        torch.testing.assert_close(whole, want, atol=1e-4, rtol=0)
        # segments of 64 with XL memory covering the stream, fed in pieces of 37
        xl = longmem_of(hf, segment_len=64, memory=MemoryConfig(kind="xl", mem_len=N))
        state, got = None, []
        for a in range(0, N, 37):
            out = xl(x[:, a:a + 37], state=state)
            state = out.state
            got.append(out.logits)
        torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-4, rtol=0)
    assert want.abs().max() > 1.0 and want.std() > 0.5                         # not a flat model


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_twenty_greedy_tokens_equal_transformers_generate(model_type):
    hf = tiny_hf(model_type, tie=model_type == "llama")
    prompt = tokens(40, seed=2)
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                           pad_token_id=0)[0, 40:].tolist()
    model = longmem_of(hf, segment_len=32, memory=MemoryConfig(kind="xl", mem_len=64))
    got = list(TokenStream(model, prompt[0].tolist(), sampling=SamplingConfig(max_new_tokens=20, temperature=0)))
    assert got == want


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_export_maps_back_to_the_same_tensors_and_config(model_type, tie):
    hf = tiny_hf(model_type, tie=tie)
    model = longmem_of(hf, segment_len=64)
    assert export_type(model.config) == model_type
    back = hf_tensors_from_state_dict(model.state_dict(), model.config)
    want = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert set(back) == set(want)
    for k in want:
        assert torch.equal(back[k], want[k]), k
    cfg = transformers.AutoConfig.for_model(**hf_config_from_model(model.config))
    again = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    again.load_state_dict(back, strict=False)
    x = tokens(50)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf(x).logits, atol=1e-5, rtol=0)


def test_unsupported_configs_are_refused_by_name():
    base = tiny_hf("llama").config.to_dict()
    for change, match in (({"model_type": "gpt2"}, "gpt2"),
                          ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                          ({"mlp_bias": True}, "mlp_bias"),
                          ({"attention_bias": True}, "o_proj"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")):
        with pytest.raises(ValueError, match=match):
            model_config_from_hf({**base, **change}, segment_len=64)
    with pytest.raises(ValueError, match="sliding attention window"):
        model_config_from_hf({**base, "model_type": "mistral", "sliding_window": 4096}, segment_len=64)
    smear = MemoryLM(model_config_from_hf(base, segment_len=64))
    smear.config.smear_keys = True
    with pytest.raises(ValueError, match="no Hugging Face equivalent: it smears its keys"):
        export_type(smear.config)
