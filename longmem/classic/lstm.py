"""LSTM language model (Hochreiter & Schmidhuber 1997), the recurrent baseline.

Legend: B lanes (batch), N tokens in a call, L layers, D width, V vocabulary.

Embedding, stacked LSTM, tied output (Press & Wolf 2017; Inan et al. 2017); with ``model.bits`` bit vectors
in and bit logits out instead (the NTM paper's LSTM baseline on its algorithmic tasks, ``bits.py``).
It follows the MemoryLM contract: ``forward(tokens, state, targets, reset) ->
LMOutput``. The (h, c) of every layer is the memory: it is carried from call to
call like Transformer-XL's memory (detached by the trainer between steps:
truncated backpropagation through time) and cleared per lane by ``reset``. An
LSTM has no window, so a call of any length is one pass and calls over the
pieces of a sequence equal one call over the whole.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from longmem.classic.bits import BitEmbedding, bit_loss, out_channels
from longmem.classic.config import LSTMConfig
from longmem.models.memory import LSTMState, State
from longmem.models.transformer import LMOutput, lm_loss, start_call


class LSTMLM(nn.Module):
    # the state is carried across calls, whatever the settings (generation feeds one token at a time)
    stateful = True
    whole_segments = False

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = copy.deepcopy(config)
        c = self.config
        # bit vectors in, bit logits out (bits.py), else tokens
        self.embed: nn.Module = BitEmbedding(c.bits, c.d_model) if c.bits else nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.lstm = nn.LSTM(c.d_model, c.d_model, num_layers=c.n_layers, batch_first=True,
                            dropout=c.dropout if c.n_layers > 1 else 0.0)
        if c.bits:
            self.head = nn.Linear(c.d_model, out_channels(c.bits))
            return
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=True)
        self.head.weight = self.embed.weight                      # tied: input and output share one matrix
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def for_decoding(self) -> "LSTMLM":
        return self

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.embed.weight.device
        zeros = torch.zeros(batch_size, self.config.n_layers, self.config.d_model, device=device,
                            dtype=self.embed.weight.dtype)
        return State(batch_size=batch_size, lstm=LSTMState(h=zeros, c=zeros.clone()))

    def forward(self, tokens: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> LMOutput:
        state = start_call(tokens, state, reset, init_state=self.init_state,
                           has_part=lambda state: state.lstm is not None)
        B = tokens.shape[0]
        h0 = state.lstm.h.transpose(0, 1).contiguous()              # (L, B, D)
        c0 = state.lstm.c.transpose(0, 1).contiguous()              # (L, B, D)
        x = self.drop(self.embed(tokens))                           # (B, N, D)
        y, (h, c) = self.lstm(x, (h0, c0))                          # y: (B, N, D); h, c: (L, B, D)
        logits = self.head(self.drop(y))                            # (B, N, V), or (B, N, C_out) bit logits
        state = State(batch_size=B, lstm=LSTMState(h=h.transpose(0, 1), c=c.transpose(0, 1)))  # (B, L, D)
        if targets is not None and isinstance(self.embed, BitEmbedding):
            return LMOutput(logits=logits, loss=bit_loss(logits, *self.embed.target_bits(targets)), state=state)
        return LMOutput(logits=logits, loss=lm_loss(logits, targets), state=state)
