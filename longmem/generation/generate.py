"""Streaming generation that carries the memory state.

Every new token is one call with the memory (see ``decoding.py``): with XL the
attention window never grows beyond ``mem_len + 1`` keys, without memory a
cache of ``segment_len - 1`` past positions (with optional attention sinks) does
the same, so output length is unlimited in bounded memory. The sampling
controls are the logits processors of ``processors.py``.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from longmem.data.tokenizer import Tokenizer, start_ids
from longmem.generation.decoding import Decoder
from longmem.generation.processors import (GREEDY_BELOW, SamplingConfig, TokenCounts, TopK, apply_processors,
                                           build_processors, sample)
from longmem.models import MemoryLM
from longmem.models.memory import State


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """logits: (B, V) -> (B,) token ids. temperature 0 (below GREEDY_BELOW) is greedy; top_k 0 keeps all tokens."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        logits = TopK(top_k)(logits, None)
    return sample(logits, greedy=False, generator=generator)


class TokenStream:
    """Iterator of token ids continuing ``prompt_ids`` in one lane, memory carried.

    After the iteration ``state`` is the memory after the prompt and every yielded
    token (pass it to the next stream to continue), ``completion_tokens`` the number
    yielded. ``stop()`` ends it early (the last yielded token is still remembered).
    """

    def __init__(self, model: MemoryLM, prompt_ids: list[int], *, sampling: SamplingConfig,
                 state: State | None = None, decoder: Decoder | None = None, attention_sink: int = 4,
                 recompute: bool = False):
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        V = model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {V}), got {bad[:5]}")
        self.model = model
        self.sampling = sampling
        self.decoder = decoder or Decoder(model, attention_sink=attention_sink, recompute=recompute)
        self.procs = build_processors(sampling, vocab_size=V)
        self.prompt_ids = list(prompt_ids)
        self.state = state
        self.completion_tokens = 0
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    @torch.no_grad()
    def __iter__(self) -> Iterator[int]:
        self.model.eval()
        dec = self.decoder
        device = dec.device
        gen = torch.Generator(device=device).manual_seed(self.sampling.seed)
        prompt = torch.tensor([self.prompt_ids], device=device)                     # (1, N)
        counts = TokenCounts.empty(1, self.model.config.vocab_size, device=device)
        counts.add_prompt(prompt)
        logits, self.state = dec.feed(prompt, self.state)                           # (1, V)
        for _ in range(self.sampling.max_new_tokens):
            nxt = sample(apply_processors(self.procs, logits, counts), greedy=self.sampling.greedy,
                         generator=gen)                                             # (1,)
            counts.add_generated(nxt)
            self.completion_tokens += 1
            yield int(nxt.item())
            logits, self.state = dec.feed(nxt.view(1, 1), self.state)             # remember it
            if self._stopped:
                break


class TextStream:
    """Iterator of text pieces; stops at ``max_new_tokens`` or before the first stop string.

    Text that might begin a stop string is held back until it is known not to.
    After the iteration: ``text`` (everything yielded), ``finish_reason`` ("stop" or
    "length"), ``prompt_tokens``, ``completion_tokens`` and ``state``.
    """

    def __init__(self, model: MemoryLM, tokenizer: Tokenizer, prompt: str, *, sampling: SamplingConfig,
                 state: State | None = None, decoder: Decoder | None = None, attention_sink: int = 4,
                 recompute: bool = False):
        self.tokenizer = tokenizer
        self.sampling = sampling
        ids = tokenizer.encode(prompt)
        ids = start_ids(tokenizer, ids) if state is None else ids           # a fresh stream starts a document
        self.tokens = TokenStream(model, ids, sampling=sampling, state=state,
                                  decoder=decoder, attention_sink=attention_sink, recompute=recompute)
        self.prompt_tokens = len(self.tokens.prompt_ids)
        self.text = ""
        self.finish_reason: str | None = None
        self.stopped_by: str | None = None                 # the stop string that ended it

    @property
    def state(self) -> State | None:
        return self.tokens.state

    @property
    def completion_tokens(self) -> int:
        return self.tokens.completion_tokens

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def __iter__(self) -> Iterator[str]:
        stops = self.sampling.stop
        decode = self.tokenizer.stream_decoder()
        pending = ""
        for tok in self.tokens:
            pending += decode([tok])
            hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
            if hits:
                self.stopped_by = min(((pending.find(st), st) for st in stops if pending.find(st) >= 0))[1]
                self.tokens.stop()
                if min(hits):
                    yield self._emit(pending[:min(hits)])
                pending = ""
                self.finish_reason = "stop"
                continue                                      # let the token stream remember the last token
            hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
            out, pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
            if out:
                yield self._emit(out)
        if self.finish_reason is None:
            self.finish_reason = "length"
            if pending:
                yield self._emit(pending)


def generate_ids(model: MemoryLM, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0, **options: Any) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``prompt_ids`` (one lane).

    ``options``: the other :class:`SamplingConfig` fields, ``attention_sink``, ``recompute``.
    """
    decoding = {k: options.pop(k) for k in ("attention_sink", "recompute") if k in options}
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                              **options)
    return iter(TokenStream(model, prompt_ids, sampling=sampling, **decoding))


def generate_text(model: MemoryLM, tokenizer: Tokenizer, prompt: str, *, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, seed: int = 0, **options: Any) -> Iterator[str]:
    """Yield pieces of text as they are generated (incomplete UTF-8 is held back)."""
    decoding = {k: options.pop(k) for k in ("attention_sink", "recompute") if k in options}
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                              **options)
    return iter(TextStream(model, tokenizer, prompt, sampling=sampling, **decoding))
