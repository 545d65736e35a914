"""llama.cpp GGUF files read into a :class:`~longmem.pretrained.checkpoint.Checkpoint`.

The file is read with the ``gguf`` package that llama.cpp publishes: ``GGUFReader``
memory-maps it, so each tensor is dequantized straight from the page cache into its
float32 copy (the file is never held in memory twice). The metadata becomes
Hugging Face config keys, the tensors get Hugging Face names and layout, and the
stored vocabulary becomes a ``tokenizers.Tokenizer`` (``gguf_tokenizer.py``).

Legend
  A     the GGUF architecture name, prefix of its metadata keys ("llama", "qwen2", "qwen3")
  ne    ggml's dimension order, fastest-varying first: a [rows, cols] torch weight is ne = [cols, rows]
  Nh, Nkv, Dh  query heads, key/value heads, head dim

The rotary layout. Hugging Face Llama checkpoints rotate pairs (i, i + Dh/2) of each head
(``rotate_half``); llama.cpp rotates adjacent pairs (2i, 2i+1). Its converter therefore
permutes the rows of the q and k projections of "llama"-architecture models
(``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``):

    w.reshape(n, 2, Dh/2, cols).swapaxes(1, 2).reshape(rows, cols)     n = Nh for q, Nkv for k

and :func:`unpermute_rows` undoes it. Qwen2 and Qwen3 run in llama.cpp with the NEOX
rotary mode, which uses HF's layout, so their tensors are stored unpermuted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longmem.pretrained.checkpoint import (ARCHITECTURES, Checkpoint, check_tensors, check_tokenizer_fits,
                                           complete_config)
from longmem.pretrained.gguf_tokenizer import build_tokenizer

# GGUF architecture -> HF model_type. Mistral's GGUF files say "llama" (same block); Qwen2.5 says "qwen2".
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ROTARY_PERMUTED = ("llama",)                         # archs whose q/k rows the converter permuted

# Tensor types: the ones tested here, then whatever else gguf.quants can dequantize (IQ*, TQ*, ...).
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (without .weight / .bias) -> HF name; "{i}" is the block index.
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor name, or None if it is not part of a Llama-style block."""
    if (m := _BLOCK_NAME.fullmatch(gguf_name)) is not None:
        block, part, kind = m.groups()
        return f"model.layers.{block}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_TOP[base]}.{kind}" if base in _TOP and kind in ("weight", "bias") else None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: [n*Dh, ...] interleaved-pair rows -> HF's half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field_value(field) -> Any:
    """A GGUFReader field as a Python value (str, int, float, bool or a list of them)."""
    from gguf import GGUFValueType
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) < 2 or types[1] == GGUFValueType.ARRAY:
            return None                              # nested arrays: no key longmem reads has them
        if types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if not field.data:
            return []
        values = np.concatenate([field.parts[i] for i in field.data]).tolist()
        return [bool(v) for v in values] if types[1] == GGUFValueType.BOOL else values
    part = field.parts[field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if types[0] == GGUFValueType.BOOL:
        return bool(part[0])
    return part[0].item()


def _open(path: Path):
    """A GGUFReader over ``path``, or a ValueError that says what is wrong with the file."""
    from gguf import GGUFReader
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF file with b'GGUF'.")
    try:
        return GGUFReader(path, "r")
    except Exception as e:                           # numpy/struct errors on a short or garbled file
        raise ValueError(f"{path} could not be read as GGUF: the file is truncated or corrupt "
                         f"({type(e).__name__}: {e}). Size on disk: {path.stat().st_size} bytes.") from None


def _config(meta: dict[str, Any], tensor_names: set[str], embed_rows: int, *, source: str) -> dict[str, Any]:
    """HF config keys from the ``A.*`` metadata (llama.cpp's names, see gguf's constants.Keys)."""
    arch = meta["general.architecture"]

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    need = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
            "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads"}
    if missing := [f"{arch}.{k}" for k in need if not isinstance(get(k), int)]:
        raise ValueError(f"{source}: the GGUF metadata lacks {missing} (integers); a {arch} file from llama.cpp's "
                         f"converter has them.")
    raw: dict[str, Any] = {hf_key: get(key) for key, hf_key in need.items()}
    heads = raw["num_attention_heads"]
    head_dim = get("attention.key_length", raw["hidden_size"] // heads)
    if get("attention.value_length", head_dim) != head_dim or get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{source}: key length {head_dim}, value length {get('attention.value_length')} and "
                         f"rotary dimensions {get('rope.dimension_count')} differ; longmem supports blocks "
                         f"whose keys, values and rotary span one head dim.")
    raw.update(model_type=GGUF_ARCHITECTURES[arch], architectures=[ARCHITECTURES[GGUF_ARCHITECTURES[arch]]],
               num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
               vocab_size=embed_rows, rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
               rope_theta=get("rope.freq_base", 10000.0), tie_word_embeddings="output.weight" not in tensor_names,
               attention_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias="blk.0.ffn_up.bias" in tensor_names,
               max_position_embeddings=get("context_length"), torch_dtype="float32",
               bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
               pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if isinstance(raw["num_key_value_heads"], list):   # per-layer counts (hybrid models) are not Llama blocks
        raise ValueError(f"{source}: per-layer key/value head counts are not supported.")
    scaling, factor = get("rope.scaling.type", "none"), get("rope.scaling.factor")
    if scaling == "linear" and factor:
        raw["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif scaling == "yarn" and factor:
        raw["rope_scaling"] = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings":
                               get("rope.scaling.original_context_length")}
    elif scaling not in ("none", "linear", "yarn"):
        raise ValueError(f"{source}: rotary scaling {scaling!r} is not supported (none, linear, yarn are).")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: the file scales rotary frequencies per dimension (a rope_freqs tensor, "
                         f"Llama 3.1+ 'llama3' rope scaling), which longmem does not read from GGUF yet; read the "
                         f"model's Hugging Face folder instead, whose config.json states the scaling.")
    return complete_config(raw, source=source)


def dequantizable_types() -> tuple[str, ...]:
    """Names of the GGUF tensor types the installed gguf package turns into floats."""
    from gguf import quants
    return ("F32", "F16") + tuple(q.name for q in getattr(quants, "_type_traits", {}))


def _dequantize(t, *, source: str) -> torch.Tensor:
    """A GGUF tensor as float32 torch, in torch's dimension order (ne reversed)."""
    from gguf import GGMLQuantizationType, quants
    try:
        arr = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:                      # integer tensors (I8..I64), F64, types gguf lacks
        others = sorted(set(dequantizable_types()) - set(TESTED_TYPES))
        raise ValueError(f"{source}: tensor {t.name} has type {GGMLQuantizationType(t.tensor_type).name}, which "
                         f"longmem cannot turn into float weights; supported: {', '.join(TESTED_TYPES)} (and, "
                         f"untested, {', '.join(others) or 'nothing else'}).") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    # F32 comes back as a view of the memory map: copy it once; every other type is already a fresh array.
    return torch.from_numpy(arr if arr.flags.owndata and arr.flags.writeable else arr.copy())


def read_gguf(path: str | os.PathLike) -> Checkpoint:
    """Read a llama.cpp GGUF file (a single file; split ``-00001-of-0000N.gguf`` files are not supported).

    Architectures: ``llama`` (Llama 2/3, SmolLM/SmolLM2, Mistral), ``qwen2`` (Qwen2/2.5), ``qwen3``.
    Tensors are dequantized to float32 (:data:`TESTED_TYPES` and the other types ``gguf.quants`` can
    dequantize), renamed to HF names, and for ``llama`` the q/k rows are un-permuted to HF's rotary
    layout, so the result equals what transformers' ``from_pretrained(dir, gguf_file=...)`` builds.
    The tokenizer is rebuilt from ``tokenizer.ggml.*``, the chat template is ``tokenizer.chat_template``.

    Raises FileNotFoundError if there is no file; ValueError for a file that is not GGUF, truncated or
    corrupt, of another architecture, with a tensor of an unknown name or type, with metadata that does
    not fit the tensors, or with a vocabulary larger than the embedding.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a llama.cpp .gguf file).")
    source = str(path)
    reader = _open(path)
    meta = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; longmem reads the Llama-family "
                         f"architectures {', '.join(GGUF_ARCHITECTURES)} (Llama, SmolLM, Mistral, Qwen2/2.5, Qwen3).")
    if meta.get("split.count", 1) != 1:
        raise ValueError(f"{source} is one part of a split GGUF model ({meta['split.count']} parts); merge them "
                         f"first with llama.cpp's gguf-split --merge.")
    by_name = {t.name: t for t in reader.tensors}
    if unknown := [n for n in by_name if hf_name(n) is None and n != "rope_freqs.weight"]:
        raise ValueError(f"{source}: tensors {unknown[:5]} are not part of a Llama-style block (mixture-of-experts, "
                         f"vision or other extra weights); supported tensors: token_embd, output_norm, output, "
                         f"blk.N.{{{', '.join(_BLOCK)}}}.")
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{source}: no token_embd.weight tensor (the token embedding).")
    embed_rows = int(by_name["token_embd.weight"].shape[-1])      # ne = [H, V]
    cfg = _config(meta, set(by_name), embed_rows, source=source)
    tokenizer, tokenizer_config = build_tokenizer(meta)
    check_tokenizer_fits(tokenizer, cfg, source=source)

    tensors: dict[str, torch.Tensor] = {}
    for name, t in by_name.items():
        w = _dequantize(t, source=source)
        if arch in ROTARY_PERMUTED and name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
            w = unpermute_rows(w, cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"])
        key = hf_name(name)
        assert key is not None                                      # unknown names were refused above
        tensors[key] = w
    check_tensors(tensors, cfg, source=source)

    eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    generation = {k: v for k, v in (("bos_token_id", meta.get("tokenizer.ggml.bos_token_id")),
                                    ("eos_token_id", eos[0] if len(eos) == 1 else eos or None),
                                    ("pad_token_id", meta.get("tokenizer.ggml.padding_token_id"))) if v is not None}
    return Checkpoint(config=cfg, tensors=tensors, tokenizer=tokenizer, tokenizer_config=tokenizer_config,
                      generation_config=generation, source=source)
