"""Decoding for the task models: a target for each source (seq2seq, greedy or
sampled) and the answer to a story's question (memn2n)."""
from __future__ import annotations

import re

import torch

from longmem.data.tasks.babi import BabiExample, babi_batch, encode_babi
from longmem.classic.pairs import BOS, EOS
from longmem.generation.generate import sample_next


@torch.no_grad()
def decode_seq2seq(model, tokenizer, sources: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, seed: int = 0) -> list[str]:
    """The decoded target of each source: greedy with ``temperature`` 0, else sampled (seeded).

    The encoder runs once; the decoder re-reads the prefix at each step (targets are short)."""
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    if not sources:
        return []
    model.eval()
    device = model.embed.weight.device
    src = [tokenizer.encode(s) or tokenizer.encode(EOS) for s in sources]
    B, S = len(src), max(map(len, src))
    source = torch.zeros(B, S, dtype=torch.long, device=device)
    mask = torch.zeros(B, S, dtype=torch.bool, device=device)
    for b, s in enumerate(src):
        source[b, :len(s)] = torch.tensor(s, device=device)
        mask[b, :len(s)] = True
    bos, eos = tokenizer.encode(BOS)[0], tokenizer.encode(EOS)[0]
    memory, keys = model.encode(source, mask)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.full((B, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model.decode(out, memory, keys)[:, -1]                        # (B, V)
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=gen)
        nxt = nxt.masked_fill(done, eos)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    texts = []
    for row in out[:, 1:].tolist():
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row))
    return texts


def parse_story_prompt(text: str) -> BabiExample:
    """'Mary went to the kitchen. John moved to the garden. Where is Mary?' -> story + question.

    Lines in the bAbI file format (``1 Mary went ...``) work too: leading IDs are dropped."""
    pieces = [p.strip() for p in re.split(r"(?<=[.?!])\s+|\n", text) if p.strip()]
    pieces = [re.sub(r"^\d+\s+", "", p).split("\t")[0].strip() for p in pieces]
    if not pieces or not pieces[-1].endswith("?"):
        raise ValueError("a memn2n prompt is a story and a question ending with '?', e.g. "
                         "'Mary went to the kitchen. Where is Mary?'")
    return BabiExample(task=0, story=pieces[:-1], question=pieces[-1], answer="", supporting=[])


@torch.no_grad()
def answer_story(model, tokenizer, text: str) -> tuple[str, torch.Tensor]:
    """The memn2n answer to the question at the end of ``text`` and its attention (K, M) over the story."""
    ex = parse_story_prompt(text)
    model.eval()
    batch = babi_batch(encode_babi([ex], tokenizer), [0], memory_size=model.config.memory_size)
    batch.pop("answer")
    out = model(**batch)
    return tokenizer.itos[int(out.logits[0].argmax())], out.attention[0]


def task_generate(model, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                  seed: int) -> str:
    """``longmem generate`` for the task models: the decoded target of the prompt as a source
    (seq2seq), or the answer to the story and question in the prompt (memn2n)."""
    if model.config.arch == "seq2seq":
        return decode_seq2seq(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, seed=seed)[0]
    if model.config.arch == "memn2n":
        return answer_story(model, tokenizer, prompt)[0]
    raise ValueError(f"model.arch={model.config.arch!r} is a language model: use generate_text")
