"""Check longmem's GGUF reader on a real file against transformers' own GGUF loading.

    .venv/bin/python benchmarks/pretrained_read.py PATH/TO/model.gguf

Prints the GGUF metadata that matters to the model mapping, the max |longmem - transformers| per
tensor group, whether the tokenizers give the same ids on a few texts (the chat template's output
among them), and whether the rendered chat prompts agree. Needs transformers, accelerate and gguf
(the dev extra); not part of the test suite since it needs a real model file (SmolLM2-135M-Instruct:
``longmem.pretrained.hub.fetch_known("smollm2-135m-instruct")``).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

TEXTS = ["The capital of France is Paris.", "In 1984, 42 people met at 10:30 in room 7; 3.14159 != 22/7.",
         "  leading spaces,\ttabs\nand\n\nnewlines  ", "Héllo wörld — naïve café, 東京, emoji 😀!",
         "def f(x):\n    return x ** 2  # code", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Germany, in 2024?"}]


def group(name: str) -> str:
    """Tensor group of an HF parameter name: embed, q, k, v, o, q_norm, gate, up, down, norm, lm_head."""
    m = re.search(r"(embed_tokens|q_proj|k_proj|v_proj|o_proj|q_norm|k_norm|gate_proj|up_proj|down_proj|"
                  r"input_layernorm|post_attention_layernorm|lm_head|model\.norm)\.(weight|bias)", name)
    return f"{m.group(1)}.{m.group(2)}" if m else name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longmem.pretrained import read_gguf
    from longmem.pretrained.chat_template import end_of_turn, render_chat, template_variables

    t0 = time.perf_counter()
    ck = read_gguf(args.gguf)
    t_ours = time.perf_counter() - t0
    c, tc = ck.config, ck.tokenizer_config
    print(f"# {args.gguf}\n")
    print("## metadata (as read by longmem)")
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "attention_bias", "qk_norm"):
        print(f"  {key}: {c[key]}")
    for key in ("tokenizer_model", "pre_tokenizer", "bos_token", "eos_token", "pad_token", "unk_token",
                "add_bos_token"):
        print(f"  {key}: {tc.get(key)!r}")
    print(f"  generation_config: {ck.generation_config}")
    stop = end_of_turn(ck.tokenizer, tc, ck.generation_config)
    print(f"  end-of-turn tokens: {list(zip(stop.ids, stop.strings))}")
    print(f"  chat template, first line: {(ck.chat_template or '').splitlines()[0][:120]!r}")
    print(f"  tensors: {len(ck.tensors)}, parameters: {sum(t.numel() for t in ck.tensors.values()):,}; "
          f"read in {t_ours:.1f} s\n")

    t0 = time.perf_counter()
    ref_model = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32)
    t_ref = time.perf_counter() - t0
    ref = {k: v for k, v in ref_model.state_dict().items()}
    if ck.config["tie_word_embeddings"]:
        ref.pop("lm_head.weight", None)
    print(f"## tensors: longmem vs transformers (from_pretrained(dir, gguf_file=...), {t_ref:.1f} s)")
    only_ours, only_ref = sorted(set(ck.tensors) - set(ref)), sorted(set(ref) - set(ck.tensors))
    print(f"  names only in longmem: {only_ours or 'none'}; only in transformers: {only_ref or 'none'}")
    worst: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    shapes_ok = True
    for name in sorted(set(ck.tensors) & set(ref)):
        a, b = ck.tensors[name], ref[name].float()
        if a.shape != b.shape:
            shapes_ok = False
            print(f"  SHAPE {name}: longmem {tuple(a.shape)} vs transformers {tuple(b.shape)}")
            continue
        worst[group(name)] = max(worst[group(name)], float((a - b).abs().max()))
        count[group(name)] += 1
    for g in sorted(worst):
        print(f"  {g:<34} {count[g]:>3} tensors   max |diff| = {worst[g]:.3g}")
    print(f"  all shapes equal: {shapes_ok}; overall max |diff| = {max(worst.values(), default=0.0):.3g}\n")

    print("## tokenizer: longmem's rebuilt tokenizers.Tokenizer vs AutoTokenizer.from_pretrained(dir, gguf_file=...)")
    hf_tok = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    rendered = render_chat(ck.chat_template, CHAT, add_generation_prompt=True, **template_variables(tc)) \
        if ck.chat_template else None
    ref_rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) \
        if ck.chat_template else None
    print(f"  chat prompt equal to transformers' apply_chat_template: {rendered == ref_rendered}")
    all_same = True
    for text in TEXTS + ([rendered] if rendered else []):
        ours = ck.tokenizer.encode(text).ids
        theirs = hf_tok(text, add_special_tokens=True)["input_ids"]
        same = ours == theirs
        all_same &= same
        round_trip = ck.tokenizer.decode(ours, skip_special_tokens=False) == text
        print(f"  {'same' if same else 'DIFF'} ids ({len(ours)} vs {len(theirs)}), decode round-trips: "
              f"{round_trip}: {text[:50]!r}")
        if not same:
            k = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
            print(f"      first difference at {k}: longmem {ck.tokenizer.decode(ours[k:k + 4])!r} {ours[k:k + 4]} "
                  f"vs transformers {hf_tok.decode(theirs[k:k + 4])!r} {theirs[k:k + 4]}")
    print(f"  token ids identical on all texts: {all_same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
