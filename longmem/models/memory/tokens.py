"""Recurrent memory tokens: the Recurrent Memory Transformer (Bulatov et al. 2022).

Legend: B lanes, R memory tokens, T segment length, D model width.

A segment is processed as ``[read memory; segment tokens; write memory]`` under
one causal mask, the decoder-only layout of the paper (§3, fig. 1c): the R read
tokens come first so every segment token can attend to them, the R write tokens
come last so they can attend to the whole segment. Both carry the current memory.
The final-norm outputs at the write positions are the next segment's memory
(the paper takes GPT-2's last hidden states, after its final layer norm), or with
``memory.tokens.gate`` their gated mix with the memory read (Hutchins et al. 2022). A lane
starts from a learned initial memory, and again after a reset.

The memory is written once per full segment (``whole_segments``). A call that ends inside a
segment keeps that segment's tokens in the state (``State.pending``) without writing; the next call puts
them back in front of its own tokens, so feeding a sequence in pieces of any size
gives the logits of one call over it, and a decoder can feed one token at a time.

The memory is *not* detached between segments: within a call the graph runs
through all of them, and the trainer keeps it across ``train.bptt_segments``
calls (backpropagation through segments, Bulatov et al. 2022 §3), detaching beyond.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from longmem.models.memory.base import Memory, Segment
from longmem.models.memory.state import TokensState


class TokenMemory(Memory):
    """The tokens part of the state: read before the segment, written after it; owns the learned
    initial memory and the gate. Settings: ``memory.tokens`` (TokensConfig)."""
    name = "tokens"
    whole_segments = True

    def __init__(self, *, n_tokens: int, d_model: int, gate: bool = False, stretch: float = 0.0,
                 floor: float = 0.0):
        super().__init__()
        self.n_tokens, self.stretch, self.floor = n_tokens, stretch, floor
        # unit scale, like the final-norm outputs that replace it after the first segment
        self.initial = nn.Parameter(torch.randn(n_tokens, d_model))
        # gated update (Hutchins et al. 2022): g = sigmoid(W written + b); b starts at 0 (half-open), W gets the
        # model's normal(0.02) init of every linear layer
        self.gate = nn.Linear(d_model, d_model) if gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.bias)

    @property
    def added_positions(self) -> int:
        return 2 * self.n_tokens

    def init(self, batch_size: int, *, device, dtype) -> TokensState:
        mem = torch.zeros(batch_size, self.n_tokens, self.initial.shape[1], device=device, dtype=dtype)
        return TokensState(mem=mem, fresh=torch.ones(batch_size, dtype=torch.bool, device=device))

    def check(self, state: TokensState) -> None:
        if tuple(state.mem.shape[1:]) != tuple(self.initial.shape):
            raise ValueError(f"the tokens memory has shape {tuple(state.mem.shape[1:])} per lane, this model keeps "
                             f"{tuple(self.initial.shape)} (memory.tokens.n_tokens, model.d_model)")

    def read(self, state: TokensState, *, dtype: torch.dtype) -> torch.Tensor:
        """(B, R, D): the learned initial memory in fresh lanes, the carried one elsewhere."""
        self.check(state)
        fresh = state.fresh.view(-1, 1, 1)
        return torch.where(fresh, self.initial.to(dtype), state.mem.to(dtype))

    def begin(self, seg: Segment, part: TokensState) -> TokensState:
        mem = self.read(part, dtype=seg.x.dtype)                           # (B, R, D)
        seg.surround(mem, mem)                                             # [read memory; segment; write memory]
        seg.scratch[self.name] = {"read": mem}
        return part

    def end(self, seg: Segment, part: TokensState, h: torch.Tensor):
        written = h[:, seg.start + seg.n_tokens:]                          # (B, R, D) the write positions
        return self.write(written, previous=seg.scratch[self.name]["read"])

    def inspect(self, seg: Segment, before: TokensState, after: TokensState, h: torch.Tensor) -> dict[str, Any]:
        """Per lane and memory token (B, R): ``change``, the size of the write relative to the memory read,
        ``|new - read| / |read|``; ``gate``, the mean gate applied (None without a gate)."""
        read = seg.scratch[self.name]["read"].detach().float()            # (B, R, D)
        change = (after.mem.detach().float() - read).norm(dim=-1) / read.norm(dim=-1).clamp(min=1e-12)
        gate = None
        if self.gate is not None:
            gate = self.gates(h[:, seg.start + seg.n_tokens:].detach())[0].detach().float().mean(dim=-1)
        return {"change": change, "gate": gate}

    def gates(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate (B, R, D) that mixes the written ``outputs`` (B, R, D) into the memory, and its charge per
        lane (B,), the auxiliary loss the trainer weighs (``train.aux_weight``). Needs a gate.

        The stretched gate g is clipped to [0, 1] in the forward pass; the mix backpropagates as if it were not
        (straight through), so a shut gate still learns to open when the loss asks for it. The charge is
        g + e/2 down to g = -e/2, half-way to the stretch's lower end -e (e = ``stretch``): a gate is pushed shut with
        a margin, so the small changes of the written outputs over many segments do not reopen it, and is
        then left alone, free to reopen. Without a stretch the gate is the sigmoid, and so is the charge.
        A gate below ``floor`` (``memory.tokens.floor``) is 0, straight through as well."""
        assert self.gate is not None, "gates() needs memory.tokens.gate"
        g = torch.sigmoid(self.gate(outputs))                               # (B, R, D)
        if self.stretch <= 0:
            charge = g.mean(dim=(1, 2))
            applied = g
        else:
            g = (1 + 2 * self.stretch) * g - self.stretch                   # exactly 0 (keep) or 1 (replace)
            charge = (g.clamp(min=-self.stretch / 2) + self.stretch / 2).mean(dim=(1, 2))
            applied = g.clamp(0.0, 1.0)
        if self.floor > 0:
            applied = torch.where(applied < self.floor, torch.zeros_like(applied), applied)
        return g + (applied - g).detach(), charge

    def write(self, outputs: torch.Tensor, *, previous: torch.Tensor) -> tuple[TokensState, torch.Tensor | None]:
        """The next memory (graph kept): the write positions' outputs (B, R, D), or with the gate their mix
        with ``previous`` (B, R, D), the memory this segment read; and in training with a gate, the charge of
        this write summed over lanes (the auxiliary loss; None otherwise)."""
        B, device = outputs.shape[0], outputs.device
        aux = None
        if self.gate is not None:
            g, charge = self.gates(outputs)
            outputs = previous + g * (outputs - previous)
            if self.training:
                aux = charge.sum()
        return TokensState(mem=outputs, fresh=torch.zeros(B, dtype=torch.bool, device=device)), aux

    def nbytes(self, *, batch_size: int, d_model: int, n_layers: int, bytes_per_value: int = 4) -> int:
        return batch_size * self.n_tokens * d_model * bytes_per_value

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.initial]
