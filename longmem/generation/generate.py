"""Streaming generation that carries the memory state.

With XL memory every new token is one call with the state: the attention
window never grows beyond ``mem_len + 1``. Without memory the model sees the
last ``segment_len`` tokens, recomputed at each step.
"""
from __future__ import annotations

from typing import Iterator

import torch

from longmem.models import MemoryLM


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """logits: (B, V) -> (B,) token ids. temperature 0 is greedy; top_k 0 keeps all tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                 # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: MemoryLM, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0) -> Iterator[int]:
    """Yield ``max_new_tokens`` token ids continuing ``prompt_ids`` (one lane)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    window = model.config.segment_len
    recurrent = getattr(model, "recurrent", False) or (model.xl is not None and model.xl.mem_len > 0)
    history = list(prompt_ids)
    if recurrent:
        out = model(torch.tensor([history], device=device))
        state = out.state
    else:
        out = model(torch.tensor([history[-window:]], device=device))
    logits = out.logits[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, generator=gen)
        tok = int(nxt.item())
        yield tok
        if recurrent:
            out = model(nxt.view(1, 1), state=state)
            state = out.state
        else:
            history.append(tok)
            history = history[-window:]
            out = model(torch.tensor([history], device=device))
        logits = out.logits[:, -1]


def generate_text(model: MemoryLM, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, seed: int = 0) -> Iterator[str]:
    """Yield pieces of text as they are generated (incomplete UTF-8 is held back)."""
    decode = tokenizer.stream_decoder()
    for tok in generate_ids(model, tokenizer.encode(prompt), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, seed=seed):
        piece = decode([tok])
        if piece:
            yield piece
