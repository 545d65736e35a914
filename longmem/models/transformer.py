"""MemoryLM: a decoder-only Transformer with pluggable memories.

Legend: B lanes (batch), N tokens in a call, T segment length, L positions the blocks
process in a segment (T plus what memories add), D model width, V vocabulary.

A call is split into segments of ``segment_len`` tokens; the memory state is
carried from segment to segment and returned, so one call over a sequence and
many calls over its pieces give the same logits. What the memories do around a
segment is their protocol (``memory/base.py``); this file knows no kind by name.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.config import ModelConfig
from longmem.models.attention import Block, RMSNorm, Rotary, grouped_positions
from longmem.models.memory import Memory, Segment, State, build_memories
from longmem.models.memory.state import PARTS

if TYPE_CHECKING:
    from longmem.models.inspect import Tracer

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: torch.Tensor           # (B, N, V)
    loss: torch.Tensor | None      # mean cross-entropy over targets != IGNORE_INDEX
    state: State                   # memory after this call
    # the memories' auxiliary training loss, unweighted, a sum over lanes and segments (train.aux_weight weighs
    # it); None when no memory has one
    aux_loss: torch.Tensor | None = None


def start_call(tokens: torch.Tensor, state: State | None, reset: torch.Tensor | None, *,
               init_state: Callable[..., State], has_part: Callable[[State], bool] = lambda state: True) -> State:
    """Check a call's tokens (B, N) against its state and return the state to start from:
    ``init_state(B, device=...)`` when there is none (or it lacks this model's part), then ``reset`` applied."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
    B, N = tokens.shape
    if N == 0:
        raise ValueError("tokens must hold at least one position, got shape (batch, 0)")
    if state is not None and state.batch_size != B:
        raise ValueError(f"state has {state.batch_size} lanes but tokens have {B}")
    if state is None or not has_part(state):
        state = init_state(B, device=tokens.device)
    if reset is not None:
        state = state.reset(reset.to(tokens.device))
    return state


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy over targets != IGNORE_INDEX (None without targets)."""
    if targets is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class MemoryLM(nn.Module):
    tracer: "Tracer | None" = None                   # set by models.inspect.trace: records every segment

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = copy.deepcopy(config)          # set_mem_len changes it: never share
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        blocks = [
            Block(d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout, smear_keys=c.smear_keys,
                  n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, mlp=c.mlp, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm,
                  norm_eps=c.norm_eps, smear_width=c.smear_width,
                  smear_queries=c.smear_queries)
            for _ in range(c.n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight                   # tied embeddings (Press & Wolf 2017)
        self.rope = Rotary(c.head_dim_, base=c.rope_theta, scaling=c.rope_scaling)
        self.set_memories(build_memories(c))
        self.apply(self._init_weights)
        for block in blocks:                                       # GPT-2 scaled init of residual outputs
            for proj in (block.attn.out, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layers))

    def set_memories(self, memories: list[Memory]) -> None:
        """Use these memories (in order); each becomes the attribute of its name (``model.xl``, ``model.knn``
        ...), so its weights are saved under that name."""
        for old in getattr(self, "memories", []):
            if old.name in self._modules:
                del self._modules[old.name]
        self.memories = list(memories)
        for m in self.memories:
            setattr(self, m.name, m)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in PARTS:                                        # a memory this model does not have
                return None
            raise

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def stateful(self) -> bool:
        """Whether a call's state matters to the next one (decoders then feed tokens with the state)."""
        return any(m.stateful for m in self.memories)

    @property
    def _plain_positions(self) -> bool:
        """Whether a cache may store keys with their rotary positions: no smeared keys (which mix a key with
        the one before it, before rotation), no memory adding positions around the tokens, and no grouped positions
        (``model.position_range``: a key is read at two positions)."""
        return (not self.config.smear_keys and not self.config.smear_queries and not self.config.position_range
                and not any(m.added_positions for m in self.memories))

    @property
    def whole_segments(self) -> bool:
        return any(m.whole_segments for m in self.memories)

    def set_mem_len(self, mem_len: int) -> None:
        """Change the memory length of the memories that keep past positions (evaluation may use a longer
        one than training)."""
        if mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {mem_len}")
        if not [m for m in self.memories if m.set_mem_len(mem_len)]:
            raise ValueError(f"set_mem_len needs a memory that keeps past positions (kind 'xl', 'knn', 'tokens' "
                             f"or 'sinks'); memory.kind={self.config.memory.kind!r} keeps none")
        self.config.memory.mem_len = mem_len

    def for_decoding(self) -> "MemoryLM":
        """This model (parameters shared, nothing copied) with memories suited to token-by-token decoding:
        XL's hidden states become a cache of keys and values (exact: the memory is detached)."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.set_memories([m.for_decoding() for m in self.memories])
        return view

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.embed.weight.device
        dtype = self.embed.weight.dtype
        pending = torch.zeros(batch_size, 0, dtype=torch.long, device=device) if self.whole_segments else None
        return State(batch_size, {m.name: m.init(batch_size, device=device, dtype=dtype) for m in self.memories},
                     pending=pending)

    def forward(self, tokens: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> LMOutput:
        state = start_call(tokens, state, reset, init_state=self.init_state,
                           has_part=lambda s: all(s.part(m.name) is not None for m in self.memories))
        T = self.config.segment_len
        held = self.whole_segments
        P = state.pending.shape[1] if held and state.pending is not None else 0
        if P:                                                       # the unfinished segment of the last call
            tokens = torch.cat([state.pending.to(tokens.device), tokens], dim=1)   # (B, P + N)
        pieces, aux = [], None
        for start in range(0, tokens.shape[1], T):                  # segment by segment, memory carried
            seg = tokens[:, start:start + T]
            seg_logits, new_state, seg_aux = self._segment(seg, state)
            if held and seg.shape[1] < T:                           # written once per full segment: hold it
                new_state, seg_aux = state.with_parts(pending=seg), None
            elif held:
                new_state = new_state.with_parts(pending=seg[:, :0])
            if seg_aux is not None:
                aux = seg_aux if aux is None else aux + seg_aux
            state = new_state
            pieces.append(seg_logits)
        logits = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]    # (B, P + N, V)
        logits = logits[:, P:]                                      # (B, N, V)
        return LMOutput(logits=logits, loss=lm_loss(logits, targets), state=state, aux_loss=aux)

    def _segment(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """Logits (B, T, V), the state after the segment and its memories' auxiliary loss (or None)."""
        x = self.embed(tokens)
        seg = Segment(self.drop(x) if self.training and self.config.dropout else x)   # x: (B, T, D)
        seg.rope, seg.plain_positions = self.rope, self._plain_positions
        try:
            return self._through_blocks(seg, state)
        finally:
            seg.close()                # drops the hooks' closures over seg and the state (a reference cycle)

    def _through_blocks(self, seg: Segment, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """The segment through the memories and blocks: :meth:`_segment`'s result."""
        if self.tracer is not None:                                 # inspection only (models/inspect.py)
            self.tracer.begin(seg, len(self.blocks))
        parts = {m.name: m.begin(seg, state.part(m.name)) for m in self.memories}
        x = seg.x                                                   # (B, L, D)
        cos, sin = self.rope.cos_sin(seg.memory_len + x.shape[1], device=x.device, dtype=x.dtype)
        c = self.config
        grouped = grouped_positions(cos, sin, n_queries=x.shape[1], limit=c.position_range,
                                    window=c.position_window_) if c.position_range else None
        for i, block in enumerate(self.blocks):
            if seg.keep_inputs:
                seg.inputs.append(seg.tokens_of(x))                 # (B, T, D): XL keeps segment tokens only
            x = block(x, view=seg.view(i, cos, sin, grouped=grouped))
        h = self.norm(x)                                            # (B, L, D)
        logits = self.head(seg.tokens_of(h))                        # (B, T, V)
        new, aux = {}, None
        for m in self.memories:                                     # written after the segment
            new[m.name], a = m.end(seg, parts[m.name], h)
            if a is not None:
                aux = a if aux is None else aux + a
        if self.tracer is not None:
            self.tracer.end({m.name: m.inspect(seg, parts[m.name], new[m.name], h) for m in self.memories})
        return logits, state.with_parts(**new), aux
