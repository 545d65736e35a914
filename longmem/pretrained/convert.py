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
from longmem.pretrained.checkpoint import complete_config



def model_config_from_hf(hf: dict, *, segment_len: int, memory: MemoryConfig | None = None) -> ModelConfig:
    """The MemoryLM config of a Hugging Face ``config.json`` mapping (completed with its model type's
    defaults, ``checkpoint.complete_config``). ValueError for a model type or an option longmem's block
    does not have, naming it and what is supported."""
    cfg = complete_config(hf)
    problems = []
    if cfg["attention_out_bias"]:
        problems.append("attention_bias: true on a llama or qwen3 model also puts a bias on o_proj, which longmem's "
                        "attention does not have (supported: q/k/v biases, as Qwen2 has)")
    if cfg["mlp_bias"]:
        problems.append("mlp_bias: true (longmem's MLP has no biases)")
    if cfg["sliding_window"]:
        problems.append(f"a sliding attention window ({cfg['sliding_window']}): longmem's memory kinds bound "
                        f"attention instead (--memory.kind sinks); set sliding_window to null in config.json to "
                        f"import it with full attention")
    scaling = dict(cfg["rope_scaling"] or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        problems.append(f"rope scaling {kind!r} (supported: none, linear, llama3)")
    if problems:
        raise ValueError(f"this {cfg['model_type']} model cannot be imported: " + "; ".join(problems))
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return ModelConfig(
        vocab_size=cfg["vocab_size"], d_model=d, n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg["num_key_value_heads"], head_dim=0 if cfg["head_dim"] * heads == d else cfg["head_dim"],
        d_ff=cfg["intermediate_size"], mlp="swiglu", tie_embeddings=bool(cfg["tie_word_embeddings"]),
        norm_eps=float(cfg["rms_norm_eps"]), qkv_bias=bool(cfg["attention_bias"]), qk_norm=bool(cfg["qk_norm"]),
        segment_len=segment_len, rope_theta=float(cfg["rope_theta"]),
        rope_scaling={} if kind == "default" else {**scaling, "rope_type": kind},
        max_position_embeddings=int(cfg["max_position_embeddings"] or 0), memory=memory or MemoryConfig())


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
    out["head.weight"] = tensors.get("lm_head.weight", out["embed.weight"]) if not c.tie_embeddings else out["embed.weight"]
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
    if c.smear_queries:
        why.append("it mixes keys into its queries (model.smear_queries)")
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
