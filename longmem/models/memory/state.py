"""The memory state carried from one call to the next, one row per lane.

Every memory kind keeps its part in one field of :class:`State`; a part is a
frozen dataclass of tensors whose first dimension is the lane. The state
round-trips through a flat ``{name: tensor}`` dict so it can be written with
safetensors (resume, chat sessions).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class XLState:
    """Transformer-XL memory: per layer the last states of each lane.

    mems[l]: (B, M, D) inputs of layer l for the last M positions, oldest first.
    valid: (B,) how many of the M most recent slots hold real history for each
    lane (fewer after a reset or at the start of a stream).
    """
    mems: tuple[torch.Tensor, ...]
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.mems[0].shape[1] if self.mems else 0


@dataclass(frozen=True)
class LSTMState:
    """Hidden and cell state of a stacked LSTM (the LSTM baseline, models/lstm.py).

    h, c: (B, L, D), lane first like every part (nn.LSTM wants (L, B, D): see LSTMLM).
    """
    h: torch.Tensor
    c: torch.Tensor

    def reset(self, keep: torch.Tensor) -> "LSTMState":
        keep = keep.to(self.h.device).view(-1, 1, 1).to(self.h.dtype)
        return LSTMState(h=self.h * keep, c=self.c * keep)

    def detach(self) -> "LSTMState":
        return LSTMState(h=self.h.detach(), c=self.c.detach())


@dataclass(frozen=True)
class State:
    """Memory of all lanes; fields are ``None`` for kinds the model does not use."""
    batch_size: int
    xl: XLState | None = None
    lstm: LSTMState | None = None

    def reset(self, mask: torch.Tensor) -> "State":
        """Clear the lanes where ``mask`` (B,) is true."""
        if mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            return self
        out = self
        if self.lstm is not None:
            out = replace(out, lstm=self.lstm.reset(~mask.bool()))
        if self.xl is None:
            return out
        keep = (~mask.bool()).to(self.xl.valid.device)
        mems = tuple(m * keep.view(-1, 1, 1).to(m.dtype) for m in self.xl.mems)
        return replace(out, xl=XLState(mems=mems, valid=self.xl.valid * keep.long()))

    def detach(self) -> "State":
        out = self if self.lstm is None else replace(self, lstm=self.lstm.detach())
        if self.xl is None:
            return out
        return replace(out, xl=XLState(mems=tuple(m.detach() for m in self.xl.mems), valid=self.xl.valid))

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"batch_size": torch.tensor(self.batch_size)}
        if self.xl is not None:
            out["xl.valid"] = self.xl.valid
            for i, m in enumerate(self.xl.mems):
                out[f"xl.mems.{i}"] = m.contiguous()
        if self.lstm is not None:
            out["lstm.h"], out["lstm.c"] = self.lstm.h.contiguous(), self.lstm.c.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "State":
        if "batch_size" not in d:
            raise ValueError("not a longmem memory state: 'batch_size' is missing")
        xl = None
        if "xl.valid" in d:
            n = sum(1 for k in d if k.startswith("xl.mems."))
            xl = XLState(mems=tuple(d[f"xl.mems.{i}"] for i in range(n)), valid=d["xl.valid"].long())
        lstm = LSTMState(h=d["lstm.h"], c=d["lstm.c"]) if "lstm.h" in d else None
        return cls(batch_size=int(d["batch_size"]), xl=xl, lstm=lstm)

    def parts(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "batch_size" and getattr(self, f.name) is not None]
