"""Bit-vector input and output for the algorithmic tasks of the Neural Turing Machine (Graves et al. 2014 §4):
the recurrent baselines (lstm, ntm, dnc) read a ``BitsTokenizer`` token as its bits and write bit logits,
scored by bitwise cross-entropy, when ``model.bits`` is set (the tasks set it from the tokenizer).

Legend: B lanes, N positions, W bits per vector, V = 2**W + markers token ids, D width,
C_in = W + 4 input channels (the bits, then DELIM, QUERY, REPEAT, END; a blank reads all zeros, as the
paper's output phase), C_out = W + 1 output channels (the bits, then the end bit of repeat copy).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.data.tokenizer import BitsTokenizer
from longmem.models.transformer import IGNORE_INDEX


def in_channels(width: int) -> int:
    return width + len(BitsTokenizer.SPECIALS) - 1              # every marker but the blank has a channel


def out_channels(width: int) -> int:
    return width + 1


def bit_tables(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, C_in) what each token id reads, (V, C_out) what each id is as a target (markers other than the
    end marker are never targets: zeros)."""
    tok = BitsTokenizer(width)
    v = torch.arange(tok.n_vectors)[:, None]
    bits = ((v >> torch.arange(width - 1, -1, -1)) & 1).float()          # (2**W, W), most significant first
    markers = [s for s in tok.SPECIALS if s != tok.BLANK]
    inp = torch.zeros(tok.vocab_size, in_channels(width))
    out = torch.zeros(tok.vocab_size, out_channels(width))
    inp[:tok.n_vectors, :width] = bits
    out[:tok.n_vectors, :width] = bits
    for k, s in enumerate(markers):
        inp[tok.ids[s], width + k] = 1.0
    out[tok.ids[tok.END], width] = 1.0
    return inp, out


class BitEmbedding(nn.Linear):
    """Token ids -> (..., D): a linear layer over the id's input channels (``bit_tables``); ``weight`` is
    (D, C_in), so code that asks ``model.embed.weight`` for the device and dtype works unchanged."""
    table: torch.Tensor          # (V, C_in) buffers, not saved: rebuilt from the width
    targets: torch.Tensor        # (V, C_out)

    def __init__(self, width: int, d_model: int):
        super().__init__(in_channels(width), d_model)
        self.width = width
        inp, out = bit_tables(width)
        self.register_buffer("table", inp, persistent=False)
        self.register_buffer("targets", out, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.table[tokens].to(self.weight.dtype), self.weight, self.bias)

    def target_bits(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """targets (B, N) ids or IGNORE_INDEX -> bits (B, N, C_out), mask (B, N) of the positions scored."""
        mask = targets != IGNORE_INDEX
        return self.targets[targets.clamp(min=0)], mask


def bit_loss(logits: torch.Tensor, bits: torch.Tensor, mask: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Bitwise cross-entropy (nats) summed over the C_out channels of the scored positions: ``sum``, or the
    ``mean`` per scored position (a vector's cost; the NTM paper plots it in bits per sequence)."""
    per_bit = F.binary_cross_entropy_with_logits(logits.float(), bits, reduction="none")   # (B, N, C_out)
    total = (per_bit.sum(-1) * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


def bit_errors(logits: torch.Tensor, bits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) wrong bits per sequence over the scored positions and all C_out channels (a logit > 0 reads 1)."""
    wrong = ((logits > 0).float() != bits).sum(-1)                 # (B, N)
    return (wrong * mask).sum(-1)
