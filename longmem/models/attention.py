"""Causal multi-head self-attention over [memory; segment] with rotary positions.

Dimension legend: B batch (lanes), T segment length, M memory length,
S = M + T keys, H heads, Dh head size, D model width.

Positions are assigned inside the attention window: memory slot j has
position j, segment token t has position M + t. Rotary embeddings only see
differences of positions (Su et al. 2021), so a token's output depends on how
far back a key is, never on how long the stream has run.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding; ``max_position_seen`` is kept for inspection."""

    def __init__(self, head_dim: int, *, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_position_seen = -1

    def cos_sin(self, n_positions: int, *, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        self.max_position_seen = max(self.max_position_seen, n_positions - 1)
        pos = torch.arange(n_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))        # (S, Dh/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (B, H, L, Dh); cos/sin: (L, Dh/2); rotate pairs (x1, x2) of the two halves
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def smear(k: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Smeared keys (Olsson et al. 2022, "In-context learning and induction heads" §"smeared keys"):
    each key mixed with the key of the position before it, ``sigmoid(mix) k_s + (1 - sigmoid(mix)) k_{s-1}``
    per head. A key then also says which token came before it, so one layer can find "the token after
    the earlier occurrence of this one" (an induction head) without first learning a previous-token
    head in another layer: associative recall is learned in hundreds of steps instead of thousands.

    k: (B, H, S, Dh) keys of the context [memory; segment] before rotary positions; mix: (H,) logits.
    The first key of the context has no predecessor (zeros); neither has the first token after a reset,
    since empty memory slots hold zeros (a reset zeroes them) and so have zero keys."""
    prev = F.pad(k, (0, 0, 1, 0))[:, :, :-1]                               # (B, H, S, Dh): k_{s-1}
    a = torch.sigmoid(mix).view(1, -1, 1, 1).to(k.dtype)
    return a * k + (1 - a) * prev


class Attention(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, dropout: float, smear_keys: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        # smeared keys: one mixing logit per head, 0 = half this key, half the one before
        self.smear = nn.Parameter(torch.zeros(n_heads)) if smear_keys else None

    def forward(self, x: torch.Tensor, *, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, knn=None) -> torch.Tensor:
        """x: (B, T, D) queries; context: (B, S, D) = [memory; x] keys/values source.

        mask: (B, 1, T, S) bool, True where attention is allowed; None means plain causal (S == T).
        knn: a kNN-memory hook (``memory/knn.py``) called with the segment's q, k, v before
        rotary positions and the local output; it returns the gated mix (Wu et al. 2022).
        """
        B, T, D = x.shape
        S = context.shape[1]
        H, Dh = self.n_heads, self.head_dim
        q = self.q(x).view(B, T, H, Dh).transpose(1, 2)                       # (B, H, T, Dh)
        k, v = self.kv(context).view(B, S, 2, H, Dh).permute(2, 0, 3, 1, 4)   # 2 x (B, H, S, Dh)
        if self.smear is not None:
            k = smear(k, self.smear)                                     # (B, H, S, Dh)
        q_raw, k_raw, v_seg = q, k[:, :, S - T:], v[:, :, S - T:]           # for the kNN memory
        cos, sin = rope                                                        # (S, Dh/2)
        q = Rotary.rotate(q, cos[S - T:], sin[S - T:])
        k = Rotary.rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0)                  # (B, H, T, Dh)
        if knn is not None:
            y = knn(q=q_raw, k=k_raw, v=v_seg, y=y)                            # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, D)                                 # (B, T, D)
        return self.resid_drop(self.out(y))


class MLP(nn.Module):
    def __init__(self, *, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm block; keys and values come from norm([memory; x]) (Dai et al. 2019 eq. 1)."""

    def __init__(self, *, d_model: int, n_heads: int, d_ff: int, dropout: float, smear_keys: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.attn = Attention(d_model=d_model, n_heads=n_heads, dropout=dropout, smear_keys=smear_keys)
        self.norm2 = RMSNorm(d_model)
        self.mlp = MLP(d_model=d_model, d_ff=d_ff, dropout=dropout)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None, rope, mask, knn=None) -> torch.Tensor:
        h = self.norm1(x)
        context = h if memory is None else torch.cat([self.norm1(memory), h], dim=1)  # (B, M+T, D)
        x = x + self.attn(h, context=context, rope=rope, mask=mask, knn=knn)
        return x + self.mlp(self.norm2(x))
