"""MemoryLM: a decoder-only Transformer with a pluggable memory.

Legend: B lanes (batch), N tokens in a call, T segment length, M memory
slots, R memory tokens, L = R + T + R positions of a segment with memory
tokens, D model width, V vocabulary.

A call is split into segments of ``segment_len`` tokens; the memory state is
carried from segment to segment and returned, so one call over a sequence and
many calls over its pieces give the same logits.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.config import ModelConfig
from longmem.models.attention import Block, RMSNorm, Rotary
from longmem.models.memory import State, XLMemory
from longmem.models.memory.knn import KNNMemory
from longmem.models.memory.tokens import TokenMemory

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: torch.Tensor           # (B, N, V)
    loss: torch.Tensor | None      # mean cross-entropy over targets != IGNORE_INDEX
    state: State                   # memory after this call
    # training regularizer, a sum to add to the summed cross-entropy (memory.token_gate_penalty); None: none
    penalty: torch.Tensor | None = None


def start_call(tokens: torch.Tensor, state: State | None, reset: torch.Tensor | None, *, init_state,
               has_part=lambda state: True) -> State:
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
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class MemoryLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = copy.deepcopy(config)          # set_mem_len changes it: never share
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout, smear_keys=c.smear_keys)
            for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.embed.weight                       # tied embeddings (Press & Wolf 2017)
        self.rope = Rotary(c.d_model // c.n_heads, base=c.rope_base)
        # kinds "knn" and "tokens" keep XL recurrence alongside when mem_len > 0 (Wu et al. 2022 use it as
        # local memory; Bulatov et al. 2022 §4 combine memory tokens with it)
        self.xl = (XLMemory(mem_len=c.memory.mem_len, n_layers=c.n_layers)
                   if c.memory.kind in ("xl", "knn", "tokens") else None)
        self.knn = KNNMemory(config=c.memory, n_layers=c.n_layers, n_heads=c.n_heads,
                             head_dim=c.d_model // c.n_heads) if c.memory.kind == "knn" else None
        self.tokens = (TokenMemory(n_tokens=c.memory.n_mem_tokens, d_model=c.d_model, gate=c.memory.token_gate,
                                  stretch=c.memory.token_gate_stretch, floor=c.memory.token_gate_floor,
                                  penalty=c.memory.token_gate_penalty, noise=c.memory.token_noise)
                       if c.memory.kind == "tokens" else None)
        self.apply(self._init_weights)
        for block in self.blocks:                                  # GPT-2 scaled init of residual outputs
            for proj in (block.attn.out, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_mem_len(self, mem_len: int) -> None:
        """Change the XL memory length (evaluation may use a longer one than training)."""
        if self.xl is None:
            raise ValueError("set_mem_len needs memory.kind='xl', 'knn' or 'tokens'")
        if mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {mem_len}")
        self.xl.mem_len = mem_len
        self.config.memory.mem_len = mem_len

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.embed.weight.device
        dtype = self.embed.weight.dtype
        xl = self.xl.init(batch_size, device=device, dtype=dtype) if self.xl else None
        knn = self.knn.init(batch_size, device=device, dtype=dtype) if self.knn is not None else None
        tokens = self.tokens.init(batch_size, device=device, dtype=dtype) if self.tokens is not None else None
        return State(batch_size=batch_size, xl=xl, knn=knn, tokens=tokens)

    def forward(self, tokens: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> LMOutput:
        state = start_call(tokens, state, reset, init_state=self.init_state,
                           has_part=lambda state: self.tokens is None or state.tokens is not None)
        T = self.config.segment_len
        P = state.tokens.pending.shape[1] if self.tokens is not None else 0
        if P:                                                       # the unfinished segment of the last call
            tokens = torch.cat([state.tokens.pending.to(tokens.device), tokens], dim=1)   # (B, P + N)
        logits, penalty = [], None
        for start in range(0, tokens.shape[1], T):                  # segment by segment, memory carried
            seg = tokens[:, start:start + T]
            seg_logits, new_state, seg_penalty = self._segment(seg, state)
            if self.tokens is not None and seg.shape[1] < T:        # memory tokens write full segments only
                new_state, seg_penalty = replace(state, tokens=replace(state.tokens, pending=seg)), None
            if seg_penalty is not None:
                penalty = seg_penalty if penalty is None else penalty + seg_penalty
            state = new_state
            logits.append(seg_logits)
        logits = torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]   # (B, P + N, V)
        logits = logits[:, P:]                                      # (B, N, V)
        return LMOutput(logits=logits, loss=lm_loss(logits, targets), state=state, penalty=penalty)

    def _segment(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """Logits (B, T, V), the state after the segment and the training penalty of its memory write (or None)."""
        B, T = tokens.shape
        x = self.drop(self.embed(tokens))                           # (B, T, D)
        R = 0
        if self.tokens is not None:                                 # [read memory; segment; write memory] (RMT)
            mem = self.tokens.read(state.tokens, dtype=x.dtype)     # (B, R, D)
            R = mem.shape[1]
            x = torch.cat([mem, x, mem], dim=1)                     # (B, L, D), L = R + T + R
        L = x.shape[1]
        xl = self.xl.trim(state.xl) if self.xl is not None else None
        M = xl.length if xl is not None else 0
        mask = XLMemory.key_mask(xl, L) if xl is not None else None  # (B, 1, L, M+L) or None
        rope = self.rope.cos_sin(M + L, device=x.device, dtype=x.dtype)
        knn = self.knn.segment(state.knn) if self.knn is not None else None   # reads the store of past segments
        layer_inputs = []
        for i, block in enumerate(self.blocks):
            layer_inputs.append(x[:, R:R + T])                      # XL keeps segment tokens only
            x = block(x, memory=xl.mems[i] if M else None, rope=rope, mask=mask,
                      knn=knn.hook(i) if knn is not None else None)
        h = self.norm(x)                                            # (B, L, D)
        logits = self.head(h[:, R:R + T])                           # (B, T, V)
        penalty = None
        if self.tokens is not None:                                 # the write positions become the memory
            written, penalty = self.tokens.write(h[:, R + T:], previous=mem)
            state = replace(state, tokens=written)
        if xl is not None:
            state = replace(state, xl=self.xl.write(xl, layer_inputs))
        if knn is not None:                                         # written after the segment: never retrieves itself
            state = replace(state, knn=knn.written())
        return logits, state, penalty
