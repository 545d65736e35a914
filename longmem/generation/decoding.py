"""Incremental decoding in bounded memory.

Legend: B lanes, N tokens fed in one call, W = segment_len (the trained window),
V vocabulary.

- A stateful model (its memories carry something across calls: XL, kNN, memory tokens, an LSTM)
  decodes with its own state, one call per token, in the memories of ``model.for_decoding()``: XL's
  hidden states become a cache of keys and values before rotary positions (``memory/kv.py``), so a
  new token costs one position's projections, and memory never grows past ``mem_len``. Memory tokens
  keep the unfinished segment pending and recompute it with each token until it is full, as in
  training.
- A model without memory (``kind="none"``) is viewed with a key/value cache of ``W - 1`` past
  positions (parameters shared, nothing copied), so each new token attends to at most ``W`` keys at
  positions ``0 .. W-1``, exactly what training saw. While the text fits in the window this equals
  full recomputation (tested). With ``attention_sink = S`` the first ``S`` positions stay in the cache
  for good and the rest slides (StreamingLLM, Xiao et al. 2023): positions are assigned inside the
  cache, so a token's position never exceeds ``W - 1`` however long the output grows.
- ``recompute=True`` (kind none only) is the slow reference: the last ``W`` tokens are recomputed for
  every new token.
"""
from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from longmem.models import MemoryLM
from longmem.models.attention import Block
from longmem.models.memory import KVMemory, KVState, State, XLState


def cached_view(model: MemoryLM, *, cache_len: int, attention_sink: int = 0) -> MemoryLM:
    """``model`` (without memory) seen with a key/value cache of ``cache_len`` past positions and
    ``attention_sink`` sinks. A shallow copy: parameters and submodules are shared with ``model``."""
    if model.stateful:
        raise ValueError("cached_view is for models without memory (kind 'none'); stateful models decode with "
                         "their own memory (model.for_decoding())")
    view = model.for_decoding()
    view.set_memories([*view.memories, KVMemory(window=cache_len, n_layers=model.config.n_layers,
                                                n_sinks=attention_sink)])
    return view


@torch.no_grad()
def cache_from_hidden(model: MemoryLM, xl: XLState) -> KVState:
    """The key/value cache equal to an XL memory of hidden states (each layer's memory normed and projected
    by that layer): states saved by longmem 0.1 sessions, which kept hidden states for decoding."""
    keys, values = [], []
    for block, mem in zip(model.blocks, xl.mems):
        block = cast(Block, block)
        k, v = block.attn.project_kv(block.norm1(mem))
        keys.append(k)
        values.append(v)
    return KVState(keys=tuple(keys), values=tuple(values), valid=xl.valid)


class Decoder:
    """Feeds tokens to a model and carries a bounded memory; returns the last logits.

    ``feed(tokens (B, N), memory) -> (logits (B, V), memory)``; ``memory`` is a
    :class:`State` (``None`` starts fresh), or in ``recompute`` mode the last W tokens.
    """

    def __init__(self, model: MemoryLM, *, attention_sink: int = 4, recompute: bool = False):
        self.model = model
        self.window = W = model.config.segment_len
        self.recompute = recompute
        self.kind = "state" if model.stateful else "none"
        if recompute and self.kind != "none":
            raise ValueError("recompute=True is the no-memory reference; models with memory always decode with "
                             "their state")
        self.attention_sink = 0
        if self.kind == "state":
            self.view = model.for_decoding()
        elif not recompute:
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

    @property
    def views(self) -> list[MemoryLM]:
        """The models ``feed`` runs (views of ``model`` sharing its parameters), e.g. to trace them."""
        if self.kind == "state":
            return [self.view]
        return [self.model] if self.recompute else [self.prefill_view, self.decode_view]

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def cache_positions(self) -> int:
        """The most past positions one lane keeps (the bound on memory)."""
        if self.kind == "state":
            return self.model.config.memory.mem_len + (self.window - 1 if self.model.whole_segments else 0)
        return self.window if self.recompute else self.window - 1

    def adopt(self, state: State | None) -> State | None:
        """A state saved in another layout brought to this decoder's: XL hidden states (sessions of longmem
        0.1) become the key/value cache the decoder keeps."""
        if state is None or state.xl is None:
            return state
        view = self.view if self.kind == "state" else self.decode_view
        if view.kv is None or view.xl is not None:
            return state
        parts = {k: v for k, v in ((n, state.part(n)) for n in state.parts()) if k != "xl"}
        parts["kv"] = view.kv.trim(cache_from_hidden(self.model, state.xl))
        return State(state.batch_size, parts, pending=state.pending)

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor, memory: Any = None) -> tuple[torch.Tensor, Any]:
        B, N = tokens.shape
        if N == 0:
            raise ValueError("feed needs at least one token")
        if self.kind == "state":
            out = self.view(tokens, state=memory)
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


class LaneExact(TorchFunctionMode):
    """While on, a step of one token per lane computes each lane as the lane alone would, bit for bit: a matmul
    over many rows rounds differently from the one-row matmul of a lone stream (another kernel), and attention
    over a cache padded in front (masked) sums differently from the lane's own unpadded cache. So linear layers
    on (B, 1, D) run as a batch of one-row matmuls (``baddbmm`` over the weight expanded, B > 1), and masked
    attention of one query runs per lane over its own slots. Checked on CPU (tests/generation/test_lanes.py);
    the cost there is the per-lane attention calls, small next to running the lanes one after another."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() == 3 and x.shape[0] > 1 and x.shape[1] == 1:
                wt = w.t().unsqueeze(0).expand(x.shape[0], *w.t().shape)                 # (B, D, F), no copy
                if bias is None:
                    return torch.bmm(x, wt)
                return torch.baddbmm(bias.view(1, 1, -1).expand(x.shape[0], 1, -1), x, wt)   # as addmm
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask")
            if mask is not None and q.shape[0] > 1 and q.shape[2] == 1 and mask.dtype == torch.bool:
                rest = {n: a for n, a in kwargs.items() if n not in ("attn_mask", "is_causal")}
                keys = mask[:, 0, 0].sum(-1).tolist()                  # (B,): a lane's slots are its last ones
                return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, k.shape[2] - n:],
                                                                 v[i:i + 1, :, v.shape[2] - n:], **rest)
                                  for i, n in enumerate(keys)])
        return func(*args, **kwargs)


class Lanes:
    """Streams decoded together, one token each per step, as the lanes of one batch (continuous batching):
    streams join and leave between steps. Their one-lane states are stacked (``State.stack``: caches of
    different lengths right-aligned, ``valid`` masking the front) and stay stacked while the lanes do not
    change; a change unstacks and restacks. States that do not stack (kNN rings, memory tokens with a segment
    pending, different cache layouts) are fed one lane at a time. With ``exact`` (the default) each lane's
    logits and state equal those of the stream fed alone bit for bit (:class:`LaneExact`); without, one matmul
    serves all lanes and they equal it to rounding."""

    def __init__(self, decoder: Decoder, *, exact: bool = True):
        if decoder.kind != "state" and decoder.recompute:
            raise ValueError("lanes need cached decoding (recompute=False)")
        self.decoder, self.exact = decoder, exact
        self._stacked: State | None = None            # every lane, when their states stack
        self._alone: list[State] = []                 # else one state per lane

    def __len__(self) -> int:
        return self._stacked.batch_size if self._stacked is not None else len(self._alone)

    def states(self) -> list[State]:
        """The lanes' states, one lane each, in order."""
        return self._stacked.unstack() if self._stacked is not None else list(self._alone)

    def set(self, states: list[State]) -> None:
        """Make ``states`` (one lane each) the lanes, in order."""
        if any(s.batch_size != 1 for s in states):
            raise ValueError("each stream's state must hold one lane")
        self._stacked = State.stack(states) if states else None
        self._alone = [] if self._stacked is not None else list(states)

    @torch.no_grad()
    def step(self, tokens: list[int]) -> list[torch.Tensor]:
        """Feed token ``tokens[i]`` to lane i; returns each lane's logits (1, V) after it."""
        if len(tokens) != len(self):
            raise ValueError(f"{len(tokens)} tokens for {len(self)} lanes")
        if self._stacked is None:
            out = [self.decoder.feed(torch.tensor([[t]], device=self.decoder.device), s)
                   for t, s in zip(tokens, self._alone)]
            self._alone = [s for _, s in out]
            return [lg for lg, _ in out]
        ids = torch.tensor(tokens, device=self.decoder.device).view(-1, 1)             # (B, 1)
        with LaneExact() if self.exact and len(tokens) > 1 else contextlib.nullcontext():
            logits, self._stacked = self.decoder.feed(ids, self._stacked)              # (B, V)
        return [logits[i:i + 1] for i in range(len(tokens))]
