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
from typing import Any, Callable, cast

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
    """While on, a step of one token per lane computes each lane as the lane alone would, bit for bit.

    A matmul over many rows may round differently from the one-row matmul of a lone stream (the library picks
    another kernel by shape), and attention over a cache padded in front (masked) sums differently from the
    lane's own unpadded cache; elementwise ops and per-row norms do not depend on the other rows. So a linear
    layer on (B, 1, D) runs as a batch of one-row matmuls (``bmm`` / ``baddbmm`` over the weight expanded)
    where that was found to give the one-row matmul's bits for this shape, else row by row; attention of one
    query per lane runs batched where that was found to give each lane's bits (no mask: every lane's cache is
    full), else per lane over its own slots. "Found" is a probe on random inputs, once per shape: a kernel's
    order of summation depends on the shape, not on the values. Checked on CPU (tests/generation/test_lanes.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fits: dict[tuple, bool] = {}            # shape key -> the batched form gives each row's bits

    def _probe(self, key: tuple, batched: Callable[..., torch.Tensor], one: Callable[..., torch.Tensor],
               make: Callable[[], tuple]) -> bool:
        if key not in self.fits:
            args = make()
            self.fits[key] = torch.equal(batched(*args), torch.cat([one(*args, i) for i in range(key[0])]))
        return self.fits[key]

    def _linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        wt = w.t().unsqueeze(0).expand(B, *w.t().shape)                              # (B, D, F), no copy

        def batched(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if bias is None:
                return torch.bmm(x, wt)
            return torch.baddbmm(bias.view(1, 1, -1).expand(B, 1, -1), x, wt)        # bias added as addmm does

        def one(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, i: int) -> torch.Tensor:
            return F.linear(x[i:i + 1], w, bias)
        key = (B, "linear", tuple(w.shape), bias is not None, x.dtype, x.device)
        if self._probe(key, batched, one, lambda: (torch.randn_like(x), w, bias)):
            return batched(x, w, bias)
        return torch.cat([one(x, w, bias, i) for i in range(B)])

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   rest: dict[str, Any]) -> torch.Tensor:
        B = q.shape[0]
        if mask is None:
            key = (B, "sdpa", tuple(q.shape), tuple(k.shape), q.dtype, q.device, tuple(sorted(rest.items())))
            if self._probe(key, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **rest),
                           lambda q, k, v, i: F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                                                             **rest),
                           lambda: (torch.randn_like(q), torch.randn_like(k), torch.randn_like(v))):
                return F.scaled_dot_product_attention(q, k, v, **rest)
            slots = [k.shape[2]] * B
        else:
            slots = mask[:, 0, 0].sum(-1).tolist()           # (B,): a lane's slots are its last ones
        S = k.shape[2]
        return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, S - n:], v[i:i + 1, :, S - n:],
                                                         **rest) for i, n in enumerate(slots)])

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() == 3 and x.shape[0] > 1 and x.shape[1] == 1:
                return self._linear(x, w, bias)
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask")
            if len(args) == 3 and q.shape[0] > 1 and q.shape[2] == 1 and (mask is None or mask.dtype == torch.bool):
                rest = {n: a for n, a in kwargs.items() if n not in ("attn_mask", "is_causal")}
                if not kwargs.get("is_causal") or k.shape[2] == 1:
                    return self._attention(q, k, v, mask, rest)
        return func(*args, **kwargs)


class Lanes:
    """Streams decoded together, one token each per step, as the lanes of one batch (continuous batching):
    streams join and leave between steps. Their one-lane states are stacked (``State.stack``: caches of
    different lengths right-aligned, ``valid`` masking the front) and stay stacked while the lanes do not
    change; a change unstacks and restacks. States that do not stack together are split into groups that do,
    each fed as one batch (kNN rings and memory tokens stack with none: one lane each). With ``exact`` (the
    default) each lane's logits and state equal those of the stream fed alone bit for bit
    (:class:`LaneExact`); without, one matmul serves all lanes and they equal it to rounding."""

    def __init__(self, decoder: Decoder, *, exact: bool = True):
        if decoder.kind != "state" and decoder.recompute:
            raise ValueError("lanes need cached decoding (recompute=False)")
        self.decoder = decoder
        self.exact = LaneExact() if exact else None
        self._groups: list[tuple[list[int], State]] = []     # (lane numbers, their states stacked)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def states(self) -> list[State]:
        """The lanes' states, one lane each, in order."""
        out: list[State] = [None] * self._n  # type: ignore[list-item]
        for members, state in self._groups:
            for i, st in zip(members, state.unstack()):
                out[i] = st
        return out

    def set(self, states: list[State]) -> None:
        """Make ``states`` (one lane each) the lanes, in order."""
        if any(s.batch_size != 1 for s in states):
            raise ValueError("each stream's state must hold one lane")
        self._n = len(states)
        whole = State.stack(states) if states else None
        if whole is not None:
            self._groups = [(list(range(len(states))), whole)]
            return
        groups: list[list[int]] = []
        for i, st in enumerate(states):                     # first group it stacks with, else a new one
            home = next((g for g in groups if State.stack([states[g[0]], st]) is not None), None)
            if home is None:
                groups.append([i])
            else:
                home.append(i)
        self._groups = []
        for g in groups:
            stacked = State.stack([states[i] for i in g])
            if stacked is None:                             # stacks pairwise, not as a group: one lane each
                self._groups += [([i], states[i]) for i in g]
            else:
                self._groups.append((g, stacked))

    @torch.no_grad()
    def step(self, tokens: list[int]) -> list[torch.Tensor]:
        """Feed token ``tokens[i]`` to lane i; returns each lane's logits (1, V) after it."""
        if len(tokens) != self._n:
            raise ValueError(f"{len(tokens)} tokens for {self._n} lanes")
        out: list[torch.Tensor] = [None] * self._n  # type: ignore[list-item]
        groups = []
        for members, state in self._groups:
            ids = torch.tensor([tokens[i] for i in members], device=self.decoder.device).view(-1, 1)   # (b, 1)
            with self.exact if self.exact is not None and len(members) > 1 else contextlib.nullcontext():
                logits, state = self.decoder.feed(ids, state)                                      # (b, V)
            groups.append((members, state))
            for j, i in enumerate(members):
                out[i] = logits[j:j + 1]
        self._groups = groups
        return out
