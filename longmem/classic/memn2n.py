"""End-to-end memory network (Sukhbaatar et al. 2015), the question-answering baseline.

Legend: B examples, M memory slots (sentences), J words per sentence, K hops,
D embedding width, V vocabulary (answers are words of the vocabulary).

Facts are written into memory slots (one per sentence) and read by attention
over K hops:

    m_i = sum_j l_j * A^k x_ij + T_A^k(i)        (position encoding + temporal encoding, §4.1)
    c_i = sum_j l_j * C^k x_ij + T_C^k(i)
    p   = softmax(u^k . m_i)                      (no softmax in linear start, §4.2)
    u^{k+1} = u^k + sum_i p_i c_i
    answer logits = W u^{K+1}

Adjacent weight tying (§2.2): A^{k+1} = C^k, B = A^1, W^T = C^K, so there are
K + 1 embedding matrices (and K + 1 temporal tables) in all.

Two details follow the authors' released code rather than the paper's text (``model.pe_formula`` and
``model.attend_empty`` switch back; BENCHMARKS.md measures both): the position encoding
l_kj = 1 + 4 (k - (d+1)/2)(j - (J+1)/2) / (d J), whose word weights average 1, where the printed
formula's average 1/2; and the softmax counts the empty slots up to ``memory_size`` at score 0 (there an
empty slot is the zero "nil" embedding), so a hop can put its weight on nothing, which yes/no questions use.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.classic.config import MemN2NConfig


@dataclass
class QAOutput:
    logits: torch.Tensor           # (B, V) answer scores over the vocabulary
    loss: torch.Tensor | None      # mean cross-entropy against the answers
    attention: torch.Tensor        # (B, K, M) weights over the story's slots per hop (0 on padding)
    empty: torch.Tensor            # (B, K) weight on the empty slots up to memory_size (model.attend_empty)


def pe_terms(j: torch.Tensor, J: torch.Tensor, dim: int, formula: str = "code") -> tuple[torch.Tensor, torch.Tensor]:
    """Position encoding as l_kj = a_j + (k/d) g_j: (a, g) for word positions ``j`` (1-based) of
    sentences of ``J`` words (broadcast together).

    paper (§4.1): l_kj = (1 - j/J) - (k/d)(1 - 2j/J), so a = 1 - j/J, g = 2j/J - 1.
    code (the authors' release): l_kj = 1 + 4 (k - (d+1)/2)(j - (J+1)/2) / (d J); with
    c = (j - (J+1)/2) / J that is a = 1 - 2 c (d+1)/d, g = 4 c."""
    if formula == "paper":
        return 1 - j / J, 2 * j / J - 1
    if formula == "code":
        c = (j - (J + 1) / 2) / J
        return 1 - 2 * c * (dim + 1) / dim, 4 * c
    raise ValueError(f"unknown position encoding formula {formula!r}; accepted: code, paper")


def position_encoding(lengths: torch.Tensor, n_words: int, dim: int, formula: str = "code") -> torch.Tensor:
    """l_kj for every word position and dimension, with J each sentence's own length.

    lengths: (...,) words per sentence -> (..., n_words, dim). Using the true
    length (not the padded one) makes a sentence's embedding independent of the
    batch it sits in."""
    J = lengths.clamp(min=1).to(torch.float32)[..., None, None]                    # (..., 1, 1)
    j = torch.arange(1, n_words + 1, device=lengths.device, dtype=torch.float32)[:, None]  # (J, 1)
    k = torch.arange(1, dim + 1, device=lengths.device, dtype=torch.float32) / dim          # (D,)
    a, g = pe_terms(j, J, dim, formula)
    return a + k * g                                                               # (..., J, D)


class MemN2N(nn.Module):
    def __init__(self, config: MemN2NConfig):
        super().__init__()
        self.config = copy.deepcopy(config)
        c = self.config
        K, D = c.hops, c.d_model
        # C^0 .. C^K side by side in one table: row w holds word w in all K + 1 embeddings, so every
        # hop's sentence embeddings come from one matrix product. C^0 is A^1 = B (question), C^k is the
        # output of hop k and the input of hop k + 1. The temporal tables T^0 .. T^K likewise.
        self.embed = nn.Embedding(c.vocab_size, (K + 1) * D)
        self.temporal = nn.Embedding(c.memory_size, (K + 1) * D)
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.embed.weight, std=0.1)                 # N(0, 0.1) as in §4.2
        nn.init.normal_(self.temporal.weight, std=0.1)
        beta = torch.arange(1, D + 1, dtype=torch.float32) / D
        self.register_buffer("beta", beta.repeat(K + 1), persistent=False)   # ((K+1) D,)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, words: torch.Tensor) -> torch.Tensor:
        """words (..., J), 0-padded -> (..., K+1, D): sum_j l_j * C^k x_j for every table k.

        Position encoding splits as l_kj = a_j + beta_k g_j with beta_k = k/d (``pe_terms``), so the
        encoding is one weighted bag of words (``embedding_bag``) over the table [C; beta * C] with the
        words twice, and never builds an (N, J, (K+1) D) tensor."""
        K1, D = self.config.hops + 1, self.config.d_model
        lead, J = words.shape[:-1], words.shape[-1]
        w = words.reshape(-1, J)                                      # (N, J)
        present = (w != 0).to(self.embed.weight.dtype)                 # (N, J)
        length = present.sum(-1, keepdim=True).clamp(min=1)           # (N, 1) each sentence's own J
        j = torch.arange(1, J + 1, device=w.device, dtype=present.dtype)
        a, g = pe_terms(j, length, D, self.config.pe_formula)
        a, g = a * present, g * present                               # (N, J) each
        E = self.embed.weight                                          # (V, (K+1) D)
        table = torch.cat([E, E * self.beta], dim=0)                   # (2V, (K+1) D)
        bags = F.embedding_bag(torch.cat([w, w + E.shape[0]], dim=1), table,
                               per_sample_weights=torch.cat([a, g], dim=1), mode="sum")   # (N, (K+1) D)
        return bags.view(*lead, K1, D)

    def forward(self, story: torch.Tensor, n_memories: torch.Tensor, question: torch.Tensor,
                answer: torch.Tensor | None = None, *, linear: bool = False) -> QAOutput:
        """story: (B, M, J) word ids, slot 0 the oldest, slots >= n_memories[b] empty;
        n_memories: (B,) slots in use (empty "noise" sentences count as used);
        question: (B, J') word ids; answer: (B,) ids; ``linear`` drops the softmax (linear start)."""
        if story.dim() != 3 or question.dim() != 2:
            raise ValueError(f"story must be (batch, slots, words) and question (batch, words); got "
                             f"{tuple(story.shape)} and {tuple(question.shape)}")
        B, M, J = story.shape
        K, D = self.config.hops, self.config.d_model
        if M > self.config.memory_size:
            raise ValueError(f"story has {M} slots but model.memory_size is {self.config.memory_size}")
        slot = torch.arange(M, device=story.device)
        valid = slot[None, :] < n_memories[:, None]                  # (B, M)
        # temporal index: the most recent sentence is 0 (Sukhbaatar et al. 2015 §4.1)
        age = (n_memories[:, None] - 1 - slot[None, :]).clamp(min=0)  # (B, M)
        mem = self.encode(story) + self.temporal(age).view(B, M, K + 1, D)   # (B, M, K+1, D): C^k + T^k
        # one (B, M, D) tensor per table: indexing mem[:, :, k] in the loop would make every use
        # backpropagate a zero-filled (B, M, K+1, D) gradient (a third of the step's time)
        mem = mem.unbind(dim=2)                                       # K+1 x (B, M, D)
        u = self.encode(question)[:, 0]                               # (B, D), B = C^0
        # the memory_size - n empty slots score 0 and read 0: one extra logit log(memory_size - n)
        # stands for all of them (-inf when the memory is full, or when attend_empty is off)
        n_empty = (self.config.memory_size - n_memories).clamp(min=0) if self.config.attend_empty \
            else torch.zeros_like(n_memories)
        empty_logit = n_empty.to(u.dtype).log()[:, None]              # (B, 1)
        attention, empty = [], []
        for k in range(1, K + 1):
            scores = torch.bmm(mem[k - 1], u[:, :, None])[..., 0]     # (B, M), A^k = C^{k-1}
            if linear:
                p, p_empty = scores.masked_fill(~valid, 0.0), torch.zeros_like(empty_logit[:, 0])
            else:
                logits = torch.cat([scores.masked_fill(~valid, float("-inf")), empty_logit], dim=-1)
                p = torch.softmax(logits, dim=-1).nan_to_num(0.0)     # a story of 0 sentences: all 0
                p, p_empty = p[:, :-1], p[:, -1]
            attention.append(p)
            empty.append(p_empty)
            u = u + torch.bmm(p[:, None, :], mem[k])[:, 0]            # (B, D), output C^k
        W = self.embed.weight[:, K * D:]                               # (V, D), W^T = C^K
        logits = self.drop(u) @ W.T                                    # (B, V)
        loss = F.cross_entropy(logits.float(), answer) if answer is not None else None
        return QAOutput(logits=logits, loss=loss, attention=torch.stack(attention, dim=1),
                        empty=torch.stack(empty, dim=1))
