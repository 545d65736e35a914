"""The tokenizer stored in a GGUF file, rebuilt as a Hugging Face ``tokenizers.Tokenizer``.

A GGUF file carries no ``tokenizer.json``: llama.cpp keeps the vocabulary as metadata
(``tokenizer.ggml.*``) and tokenizes with its own code. This module builds the
``tokenizers`` object that tokenizes the same way, following llama.cpp's
``llama-vocab.cpp`` (and transformers' ``integrations/gguf/gguf_tokenizer_mapping.py``):

  tokenizer.ggml.model   "gpt2": byte-level BPE (tokens spelled in GPT-2's byte alphabet, merges given)
                         "llama": SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte fallback,
                                  merges given or derived from the token scores)
  tokenizer.ggml.pre     how byte-level BPE splits text before merging (a regex per model family)
  tokenizer.ggml.token_type  1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
  tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, add_space_prefix
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4
TOKENIZER_MODELS = ("gpt2", "llama")

# GPT-2's split, which most byte-level vocabularies build on (llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in turn, as llama.cpp's llm_tokenizer_bpe does; ignore_merges: a
# whole pre-token found in the vocabulary is one token, llama.cpp's rule for the Llama-3 family).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **{name: ((_GPT2,), False) for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    # digits one by one, then GPT-2's split (StarCoder's tokenizer, reused by SmolLM/SmolLM2)
    **{name: ((r"\p{N}", _GPT2), False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{name: ((_LLAMA3,), True) for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx")},
    **{name: ((_QWEN2,), False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
    **{name: ((_GPT4O,), False) for name in ("gpt-4o", "llama4")},
    "tekken": ((_TEKKEN,), True),
}


def _byte_level(meta: dict[str, Any]):
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with the split of ``tokenizer.ggml.pre``."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"the GGUF tokenizer's pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"supported: {', '.join(sorted(PRE_TOKENIZERS))}.")
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("the GGUF byte-level BPE tokenizer has no merges (tokenizer.ggml.merges).")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}     # a duplicated spelling keeps its first id
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    # llama.cpp splits with each regex in turn; the split pieces are then mapped to GPT-2's byte alphabet.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, processors.ByteLevel(trim_offsets=False)


def _derive_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a SentencePiece BPE vocabulary implies: every split of a token into two tokens, best
    (highest-scoring) result first, ties by the pieces' ids, as transformers' ``generate_merges`` does."""
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    found = []
    for merged, score in zip(tokens, scores):
        for k in range(1, len(merged)):
            left, right = merged[:k], merged[k:]
            if left in ids and right in ids:
                found.append((-score, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece(meta: dict[str, Any]):
    """SentencePiece-style BPE (``tokenizer.ggml.model == "llama"``): spaces as ``▁``, a ``▁`` in front
    of the text and after each special token (llama.cpp's add_space_prefix), unknown bytes as ``<0xNN>``."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _derive_merges(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok, None


def special_token(meta: dict[str, Any], key: str) -> str | None:
    """The spelling of ``tokenizer.ggml.{key}`` (e.g. ``bos_token_id``), or None."""
    i, tokens = meta.get(f"tokenizer.ggml.{key}"), meta["tokenizer.ggml.tokens"]
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def build_tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """``(tokenizer, tokenizer_config)`` from a GGUF file's metadata (key -> value).

    tokenizer_config holds ``chat_template``, ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``,
    ``add_bos_token``, ``add_eos_token`` and the GGUF ``tokenizer_model`` / ``pre_tokenizer`` names.
    Raises ValueError for a file without a vocabulary or with a tokenizer model or pre-tokenizer
    llama.cpp names but longmem does not rebuild.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS or not meta.get("tokenizer.ggml.tokens"):
        found = f"{kind!r}" + ("" if meta.get("tokenizer.ggml.tokens") else " with no vocabulary")
        raise ValueError(f"the GGUF file's tokenizer (tokenizer.ggml.model) is {found}; longmem rebuilds "
                         f"{TOKENIZER_MODELS[0]!r} (byte-level BPE) and {TOKENIZER_MODELS[1]!r} (SentencePiece-style "
                         f"BPE) tokenizers.")
    tok, post = _byte_level(meta) if kind == "gpt2" else _sentencepiece(meta)
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    # Control tokens (<|im_start|>, <s>) are matched whole and skipped by decode(skip_special_tokens);
    # user-defined ones (<think>) are matched whole too but decode as text. Both keep their ids.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    # llama.cpp adds BOS by default for SentencePiece vocabularies, not for byte-level ones.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = special_token(meta, "bos_token_id"), special_token(meta, "eos_token_id")
    steps = [post] if post is not None else []
    head = [bos] if add_bos and bos is not None else []
    tail = [eos] if add_eos and eos is not None else []
    if head or tail:                                # e.g. Llama: "<s> $A", and "<s> $A <s> $B" for pairs
        single = head + ["$A"] + tail
        pair = single + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail]
        special = [(t, tok.token_to_id(t)) for t in dict.fromkeys(head + tail)]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special))
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    config = {"chat_template": meta.get("tokenizer.chat_template"), "bos_token": bos, "eos_token": eos,
              "pad_token": special_token(meta, "padding_token_id"), "unk_token": special_token(meta, "unknown_token_id"),
              "add_bos_token": add_bos, "add_eos_token": add_eos, "tokenizer_model": kind,
              "pre_tokenizer": meta.get("tokenizer.ggml.pre") if kind == "gpt2" else None}
    return tok, config
