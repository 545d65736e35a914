"""Incremental decoding in bounded memory.

Legend: B lanes, N tokens fed in one call, W = segment_len (the trained window),
V vocabulary.

- ``kind="xl"``: the model's own state is the cache (per layer the inputs of the
  last ``mem_len`` positions; keys/values are recomputed with positions inside
  the window), so a token costs one call and memory never grows past ``mem_len``.
- ``kind="none"``: the same hidden-state mechanism serves as a cache of past
  positions. The model is viewed with an XL memory of ``W - 1`` slots (parameters
  shared, nothing copied), so each new token attends to at most ``W`` keys at
  positions ``0 .. W-1``, exactly what training saw. While the text fits in the
  window this equals full recomputation (tested). With ``attention_sink = S``
  the first ``S`` positions stay in the cache for good and the rest slides
  (StreamingLLM, Xiao et al. 2023): positions are assigned inside the cache, so
  a token's position never exceeds ``W - 1`` however long the output grows.
- ``kind="tokens"``: the state is the memory (R vectors) plus the unfinished
  segment's tokens (< W), recomputed with each new token until the segment is
  full and the memory written, as in training.
- ``recompute=True`` (kind none only) is the slow reference: the last ``W``
  tokens are recomputed for every new token.
"""
from __future__ import annotations

import copy

import torch

from longmem.models import MemoryLM
from longmem.models.memory import XLMemory, XLState


class SinkXLMemory(XLMemory):
    """XL memory that keeps its first ``n_sink`` slots forever and slides the rest.

    Assumes the lanes of a state start together (as in generation), so the first
    slots hold the first tokens of every lane.
    """

    def __init__(self, *, mem_len: int, n_layers: int, n_sink: int):
        super().__init__(mem_len=mem_len, n_layers=n_layers)
        if not 0 <= n_sink < max(mem_len, 1):
            raise ValueError(f"attention_sink must be in [0, {max(mem_len - 1, 0)}] (the cache holds "
                             f"{mem_len} past positions), got {n_sink}")
        self.n_sink = n_sink

    def _keep(self, m: torch.Tensor) -> torch.Tensor:
        # m: (B, L, D) oldest first -> (B, min(L, mem_len), D): sinks + the most recent slots
        if m.shape[1] <= self.mem_len:
            return m
        if self.n_sink == 0:
            return m[:, -self.mem_len:]
        return torch.cat([m[:, :self.n_sink], m[:, -(self.mem_len - self.n_sink):]], dim=1)

    def trim(self, state: XLState) -> XLState:
        if state.length <= self.mem_len:
            return state
        return XLState(mems=tuple(self._keep(m) for m in state.mems), valid=state.valid.clamp(max=self.mem_len))

    def write(self, state: XLState, layer_inputs: list[torch.Tensor]) -> XLState:
        T = layer_inputs[0].shape[1]
        if state.length == 0:
            mems = tuple(self._keep(h.detach()) for h in layer_inputs)
        else:
            mems = tuple(self._keep(torch.cat([m, h.detach()], dim=1)) for m, h in zip(state.mems, layer_inputs))
        return XLState(mems=mems, valid=torch.clamp(state.valid + T, max=mems[0].shape[1]))


def cached_view(model: MemoryLM, *, cache_len: int, attention_sink: int = 0) -> MemoryLM:
    """``model`` (kind none) seen with a hidden-state cache of ``cache_len`` past positions.

    A shallow copy: parameters and submodules are shared with ``model``; only the
    memory plug-in differs, so the model itself is left untouched.
    """
    if model.xl is not None:
        raise ValueError("cached_view is for models without memory (kind 'none'); XL models cache by themselves")
    view = copy.copy(model)
    view.xl = SinkXLMemory(mem_len=cache_len, n_layers=model.config.n_layers, n_sink=attention_sink)
    return view


class Decoder:
    """Feeds tokens to a model and carries a bounded memory; returns the last logits.

    ``feed(tokens (B, N), memory) -> (logits (B, V), memory)``; ``memory`` is a
    :class:`State` (``None`` starts fresh), or in ``recompute`` mode the last W tokens.
    """

    def __init__(self, model: MemoryLM, *, attention_sink: int = 4, recompute: bool = False):
        self.model = model
        self.window = W = model.config.segment_len
        self.recompute = recompute
        xl = getattr(model, "xl", None)
        # "xl": the model's own state carries the past (XL with mem_len > 0, kNN, memory tokens, the LSTM);
        # memory tokens are written once per full segment: the unfinished one waits in the state (pending)
        # and is recomputed with each new token, so a token at a time equals one call over the whole text
        self.memory_tokens = getattr(model, "tokens", None) is not None
        stateful = getattr(model, "recurrent", False) or getattr(model, "knn", None) is not None or (
            xl is not None and xl.mem_len > 0) or self.memory_tokens
        self.kind = "xl" if stateful else "none"
        if recompute and self.kind != "none":
            raise ValueError("recompute=True is the no-memory reference; XL models always decode with their state")
        if self.kind == "none" and not recompute:
            if W < 2:
                raise ValueError("cached decoding without memory needs model.segment_len >= 2")
            if attention_sink < 0:
                raise ValueError(f"attention_sink must be >= 0, got {attention_sink}")
            # prefill chunks of C tokens see a cache of W - C slots: at most W keys, as in training
            self.chunk = max(1, W // 2)
            sink = max(0, min(attention_sink, W - self.chunk - 1))
            self.decode_view = cached_view(model, cache_len=W - 1, attention_sink=sink)
            self.prefill_view = cached_view(model, cache_len=W - self.chunk, attention_sink=sink)
            self.attention_sink = sink
        else:
            self.attention_sink = 0

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def cache_positions(self) -> int:
        """The most past positions one lane keeps (the bound on memory)."""
        if self.kind == "xl":
            xl = getattr(self.model, "xl", None)
            pending = self.window - 1 if self.memory_tokens else 0          # the unfinished segment
            return (xl.mem_len if xl is not None else 0) + pending
        return self.window if self.recompute else self.window - 1

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, memory=None):
        B, N = tokens.shape
        if N == 0:
            raise ValueError("feed needs at least one token")
        if self.kind == "xl":
            out = self.model(tokens, state=memory)
            return out.logits[:, -1], out.state
        if self.recompute:
            window = tokens if memory is None else torch.cat([memory, tokens], dim=1)
            window = window[:, -self.window:]
            return self.model(window).logits[:, -1], window
        if memory is None:                                      # the first window: one plain causal pass
            first = tokens[:, :self.window]
            out = self.prefill_view(first)
            logits, memory, tokens = out.logits[:, -1], out.state, tokens[:, self.window:]
        for start in range(0, tokens.shape[1], self.chunk):
            piece = tokens[:, start:start + self.chunk]
            view = self.decode_view if piece.shape[1] == 1 else self.prefill_view
            out = view(piece, state=memory)
            logits, memory = out.logits[:, -1], out.state
        return logits, memory
