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
class KNNState:
    """kNN long-term memory (Wu et al. 2022): per retrieving layer a FIFO ring of past keys and values.

    keys[l], values[l]: (B, H, C, Dh) entries of the l-th retrieving layer, detached.
    written: (B,) entries written to each lane since its last reset; the next one goes to
    slot ``written % C`` (overwriting the oldest once full), and slot s holds a real entry
    iff s < min(written, C). Slots of a reset lane are zeroed.
    """
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    written: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def count(self) -> torch.Tensor:
        """(B,) entries each lane holds now."""
        return self.written.clamp(max=self.capacity)


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
class TokensState:
    """Recurrent memory tokens (Bulatov et al. 2022, ``memory/tokens.py``).

    mem: (B, R, D) the R memory vectors each lane carries into its next segment, not detached
    (the trainer detaches beyond its bptt window). fresh: (B,) bool, lanes that start from the
    learned initial memory (a new state or a reset); their ``mem`` rows are zero and unused.
    pending: (B, P) token ids of the unfinished segment (P < segment_len): the memory is written
    once per full segment, so a call that ends inside one keeps its tokens here and the next call
    recomputes them in front of its own (pieces of any size then equal one call over the whole).
    """
    mem: torch.Tensor
    fresh: torch.Tensor
    pending: torch.Tensor


@dataclass(frozen=True)
class State:
    """Memory of all lanes; fields are ``None`` for kinds the model does not use."""
    batch_size: int
    xl: XLState | None = None
    knn: KNNState | None = None
    lstm: LSTMState | None = None
    tokens: TokensState | None = None

    def reset(self, mask: torch.Tensor) -> "State":
        """Clear the lanes where ``mask`` (B,) is true."""
        if mask.shape != (self.batch_size,):
            raise ValueError(f"reset mask must have shape ({self.batch_size},), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            return self
        out = self
        if self.xl is not None:
            keep = (~mask.bool()).to(self.xl.valid.device)
            mems = tuple(m * keep.view(-1, 1, 1).to(m.dtype) for m in self.xl.mems)
            out = replace(out, xl=XLState(mems=mems, valid=self.xl.valid * keep.long()))
        if self.knn is not None:
            keep = (~mask.bool()).to(self.knn.written.device)
            k4 = keep.view(-1, 1, 1, 1)
            out = replace(out, knn=KNNState(keys=tuple(torch.where(k4, k, 0) for k in self.knn.keys),
                                            values=tuple(torch.where(k4, v, 0) for v in self.knn.values),
                                            written=self.knn.written * keep.long()))
        if self.lstm is not None:
            out = replace(out, lstm=self.lstm.reset(~mask.bool()))
        if self.tokens is not None:
            drop = mask.bool().to(self.tokens.fresh.device)
            pending = self.tokens.pending
            if pending.shape[1]:
                if not bool(drop.all()):
                    raise ValueError(f"cannot reset some lanes inside an unfinished segment of memory tokens "
                                     f"({pending.shape[1]} tokens pending); reset at segment boundaries or all lanes")
                pending = pending[:, :0]
            out = replace(out, tokens=TokensState(mem=torch.where(drop.view(-1, 1, 1), 0, self.tokens.mem),
                                                  fresh=self.tokens.fresh | drop, pending=pending))
        return out

    def detach(self) -> "State":
        out = self
        if self.xl is not None:
            out = replace(out, xl=XLState(mems=tuple(m.detach() for m in self.xl.mems), valid=self.xl.valid))
        if self.knn is not None:
            out = replace(out, knn=KNNState(keys=tuple(k.detach() for k in self.knn.keys),
                                            values=tuple(v.detach() for v in self.knn.values),
                                            written=self.knn.written))
        if self.lstm is not None:
            out = replace(out, lstm=self.lstm.detach())
        if self.tokens is not None:
            out = replace(out, tokens=replace(self.tokens, mem=self.tokens.mem.detach()))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"batch_size": torch.tensor(self.batch_size)}
        if self.xl is not None:
            out["xl.valid"] = self.xl.valid
            for i, m in enumerate(self.xl.mems):
                out[f"xl.mems.{i}"] = m.contiguous()
        if self.knn is not None:
            out["knn.written"] = self.knn.written
            for i, (k, v) in enumerate(zip(self.knn.keys, self.knn.values)):
                out[f"knn.keys.{i}"] = k.contiguous()
                out[f"knn.values.{i}"] = v.contiguous()
        if self.lstm is not None:
            out["lstm.h"], out["lstm.c"] = self.lstm.h.contiguous(), self.lstm.c.contiguous()
        if self.tokens is not None:
            out["tokens.mem"], out["tokens.fresh"] = self.tokens.mem.detach().contiguous(), self.tokens.fresh
            out["tokens.pending"] = self.tokens.pending.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "State":
        if "batch_size" not in d:
            raise ValueError("not a longmem memory state: 'batch_size' is missing")
        xl = None
        if "xl.valid" in d:
            n = sum(1 for k in d if k.startswith("xl.mems."))
            xl = XLState(mems=tuple(d[f"xl.mems.{i}"] for i in range(n)), valid=d["xl.valid"].long())
        knn = None
        if "knn.written" in d:
            n = sum(1 for k in d if k.startswith("knn.keys."))
            knn = KNNState(keys=tuple(d[f"knn.keys.{i}"] for i in range(n)),
                           values=tuple(d[f"knn.values.{i}"] for i in range(n)), written=d["knn.written"].long())
        lstm = LSTMState(h=d["lstm.h"], c=d["lstm.c"]) if "lstm.h" in d else None
        tokens = None
        if "tokens.mem" in d:
            pending = d.get("tokens.pending", torch.zeros(d["tokens.mem"].shape[0], 0, dtype=torch.long))
            tokens = TokensState(mem=d["tokens.mem"], fresh=d["tokens.fresh"].bool(), pending=pending.long())
        return cls(batch_size=int(d["batch_size"]), xl=xl, knn=knn, lstm=lstm, tokens=tokens)

    def parts(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "batch_size" and getattr(self, f.name) is not None]
