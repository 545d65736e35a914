"""Differentiable Neural Computer (Graves et al. 2016, Nature 538:471, "Hybrid computing using neural networks",
Methods: "Memory addressing").

Legend: B lanes, S memory slots (the paper's N), W slot width, R read heads.

The controller loop is the NTM's (``ntm.MemoryController``); the memory access differs. From the interface
vector xi_t come read keys k^r (R, W) and strengths beta^r (R), a write key k^w and strength beta^w, an erase
vector e, a write vector v, free gates f (R), an allocation gate g^a, a write gate g^w and read modes pi (R, 3).
Each step, in this order:

    psi = prod_i (1 - f^i w^{r,i}_{t-1})                    retention
    u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} w^w_{t-1}) psi       usage
    a_t[phi_j] = (1 - u_t[phi_j]) prod_{i<j} u_t[phi_i]       allocation, phi the slots by ascending usage
    w^w = g^w (g^a a_t + (1 - g^a) C(M_{t-1}, k^w, beta^w))   write weighting
    M_t = M_{t-1} (E - w^w e^T) + w^w v^T                     write (the NTM's erase and add)
    L_t[i, j] = (1 - w^w[i] - w^w[j]) L_{t-1}[i, j] + w^w[i] p_{t-1}[j],  L_t[i, i] = 0     temporal links
    p_t = (1 - sum_i w^w[i]) p_{t-1} + w^w                    precedence
    f^i = L_t w^{r,i}_{t-1},  b^i = L_t^T w^{r,i}_{t-1}        forward and backward weightings
    w^{r,i} = pi^i[1] b^i + pi^i[2] C(M_t, k^{r,i}, beta^{r,i}) + pi^i[3] f^i
    r^i = M_t^T w^{r,i}

The link matrix is dense, (S, S) per lane: the sparse approximation of the paper (K links per row) pays only
when S is in the thousands, and is not implemented.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from longmem.classic.config import DNCConfig
from longmem.classic.ntm import MemoryController, content_weights, oneplus, read, write
from longmem.classic.states import DNCState

USAGE_EPS = 1e-6          # usage kept in [eps, 1]: the product in the allocation never multiplies by exactly 0


def allocation(usage: torch.Tensor) -> torch.Tensor:
    """a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i], phi the slots sorted by ascending usage (the free list):
    the least used slot gets the most. usage (B, S) -> (B, S). The sort itself passes no gradient."""
    u = USAGE_EPS + (1 - USAGE_EPS) * usage
    sorted_u, phi = torch.sort(u, dim=-1, stable=True)               # (B, S) each
    before = torch.cumprod(torch.cat([torch.ones_like(sorted_u[:, :1]), sorted_u[:, :-1]], dim=-1), dim=-1)
    return torch.zeros_like(u).scatter(-1, phi, (1 - sorted_u) * before)


def update_links(link: torch.Tensor, precedence: torch.Tensor, write_weights: torch.Tensor) -> torch.Tensor:
    """L_t[i, j] = (1 - w[i] - w[j]) L_{t-1}[i, j] + w[i] p_{t-1}[j] with a zero diagonal: L[i, j] is how much
    slot i was written right after slot j. link (B, S, S), precedence and write_weights (B, S)."""
    w = write_weights
    link = (1 - w[:, :, None] - w[:, None, :]) * link + w[:, :, None] * precedence[:, None, :]
    return link * (1 - torch.eye(link.shape[-1], device=link.device, dtype=link.dtype))


class DNC(MemoryController):
    part = "dnc"

    def __init__(self, config: DNCConfig):
        R, W = config.read_heads, config.memory_width
        self.sizes = [R * W, R, W, 1, W, W, R, 1, 1, 3 * R]           # the interface vector's pieces, in order
        super().__init__(config, interface_size=sum(self.sizes))

    def initial_part(self, batch_size: int, *, device, dtype) -> DNCState:
        c = self.config
        return DNCState.initial(batch_size, n_layers=c.n_layers, width=c.d_model, slots=c.memory_slots,
                                slot_width=c.memory_width, read_heads=c.read_heads, device=device, dtype=dtype)

    def access(self, interface: torch.Tensor, part: DNCState) -> DNCState:
        B, R, W = interface.shape[0], self.config.read_heads, self.config.memory_width
        (read_keys, read_strength, write_key, write_strength, erase, vector, free, alloc_gate, write_gate,
         modes) = interface.split(self.sizes, dim=-1)
        free = torch.sigmoid(free)                                     # (B, R)
        psi = torch.prod(1 - free[:, :, None] * part.read_weights, dim=1)                     # (B, S)
        usage = (part.usage + part.write_weights - part.usage * part.write_weights) * psi
        write_content = content_weights(part.memory, write_key[:, None], oneplus(write_strength))[:, 0]   # (B, S)
        alloc_gate, write_gate = torch.sigmoid(alloc_gate), torch.sigmoid(write_gate)         # (B, 1) each
        w_write = write_gate * (alloc_gate * allocation(usage) + (1 - alloc_gate) * write_content)   # (B, S)
        memory = write(part.memory, w_write, torch.sigmoid(erase), vector)
        link = update_links(part.link, part.precedence, w_write)
        precedence = (1 - w_write.sum(-1, keepdim=True)) * part.precedence + w_write
        forward = torch.einsum("bij,brj->bri", link, part.read_weights)                       # (B, R, S)
        backward = torch.einsum("bji,brj->bri", link, part.read_weights)
        content = content_weights(memory, read_keys.view(B, R, W), oneplus(read_strength))    # (B, R, S)
        pi = torch.softmax(modes.view(B, R, 3), dim=-1)                    # (B, R, 3): backward, content, forward
        w_read = pi[..., 0:1] * backward + pi[..., 1:2] * content + pi[..., 2:3] * forward
        return replace(part, memory=memory, usage=usage, link=link, precedence=precedence, read_weights=w_read,
                       write_weights=w_write, reads=read(memory, w_read))
