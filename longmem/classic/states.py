"""The per-lane state parts of the memory-augmented baselines (``state.ntm``, ``state.dnc``), registered with
``register_part`` so they are carried between calls, cleared per lane by a reset and saved in checkpoints like
every memory. Lanes are the first dimension of every tensor.

Legend: B lanes, L controller layers, D controller width, N memory slots, W slot width, R read heads.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from longmem.models.memory.state import register_part

# Initial memory of the NTM: a small constant, the same in every slot (content addressing starts uniform);
# constant initialisation learns fastest of the schemes compared by Collier & Beel 2018 ("Implementing Neural
# Turing Machines", §4).
NTM_MEMORY_INIT = 1e-6


def _where(drop: torch.Tensor, fresh: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    keep = (~drop.bool()).to(old.device).view(-1, *([1] * (old.dim() - 1)))
    return torch.where(keep, old, fresh)


class _Tensors:
    """to_tensors / from_tensors / detach over the dataclass fields (all tensors)."""

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).detach().contiguous() for f in fields(self)}   # type: ignore[arg-type]

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]):
        return cls(**{f.name: d[f.name] for f in fields(cls)})     # type: ignore[arg-type]

    def detach(self):
        return type(self)(**{f.name: getattr(self, f.name).detach() for f in fields(self)})   # type: ignore[arg-type]


@dataclass(frozen=True)
class NTMState(_Tensors):
    """Neural Turing Machine (``classic/ntm.py``).

    h, c: (B, L, D) controller; memory: (B, N, W); weights: (B, R + 1, N) the last weighting of each read
    head, then of the write head (a new lane: all on slot 0); reads: (B, R, W) the last read vectors."""
    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    weights: torch.Tensor
    reads: torch.Tensor

    @classmethod
    def initial(cls, batch_size: int, *, n_layers: int, width: int, slots: int, slot_width: int, read_heads: int,
                device=None, dtype=None) -> "NTMState":
        zeros = torch.zeros(batch_size, n_layers, width, device=device, dtype=dtype)
        weights = torch.zeros(batch_size, read_heads + 1, slots, device=device, dtype=dtype)
        weights[..., 0] = 1.0
        return cls(h=zeros, c=zeros.clone(),
                   memory=torch.full((batch_size, slots, slot_width), NTM_MEMORY_INIT, device=device, dtype=dtype),
                   weights=weights, reads=torch.zeros(batch_size, read_heads, slot_width, device=device, dtype=dtype))

    def reset(self, drop):
        B, _, W = self.memory.shape
        fresh = NTMState.initial(B, n_layers=self.h.shape[1], width=self.h.shape[2], slots=self.memory.shape[1],
                                 slot_width=W, read_heads=self.reads.shape[1], device=self.h.device,
                                 dtype=self.h.dtype)
        return NTMState(**{f.name: _where(drop, getattr(fresh, f.name), getattr(self, f.name)) for f in fields(self)})


@dataclass(frozen=True)
class DNCState(_Tensors):
    """Differentiable Neural Computer (``classic/dnc.py``); everything starts at zero (Graves et al. 2016, Methods).

    h, c: (B, L, D) controller; memory: (B, N, W); usage: (B, N) u_t; link: (B, N, N) temporal link matrix L_t;
    precedence: (B, N) p_t; read_weights: (B, R, N); write_weights: (B, N); reads: (B, R, W) the read vectors."""
    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    usage: torch.Tensor
    link: torch.Tensor
    precedence: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor
    reads: torch.Tensor

    @classmethod
    def initial(cls, batch_size: int, *, n_layers: int, width: int, slots: int, slot_width: int, read_heads: int,
                device=None, dtype=None) -> "DNCState":
        def z(*shape):
            return torch.zeros(batch_size, *shape, device=device, dtype=dtype)
        return cls(h=z(n_layers, width), c=z(n_layers, width), memory=z(slots, slot_width), usage=z(slots),
                   link=z(slots, slots), precedence=z(slots), read_weights=z(read_heads, slots),
                   write_weights=z(slots), reads=z(read_heads, slot_width))

    def reset(self, drop):
        return DNCState(**{f.name: _where(drop, torch.zeros_like(getattr(self, f.name)), getattr(self, f.name))
                           for f in fields(self)})


register_part("ntm", NTMState)
register_part("dnc", DNCState)
