"""Llama-family weights and configs to longmem's and back.

Hugging Face names (``model.layers.{i}.self_attn.q_proj.weight`` ...) map onto MemoryLM's blocks:
k_proj and v_proj rows stacked into ``attn.kv``, gate_proj and up_proj rows into ``mlp.up`` (gate
first), ``input_layernorm`` / ``post_attention_layernorm`` to ``norm1`` / ``norm2``. Both use the
rotate-half rotary layout, so q/k rows need no permutation here (GGUF files do; see ``gguf.py``).

Supported model types: Llama (1-3.x, SmolLM/SmolLM2), Mistral (full attention; a sliding window
is refused), Qwen2/2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm).
"""
from __future__ import annotations

import torch

from longmem.config import MemoryConfig, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, rope_scaling) from a config.json of transformers 4 (rope_theta, rope_scaling) or 5
    (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(hf.get("rope_scaling") or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return theta, {}
    if kind not in ("linear", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported; supported: none, linear, llama3")
    return theta, {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": kind}


def model_config_from_hf(hf: dict, *, segment_len: int, memory: MemoryConfig | None = None) -> ModelConfig:
    """The MemoryLM config of a Hugging Face ``config.json`` mapping. ValueError for a model type or an
    option longmem's block does not have, naming it and what is supported."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                         f"(Llama-family blocks: GQA, SwiGLU, RMSNorm, rotary positions)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (the Llama family's SwiGLU uses silu)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias: true is not supported (longmem's MLP has no biases)")
    if model_type == "llama" and hf.get("attention_bias"):
        raise ValueError("attention_bias: true on a llama model also puts a bias on o_proj, which longmem's "
                         "attention does not have; supported: q/k/v biases as in Qwen2")
    if model_type == "qwen3" and hf.get("attention_bias"):
        raise ValueError("attention_bias: true on a qwen3 model also puts a bias on o_proj, which longmem's "
                         "attention does not have")
    window = hf.get("sliding_window")
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        raise ValueError(f"a sliding attention window ({window}) is not supported; longmem's memory kinds "
                         f"(--memory.kind sinks) bound attention instead: set sliding_window to null to import "
                         f"it with full attention")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or d // heads)
    theta, scaling = _rope(hf)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=0 if head_dim * heads == d else head_dim,
        d_ff=int(hf["intermediate_size"]), mlp="swiglu", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias")),
        qk_norm=model_type == "qwen3", segment_len=segment_len, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 0),
        memory=memory or MemoryConfig())


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"the checkpoint has no tensor {name!r}")
    return tensors[name]


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """MemoryLM weights (float32) from Hugging Face tensors of a Llama-family model."""
    c, out = config, {}
    f = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in tensors.items()}
    out["embed.weight"] = _take(f, "embed_tokens.weight")
    for i in range(c.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        out[q + "norm1.weight"] = _take(f, p + "input_layernorm.weight")
        out[q + "norm2.weight"] = _take(f, p + "post_attention_layernorm.weight")
        out[q + "attn.q.weight"] = _take(f, p + "self_attn.q_proj.weight")
        out[q + "attn.kv.weight"] = torch.cat([_take(f, p + "self_attn.k_proj.weight"),
                                               _take(f, p + "self_attn.v_proj.weight")])
        out[q + "attn.out.weight"] = _take(f, p + "self_attn.o_proj.weight")
        if c.qkv_bias:
            out[q + "attn.q.bias"] = _take(f, p + "self_attn.q_proj.bias")
            out[q + "attn.kv.bias"] = torch.cat([_take(f, p + "self_attn.k_proj.bias"),
                                                 _take(f, p + "self_attn.v_proj.bias")])
        if c.qk_norm:
            out[q + "attn.q_norm.weight"] = _take(f, p + "self_attn.q_norm.weight")
            out[q + "attn.k_norm.weight"] = _take(f, p + "self_attn.k_norm.weight")
        out[q + "mlp.up.weight"] = torch.cat([_take(f, p + "mlp.gate_proj.weight"), _take(f, p + "mlp.up_proj.weight")])
        out[q + "mlp.down.weight"] = _take(f, p + "mlp.down_proj.weight")
    out["norm.weight"] = _take(f, "norm.weight")
    if not c.tie_embeddings:
        out["head.weight"] = tensors.get("lm_head.weight", f.get("embed_tokens.weight"))
    return {k: v.float().contiguous() for k, v in out.items()}


def export_type(config: ModelConfig) -> str:
    """The Hugging Face model type a MemoryLM config is, or a ValueError saying why it has none."""
    c = config
    why = []
    if c.arch != "transformer":
        why.append(f"model.arch {c.arch} is a classic baseline")
    if c.mlp != "swiglu":
        why.append("its MLP is gelu (the Llama family's is SwiGLU)")
    if c.smear_keys:
        why.append("it smears its keys (model.smear_keys)")
    if c.memory.kind not in ("none", "xl", "sinks"):
        why.append(f"its memory kind {c.memory.kind!r} has weights of its own (kNN gates, memory tokens)")
    if c.qkv_bias and c.qk_norm:
        why.append("it has both q/k/v biases and q/k norms")
    if c.rope_scaling and c.rope_scaling.get("rope_type") not in ("linear", "llama3"):
        why.append(f"rope scaling {c.rope_scaling}")
    if why:
        raise ValueError("this model has no Hugging Face equivalent: " + "; ".join(why) + ". Export covers "
                         "Llama-family blocks (model.mlp swiglu, no smeared keys) with memory kinds none, xl or "
                         "sinks (memories without weights; a Hugging Face model then attends to its whole context)")
    return "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"


def hf_config_from_model(config: ModelConfig, **extra) -> dict:
    """A Hugging Face ``config.json`` mapping for a MemoryLM config (see :func:`export_type`)."""
    c, model_type = config, export_type(config)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    out = {"architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
           "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads_, "head_dim": c.head_dim_, "hidden_act": "silu",
           "max_position_embeddings": c.max_position_embeddings or max(4096, c.segment_len + c.memory.mem_len),
           "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling or None,
           "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "torch_dtype": "float32"}
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return {**out, **extra}


def hf_tensors_from_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of a MemoryLM state dict (the inverse of :func:`state_dict_from_hf`)."""
    c = config
    G, Dh = c.n_kv_heads_, c.head_dim_
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(c.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "norm1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "norm2.weight"]
        out[p + "self_attn.q_proj.weight"] = sd[q + "attn.q.weight"]
        k, v = sd[q + "attn.kv.weight"].split(G * Dh)
        out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = k, v
        out[p + "self_attn.o_proj.weight"] = sd[q + "attn.out.weight"]
        if c.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = sd[q + "attn.q.bias"]
            kb, vb = sd[q + "attn.kv.bias"].split(G * Dh)
            out[p + "self_attn.k_proj.bias"], out[p + "self_attn.v_proj.bias"] = kb, vb
        if c.qk_norm:
            out[p + "self_attn.q_norm.weight"] = sd[q + "attn.q_norm.weight"]
            out[p + "self_attn.k_norm.weight"] = sd[q + "attn.k_norm.weight"]
        gate, up = sd[q + "mlp.up.weight"].split(c.d_ff)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.down.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
