"""Transformer-XL segment recurrence (Dai et al. 2019, §3.2).

Per layer, the inputs of the last ``mem_len`` positions of each lane are kept
(detached: no gradient flows into the past) and attended to together with the
current segment. Evaluation may use a longer ``mem_len`` than training.
"""
from __future__ import annotations

import torch

from longmem.models.memory.state import XLState


class XLMemory:
    """init / read / write for the XL part of the state."""

    def __init__(self, *, mem_len: int, n_layers: int):
        self.mem_len = mem_len
        self.n_layers = n_layers

    def init(self, batch_size: int, *, device, dtype) -> XLState:
        # no slots yet: the first write creates (B, T, D) tensors in the activations' dtype
        return XLState(mems=(), valid=torch.zeros(batch_size, dtype=torch.long, device=device))

    def trim(self, state: XLState) -> XLState:
        """Keep at most mem_len slots (a state from a run with a longer memory)."""
        if state.length <= self.mem_len:
            return state
        if self.mem_len == 0:
            return XLState(mems=(), valid=torch.zeros_like(state.valid))
        return XLState(mems=tuple(m[:, -self.mem_len:] for m in state.mems),
                       valid=state.valid.clamp(max=self.mem_len))

    @staticmethod
    def key_mask(state: XLState, seg_len: int) -> torch.Tensor | None:
        """(B, 1, T, M + T) bool: valid memory slots plus causal attention inside the segment."""
        M = state.length
        if M == 0:
            return None
        device = state.valid.device
        slot = torch.arange(M, device=device)
        mem_ok = slot.unsqueeze(0) >= (M - state.valid).unsqueeze(1)                    # (B, M)
        causal = torch.ones(seg_len, seg_len, dtype=torch.bool, device=device).tril()   # (T, T)
        B = mem_ok.shape[0]
        return torch.cat([mem_ok[:, None, :].expand(B, seg_len, M),
                          causal.expand(B, seg_len, seg_len)], dim=-1).unsqueeze(1)     # (B, 1, T, M+T)

    def write(self, state: XLState, layer_inputs: list[torch.Tensor]) -> XLState:
        """Append this segment's layer inputs (each (B, T, D)) and keep the last mem_len."""
        if self.mem_len == 0:
            return state
        T = layer_inputs[0].shape[1]
        if state.length == 0:
            mems = tuple(h.detach()[:, -self.mem_len:] for h in layer_inputs)
        else:
            mems = tuple(torch.cat([m, h.detach()], dim=1)[:, -self.mem_len:]
                         for m, h in zip(state.mems, layer_inputs))
        valid = torch.clamp(state.valid + T, max=mems[0].shape[1])
        return XLState(mems=mems, valid=valid)
