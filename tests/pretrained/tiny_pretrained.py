"""Tiny pretrained-style checkpoints built offline for the reader tests: a byte-level BPE tokenizer
shaped like SmolLM2's, random transformers Llama / Qwen2 / Qwen3 models, and GGUF files written the
way llama.cpp's converter writes them (convert_hf_to_gguf.py: names, q/k permutation, metadata)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]       # ids 0, 1, 2 as in SmolLM2
CORPUS = ["The quick brown fox jumps over the lazy dog.", "In 1984, 42 people met at 10:30 in room 7.",
          "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
          "Memory lets a language model remember beyond its window.", "Héllo wörld, naïve café!"] * 4
TEXTS = ["The lazy fox remembers 2024 shells.", "  spaces\tand\nnewlines\n\n", "<|im_start|>user\nHi 123<|im_end|>\n",
         "unknown wörds: zebra, ünïcödé 😀"]


def tiny_tokenizer(vocab_size: int = 300):
    """Byte-level BPE with SmolLM2's pre-tokenizer (digits one by one, then GPT-2's split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def hf_tokenizer(tok, chat_template: str = CHATML):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 unk_token="<|endoftext|>", pad_token="<|im_end|>")
    hf.chat_template = chat_template
    return hf


def tiny_model(kind: str, *, vocab_size: int, tied: bool = False, hidden: int = 32, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, head_dim: int = 8, intermediate: int = 64, seed: int = 0):
    """A random transformers model of ``kind`` (llama | qwen2 | qwen3) with spread weights (std 0.3),
    so a swapped or permuted row changes the comparison by O(1)."""
    import transformers as tf
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[kind]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                     rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1,
                     eos_token_id=2, rope_theta=50000.0)
    if kind == "llama":
        cfg.rope_parameters = {"rope_theta": 50000.0, "rope_type": "default"}
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def save_hf(model, tok, folder: Path, **save_kw) -> Path:
    model.save_pretrained(folder, **save_kw)
    hf_tokenizer(tok).save_pretrained(folder)
    return folder


# -- GGUF, as llama.cpp's convert_hf_to_gguf.py writes it ---------------------------------------------

_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, part = base.split(".", 3)
        return f"blk.{i}.{_GGUF_NAMES[part]}.{kind}"
    return f"{_GGUF_NAMES[base]}.{kind}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_metadata(writer, tok, *, pre: str = "smollm", chat_template: str | None = CHATML,
                       tokens: list[str] | None = None) -> None:
    """tokenizer.ggml.* as the converter writes them for a byte-level BPE vocabulary."""
    import json
    spec = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = tokens or [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def write_gguf(path: Path, model, tok, *, arch: str | None = None, qtype: str = "F32", raw: dict | None = None,
               extra_tensors: dict | None = None, tokens: list[str] | None = None, pre: str = "smollm") -> dict:
    """Write ``model`` as llama.cpp would: 2-D weights of type ``qtype`` (1-D ones stay F32), q/k rows
    permuted for arch "llama". ``raw`` maps a GGUF name to (bytes array, type name) written as is.
    Returns {gguf name: the float array written before quantization (HF layout)}."""
    import gguf
    from gguf import GGMLQuantizationType as T
    c = model.config
    arch = arch or c.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-model")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokenizer_metadata(w, tok, tokens=tokens, pre=pre)
    originals = {}
    state = model.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        g = gguf_name(name)
        a = t.detach().float().numpy().copy()
        originals[g] = a
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            a = permute(a, c.num_attention_heads if ".attn_q." in g else c.num_key_value_heads)
        if raw and g in raw:
            data, tname = raw[g]
            w.add_tensor(g, data, raw_shape=data.shape, raw_dtype=T[tname])
        elif a.ndim == 2 and qtype != "F32":
            q = gguf.quants.quantize(a, T[qtype])
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=T[qtype])
        else:
            w.add_tensor(g, a)
    for g, a in (extra_tensors or {}).items():
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals
