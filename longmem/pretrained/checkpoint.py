"""Pretrained Llama-family checkpoints read into one format, whatever the file.

A :class:`Checkpoint` is what a Hugging Face folder holds, already parsed: the
``config.json`` keys (completed with each model type's defaults), the weights
under Hugging Face parameter names in float32 and in Hugging Face's rotary
layout, a ``tokenizers.Tokenizer``, the tokenizer config (chat template,
special tokens) and the generation config. :func:`read_hf_folder` fills it from
a folder, :func:`read_gguf` (``gguf_reader.py``) from a llama.cpp GGUF file, so
the model mapping sees one format.

Legend
  V  vocabulary size (embedding rows)        H   hidden size (d_model)
  L  layers                                  I   MLP intermediate size
  Nh query heads, Nkv key/value heads        Dh  head dim
  HF Hugging Face (transformers) naming and layout

A supported checkpoint is a stack of Llama-style blocks: pre-RMSNorm, grouped-query
attention with rotary positions (rotate_half layout), optional q/k/v biases
(Qwen2), optional per-head q/k RMSNorm (Qwen3), SwiGLU MLP, final RMSNorm, a tied
or untied output head.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:                                   # tokenizers is a runtime dependency; imported where used
    import tokenizers

# model_type -> the transformers class that loads it (written into config["architectures"] when absent)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

# Defaults of transformers' config classes for keys a config.json may leave out (LlamaConfig,
# MistralConfig, Qwen2Config, Qwen3Config). Qwen3's head_dim defaults to 128, not H / Nh.
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096 * 32),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768, head_dim=128),
}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

# Keys every Checkpoint.config has after completion (HF names, plus four derived block flags):
#   attention_bias      q/k/v projections have biases (Qwen2 always; Llama/Qwen3 when the config says so)
#   attention_out_bias  the output projection has a bias (Llama/Qwen3 with attention_bias; never Qwen2)
#   mlp_bias            gate/up/down have biases (Llama's mlp_bias)
#   qk_norm             per-head RMSNorm on queries and keys before rotary (Qwen3)
#   sliding_window      attention window in tokens if the model uses one, else None
CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
               "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
               "attention_out_bias", "mlp_bias", "qk_norm", "sliding_window", "hidden_act", "bos_token_id",
               "eos_token_id")


@dataclass
class Checkpoint:
    """A pretrained Llama-family model as Hugging Face would hold it in memory.

    config: ``config.json`` keys completed with the model type's defaults; always has
        :data:`CONFIG_KEYS` (``rope_theta`` also when a transformers-5 config keeps it under
        ``rope_parameters``).
    tensors: HF parameter names (``model.embed_tokens.weight`` [V, H],
        ``model.layers.{i}.self_attn.q_proj.weight`` [Nh*Dh, H], ..., ``lm_head.weight`` [V, H] only
        when the head is untied), float32 on CPU, q/k rows in HF's rotate_half layout: exactly the
        ``state_dict()`` transformers would build (minus a tied ``lm_head.weight``).
    tokenizer: a Hugging Face ``tokenizers.Tokenizer``.
    tokenizer_config: ``tokenizer_config.json`` keys: ``chat_template`` (str or None), ``bos_token``,
        ``eos_token``, ``pad_token``, ``unk_token`` (strings or None), ``add_bos_token``, ...
    generation_config: ``generation_config.json`` keys (``eos_token_id`` int or list, ...); {} if none.
    source: the file or folder read.
    """
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: "tokenizers.Tokenizer"
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer_config.get("chat_template")


# -- config -----------------------------------------------------------------------------------------

def _unsupported_type(model_type, source) -> ValueError:
    return ValueError(
        f"{source}: model type {model_type!r} is not supported. longmem reads Llama-family decoders "
        f"(grouped-query attention, SwiGLU, RMSNorm, rotary positions, optional q/k/v biases or q/k norm): "
        f"model types {', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5, Qwen3).")


def complete_config(raw: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """``raw`` (config.json keys) with every key of :data:`CONFIG_KEYS` filled in.

    Missing keys take the defaults of the transformers config class of ``raw["model_type"]``;
    a transformers-5 ``rope_parameters`` dict supplies ``rope_theta`` and ``rope_scaling``.
    Raises ValueError for an unsupported model type, a missing size or a non-SwiGLU MLP.
    """
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _unsupported_type(model_type, source)
    missing = [k for k in _REQUIRED if not isinstance(raw.get(k), int)]
    if missing:
        raise ValueError(f"{source}: config lacks the integer sizes {missing}; a {model_type} config needs "
                         f"{list(_REQUIRED)}.")
    cfg = dict(raw)
    defaults = _DEFAULTS[model_type]
    cfg.setdefault("architectures", [ARCHITECTURES[model_type]])
    if not cfg.get("num_key_value_heads"):
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if not cfg.get("head_dim"):
        cfg["head_dim"] = defaults.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    for key in ("rms_norm_eps", "max_position_embeddings"):
        if cfg.get(key) is None:
            cfg[key] = defaults[key]
    # transformers >= 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": "default" | "llama3" | ...}}
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_theta") is None:
        cfg["rope_theta"] = float(rope.get("rope_theta", defaults["rope_theta"]))
    if cfg.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg.setdefault("rope_scaling", None)
    cfg.setdefault("tie_word_embeddings", False)    # False in all four transformers config classes
    cfg.setdefault("hidden_act", "silu")
    if cfg["hidden_act"] not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported; Llama-family blocks "
                         f"use a SwiGLU MLP (hidden_act 'silu').")
    bias = bool(cfg.get("attention_bias", False))
    cfg["attention_bias"] = True if model_type == "qwen2" else (bias and model_type != "mistral")
    cfg["attention_out_bias"] = cfg["attention_bias"] and model_type in ("llama", "qwen3")
    cfg["mlp_bias"] = bool(cfg.get("mlp_bias", False)) and model_type == "llama"
    cfg["qk_norm"] = model_type == "qwen3"
    # Mistral's config defaults to a 4096-token window; Qwen's window applies only when switched on.
    if model_type == "mistral":
        cfg["sliding_window"] = cfg.get("sliding_window", 4096)
    elif model_type in ("qwen2", "qwen3"):
        cfg["sliding_window"] = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    else:
        cfg["sliding_window"] = None
    cfg.setdefault("bos_token_id", None)
    cfg.setdefault("eos_token_id", None)
    return cfg


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape for a completed config (no ``lm_head.weight`` when tied)."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    Dh, Nh, Nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (Nh * Dh, H), p + "self_attn.k_proj.weight": (Nkv * Dh, H),
                       p + "self_attn.v_proj.weight": (Nkv * Dh, H), p + "self_attn.o_proj.weight": (H, Nh * Dh),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I)})
        if cfg["attention_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": (Nh * Dh,), p + "self_attn.k_proj.bias": (Nkv * Dh,),
                           p + "self_attn.v_proj.bias": (Nkv * Dh,)})
        if cfg["attention_out_bias"]:
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        if cfg["qk_norm"]:
            shapes.update({p + "self_attn.q_norm.weight": (Dh,), p + "self_attn.k_norm.weight": (Dh,)})
        if cfg["mlp_bias"]:
            shapes.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,),
                           p + "mlp.down_proj.bias": (H,)})
    return shapes


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_tensors(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], *, source: str) -> None:
    """Raise ValueError unless ``tensors`` are exactly the names and shapes ``cfg`` implies."""
    want = expected_shapes(cfg)
    problems = []
    if missing := set(want) - set(tensors):
        problems.append(f"missing {_few(missing)}")
    if extra := set(tensors) - set(want):
        problems.append(f"unexpected {_few(extra)}")
    bad = [f"{k} is {tuple(tensors[k].shape)}, expected {want[k]}"
           for k in sorted(set(want) & set(tensors)) if tuple(tensors[k].shape) != want[k]]
    if bad:
        problems.append("; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    if problems:
        raise ValueError(
            f"{source}: the weights do not fit a {cfg['model_type']} model with H={cfg['hidden_size']}, "
            f"L={cfg['num_hidden_layers']}, Nh={cfg['num_attention_heads']}, Nkv={cfg['num_key_value_heads']}, "
            f"Dh={cfg['head_dim']}, I={cfg['intermediate_size']}, V={cfg['vocab_size']}, "
            f"tied head={cfg['tie_word_embeddings']}: " + "; ".join(problems) + ".")


def check_tokenizer_fits(tokenizer, cfg: dict[str, Any], *, source: str) -> None:
    """Raise ValueError if the tokenizer can emit ids the embedding has no row for (V smaller than
    the tokenizer; a larger V is common: rows padded to a multiple of 64 or 128)."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > cfg["vocab_size"]:
        raise ValueError(f"{source}: the tokenizer has {n} tokens but the embedding has {cfg['vocab_size']} rows; "
                         f"the tokenizer must not produce ids past the last row (is it the tokenizer of this model?).")


# -- Hugging Face folder ----------------------------------------------------------------------------

_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def _read_json(path: Path, *, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the {what} is not valid JSON ({e}).") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, found {type(value).__name__}.")
    return value


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, ``model.safetensors``, or
    ``model-XXXXX-of-YYYYY.safetensors`` shards without an index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, what="safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' naming the shard of each tensor.")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        if absent := [f.name for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{folder}: the index names shards that are not there: {absent}.")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if shards := sorted(folder.glob("model-*-of-*.safetensors")):
        return shards
    found = sorted(p.name for p in folder.iterdir())
    if pickles := [n for n in found if n in _PICKLES or n.endswith((".bin", ".pt", ".pth", ".ckpt"))]:
        raise ValueError(
            f"{folder} holds weights only as {pickles}, a pickle format that can run code when loaded, which "
            f"longmem never does. Convert the folder to safetensors first (transformers: "
            f"model = AutoModelForCausalLM.from_pretrained(folder); model.save_pretrained(folder)), then read it.")
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, or model.safetensors.index.json with its "
        f"model-*-of-*.safetensors shards; found {found or 'nothing'}.")


def _read_safetensors(files: list[Path], *, source: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` as float32 (bf16/fp16 upcast), read through a memory map so a
    shard is never held twice."""
    from safetensors import SafetensorError, safe_open
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name in tensors:
                        raise ValueError(f"{source}: tensor {name} appears in more than one shard ({f.name}).")
                    t = st.get_tensor(name)
                    if not t.is_floating_point():
                        raise ValueError(f"{f}: tensor {name} has dtype {t.dtype}; weights must be floating point "
                                         f"(a quantized safetensors export is not supported, use GGUF).")
                    tensors[name] = t.to(torch.float32)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json merged with special_tokens_map.json (older repos) and a chat template
    from ``chat_template.jinja`` / ``chat_template.json`` (newer transformers), which take precedence."""
    tc = _read_json(folder / "tokenizer_config.json", what="tokenizer config") \
        if (folder / "tokenizer_config.json").is_file() else {}
    if (folder / "special_tokens_map.json").is_file():
        for key, value in _read_json(folder / "special_tokens_map.json", what="special tokens map").items():
            tc.setdefault(key, value)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tc[key] = _token_string(tc.get(key))
    template = tc.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json", what="chat template file").get("chat_template")
    if isinstance(template, list):                  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        tc["chat_templates"] = named
        template = named.get("default")
    tc["chat_template"] = template if isinstance(template, str) else None
    return tc


def _read_hf_tokenizer(folder: Path):
    from tokenizers import Tokenizer
    path = folder / "tokenizer.json"
    if not path.is_file():
        spm = " (there is a SentencePiece tokenizer.model: save the tokenizer with transformers' "\
              "AutoTokenizer.from_pretrained(folder).save_pretrained(folder) to write tokenizer.json)" \
            if (folder / "tokenizer.model").is_file() else ""
        raise FileNotFoundError(f"{folder} has no tokenizer.json, the Hugging Face tokenizers file longmem "
                                f"reads{spm}.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:                          # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizers file: {e}") from None


def read_hf_folder(path: str | os.PathLike) -> Checkpoint:
    """Read a local Hugging Face model folder (nothing is downloaded).

    Reads ``config.json``; ``model.safetensors`` or ``model.safetensors.index.json`` + shards (bf16/fp16
    upcast to float32; pickles such as ``pytorch_model.bin`` are refused); ``tokenizer.json``;
    ``tokenizer_config.json`` (+ ``special_tokens_map.json``, ``chat_template.jinja`` or
    ``chat_template.json``); ``generation_config.json`` if present.

    Raises FileNotFoundError for a missing folder, config, weights or tokenizer; ValueError for an
    unsupported model type, weights that do not fit the config, unreadable files, or a tokenizer with
    more tokens than embedding rows.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (a Hugging Face model folder holds config.json, "
                                f"model.safetensors and tokenizer.json).")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face model folder holds config.json, "
                                f"model.safetensors (or shards) and tokenizer.json.")
    source = str(folder)
    cfg = complete_config(_read_json(folder / "config.json", what="model config"), source=source)
    tensors = _read_safetensors(_weight_files(folder), source=source)
    # Older checkpoints saved the rotary inverse frequencies as a buffer; they follow from the config.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)         # some exports store the tied head anyway
    check_tensors(tensors, cfg, source=source)
    tokenizer = _read_hf_tokenizer(folder)
    check_tokenizer_fits(tokenizer, cfg, source=source)
    generation = _read_json(folder / "generation_config.json", what="generation config") \
        if (folder / "generation_config.json").is_file() else {}
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tokenizer, tokenizer_config=_read_tokenizer_config(folder),
                      generation_config=generation, source=source)


def read_gguf(path: str | os.PathLike) -> Checkpoint:
    """Read a llama.cpp GGUF file; see :func:`longmem.pretrained.gguf_reader.read_gguf`."""
    from longmem.pretrained.gguf_reader import read_gguf as _read
    return _read(path)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A Hugging Face folder or a ``.gguf`` file, read into a :class:`Checkpoint`.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it is neither a folder nor a
    GGUF file (checked by its magic bytes, whatever its name), and the readers' errors.
    """
    p = Path(path)
    if p.is_dir():
        return read_hf_folder(p)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; give a Hugging Face model folder or a .gguf file.")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return read_gguf(p)
    raise ValueError(f"{p} is neither a folder nor a GGUF file (it starts with {magic!r}, a GGUF file with "
                     f"b'GGUF'); give a Hugging Face model folder (config.json, model.safetensors, tokenizer.json) "
                     f"or a llama.cpp .gguf file.")
