"""Encoder-decoder Transformer with cross-attention (Vaswani et al. 2017; the
attention of Bahdanau et al. 2015 and Luong et al. 2015 in its Transformer form).

Legend: B batch, S source length, T target length, H heads, Dh head size,
D width, V vocabulary.

The encoder reads the whole source with bidirectional self-attention (padding
masked); the decoder is causal and attends over every encoder output at each
layer. Positions are rotary in self-attention; cross-attention has none (the
encoder outputs carry them). One embedding serves source, target and output.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.classic.config import Seq2SeqConfig
from longmem.models.attention import MLP, Attention, Block, LayerView, RMSNorm, Rotary
from longmem.models.transformer import IGNORE_INDEX


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor           # (B, T, V)
    loss: torch.Tensor | None      # mean cross-entropy over targets != IGNORE_INDEX


class CrossAttention(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) decoder states; memory: (B, S, D) encoder outputs; mask: (B, 1, 1, S) valid source."""
        B, T, D = x.shape
        S = memory.shape[1]
        H, Dh = self.n_heads, self.head_dim
        q = self.q(x).view(B, T, H, Dh).transpose(1, 2)                        # (B, H, T, Dh)
        k, v = self.kv(memory).view(B, S, 2, H, Dh).permute(2, 0, 3, 1, 4)      # 2 x (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, Dh)
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(B, T, D)))


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention over the source, MLP."""

    def __init__(self, *, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.attn = Attention(d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.norm2 = RMSNorm(d_model)
        self.cross = CrossAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.norm3 = RMSNorm(d_model)
        self.mlp = MLP(d_model=d_model, d_ff=d_ff, dropout=dropout)

    def forward(self, x, *, memory, rope, source_mask) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), view=LayerView(mask=None, cos=rope[0], sin=rope[1]))   # causal
        x = x + self.cross(self.norm2(x), memory=memory, mask=source_mask)
        return x + self.mlp(self.norm3(x))


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = copy.deepcopy(config)
        c = self.config
        kw = dict(d_model=c.d_model, n_heads=c.n_heads, d_ff=c.d_ff, dropout=c.dropout)
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(Block(**kw) for _ in range(c.n_layers))
        self.enc_norm = RMSNorm(c.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(**kw) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.embed.weight                                   # tied
        self.rope = Rotary(c.d_model // c.n_heads, base=c.rope_theta)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.modules():                                               # GPT-2 scaled residual init
            if isinstance(m, (Attention, CrossAttention)):
                nn.init.normal_(m.out.weight, std=0.02 / math.sqrt(4 * c.n_layers))
            if isinstance(m, MLP):
                nn.init.normal_(m.down.weight, std=0.02 / math.sqrt(4 * c.n_layers))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source, source_mask: (B, S) -> encoder outputs (B, S, D) and the cross-attention mask (B, 1, 1, S)."""
        if source.dim() != 2 or source_mask.shape != source.shape:
            raise ValueError(f"source and source_mask must both be (batch, length); got {tuple(source.shape)} "
                             f"and {tuple(source_mask.shape)}")
        B, S = source.shape
        x = self.drop(self.embed(source))                                      # (B, S, D)
        rope = self.rope.cos_sin(S, device=x.device, dtype=x.dtype)
        keys = source_mask[:, None, None, :]                                   # (B, 1, 1, S)
        mask = keys.expand(B, 1, S, S)                                         # bidirectional, padding hidden
        for block in self.encoder:
            x = block(x, view=LayerView(mask=mask, cos=rope[0], sin=rope[1]))
        return self.enc_norm(x), keys

    def decode(self, target_in: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """target_in: (B, T) -> logits (B, T, V)."""
        T = target_in.shape[1]
        x = self.drop(self.embed(target_in))                                   # (B, T, D)
        rope = self.rope.cos_sin(T, device=x.device, dtype=x.dtype)
        for block in self.decoder:
            x = block(x, memory=memory, rope=rope, source_mask=keys)
        return self.head(self.norm(x))                                         # (B, T, V)

    def forward(self, source: torch.Tensor, source_mask: torch.Tensor, target_in: torch.Tensor,
                targets: torch.Tensor | None = None) -> Seq2SeqOutput:
        memory, keys = self.encode(source, source_mask)
        logits = self.decode(target_in, memory, keys)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return Seq2SeqOutput(logits=logits, loss=loss)
