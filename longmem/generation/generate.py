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

    # -- one step at a time, for a caller that feeds many streams together (serving/engine.py) --------------
    @torch.no_grad()
    def begin(self) -> None:
        """Feed the prompt (alone): the stream is ready for :meth:`draw`."""
        self.model.eval()
        device = self.decoder.device
        self._gen = torch.Generator(device=device).manual_seed(self.sampling.seed)
        prompt = torch.tensor([self.prompt_ids], device=device)                     # (1, N)
        self._counts = TokenCounts.empty(1, self.model.config.vocab_size, device=device)
        self._counts.add_prompt(prompt)
        self._logits, self.state = self.decoder.feed(prompt, self.state)           # (1, V)

    @property
    def finished(self) -> bool:
        """No token left to draw: ``max_new_tokens`` drawn (and fed) or stopped."""
        return self._stopped or self.completion_tokens >= self.sampling.max_new_tokens

    @torch.no_grad()
    def draw(self) -> int:
        """The next token, drawn from the logits after everything fed so far; it must be fed next
        (:meth:`advance` with the logits and state after it)."""
        nxt = sample(apply_processors(self.procs, self._logits, self._counts), greedy=self.sampling.greedy,
                     generator=self._gen)                                           # (1,)
        self._counts.add_generated(nxt)
        self.completion_tokens += 1
        return int(nxt.item())

    def advance(self, logits: torch.Tensor, state: State | None) -> None:
        """After the drawn token was fed: its logits (1, V) and the state after it."""
        self._logits, self.state = logits, state

    def __iter__(self) -> Iterator[int]:
        self.begin()
        device = self.decoder.device
        while not self.finished:
            tok = self.draw()
            yield tok
            self.advance(*self.decoder.feed(torch.tensor([[tok]], device=device), self.state))   # remember it


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
        self._decode = tokenizer.stream_decoder()
        self._pending = ""                                 # decoded text held back (it may begin a stop string)

    @property
    def state(self) -> State | None:
        return self.tokens.state

    @property
    def completion_tokens(self) -> int:
        return self.tokens.completion_tokens

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def push(self, tok: int) -> str:
        """The text one drawn token lets out ("" while held back); a stop string stops the token stream
        (its token is still remembered) and sets ``finish_reason``."""
        if self.finish_reason is not None:
            return ""
        stops = self.sampling.stop
        self._pending += self._decode([tok])
        pending = self._pending
        hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if hits:
            self.stopped_by = min(((pending.find(st), st) for st in stops if pending.find(st) >= 0))[1]
            self.tokens.stop()
            self._pending, self.finish_reason = "", "stop"
            return self._emit(pending[:min(hits)])
        hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        out, self._pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
        return self._emit(out)

    def close(self) -> str:
        """After the last token: the text held back (none after a stop string); ``finish_reason`` is set."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = "length"
        out, self._pending = self._pending, ""
        return self._emit(out)

    def __iter__(self) -> Iterator[str]:
        for tok in self.tokens:
            piece = self.push(tok)
            if piece:
                yield piece
        tail = self.close()
        if tail:
            yield tail


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
