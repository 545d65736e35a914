"""Neural Turing Machine (Graves, Wayne & Danihelka 2014, arXiv:1410.5401), and the controller loop it shares
with the Differentiable Neural Computer (``dnc.py``).

Legend: B lanes, N tokens in a call (time), L controller layers, D controller width, S memory slots
(the paper's N), W slot width (the paper's M), H heads (R read heads + 1 write head), K = 2s + 1 shifts.

Each step an LSTM controller reads the input x_t and the last read vectors r_{t-1}; a linear layer of its
output h_t emits every head's parameters (the interface); the heads access the memory (NTM: all heads address
M_{t-1}, the read heads read it, then the write head writes; DNC: write, then read); the output is a linear
layer of [h_t; r_t]. NTM addressing (§3.3), per head:

    w^c = softmax(beta K[k, M_i])                  content, K the cosine similarity (§3.3.1)
    w^g = g w^c + (1 - g) w_{t-1}                  interpolation (§3.3.2)
    w~(i) = sum_j w^g(j) s(i - j)                  circular convolution with the shift weighting s
    w(i) = w~(i)^gamma / sum_j w~(j)^gamma         sharpening, gamma >= 1
    r = sum_i w(i) M_i                             reading (§3.1)
    M_i <- M_i (1 - w(i) e) + w(i) a               writing: erase, then add (§3.2)

The model follows the MemoryLM contract (``forward(tokens, state, targets, reset) -> LMOutput``): the
controller and the memory are the state part ``ntm`` (``states.py``), carried from call to call and cleared
per lane by ``reset``, so a language-model stream (bAbI read as words, the DNC's setting) trains through the
one trainer with the memory saved in checkpoints. With ``model.bits`` it reads and writes bit vectors
(``bits.py``) for the algorithmic tasks of §4.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from longmem.classic.bits import BitEmbedding, bit_loss, out_channels
from longmem.classic.config import NTMConfig
from longmem.classic.states import NTMState
from longmem.models.memory import State
from longmem.models.transformer import LMOutput, lm_loss, start_call

EPS = 1e-8
# The interface is clipped to +-20 and keys and added vectors pass through tanh, as in Collier & Beel 2018
# ("Implementing Neural Turing Machines", §3), whose NTM trains reliably where unbounded ones stall.
INTERFACE_CLIP = 20.0


# -- addressing ---------------------------------------------------------------
def content_weights(memory: torch.Tensor, keys: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """softmax_i(beta K[k, M_i]), K the cosine similarity (NTM §3.3.1; the DNC's content lookup C(M, k, beta)).
    memory (B, S, W), keys (B, H, W), strength (B, H) -> (B, H, S)."""
    sim = torch.einsum("bhw,bsw->bhs", F.normalize(keys, dim=-1, eps=EPS), F.normalize(memory, dim=-1, eps=EPS))
    return torch.softmax(strength[..., None] * sim, dim=-1)


def shift(weights: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Circular convolution w~(i) = sum_j w(j) s(i - j) (NTM §3.3.2, eq. 8); shifts (B, H, 2s+1) weigh the
    moves -s..s (index k moves the focus by k - s locations). weights (B, H, S) -> (B, H, S)."""
    s = shifts.shape[-1] // 2
    moved = torch.stack([torch.roll(weights, k - s, dims=-1) for k in range(2 * s + 1)], dim=-1)  # (B, H, S, K)
    return (moved * shifts[..., None, :]).sum(-1)


def sharpen(weights: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """w(i) = w(i)^gamma / sum_j w(j)^gamma (NTM §3.3.2, eq. 9); gamma (B, H) >= 1. The small floor keeps the
    gradient of a zero weight finite (0^gamma log 0)."""
    w = (weights + EPS) ** gamma[..., None]
    return w / w.sum(-1, keepdim=True)


def ntm_address(memory: torch.Tensor, previous: torch.Tensor, *, key: torch.Tensor, strength: torch.Tensor,
                gate: torch.Tensor, shifts: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The weighting of every head (NTM §3.3, Figure 2): content, interpolation with ``previous`` (B, H, S),
    shift, sharpening. key (B, H, W); strength, gate, gamma (B, H); shifts (B, H, 2s+1)."""
    w = content_weights(memory, key, strength)
    w = gate[..., None] * w + (1 - gate[..., None]) * previous
    return sharpen(shift(w, shifts), gamma)


def read(memory: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r = sum_i w(i) M_i: memory (B, S, W), weights (B, H, S) -> (B, H, W)."""
    return torch.bmm(weights, memory)


def write(memory: torch.Tensor, weights: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """M_i (1 - w(i) e) + w(i) a (NTM §3.2; the DNC's write): weights (B, S), erase and add (B, W)."""
    return memory * (1 - weights[:, :, None] * erase[:, None, :]) + weights[:, :, None] * add[:, None, :]


def oneplus(x: torch.Tensor) -> torch.Tensor:
    """1 + log(1 + e^x): a strength or sharpening exponent >= 1 (Graves et al. 2016, Methods)."""
    return 1 + F.softplus(x)


# -- the controller loop (NTM and DNC) ------------------------------------------
class MemoryController(nn.Module):
    """An LSTM controller with an external memory: the loop over time both the NTM and the DNC run. A subclass
    names its state part (``part``, a dataclass with ``h`` and ``c``), builds its initial value
    (``initial_part``) and moves the memory one step (``access``: the interface vector and the part -> the part
    with its new ``reads``)."""
    stateful = True               # the state is carried across calls, whatever the settings
    whole_segments = False
    part = ""

    def __init__(self, config, *, interface_size: int):
        super().__init__()
        self.config = copy.deepcopy(config)
        c = self.config
        D, R, W = c.d_model, c.read_heads, c.memory_width
        self.embed: nn.Module = BitEmbedding(c.bits, D) if c.bits else nn.Embedding(c.vocab_size, D)
        self.cells = nn.ModuleList(nn.LSTMCell(D + R * W if i == 0 else D, D) for i in range(c.n_layers))
        self.interface = nn.Linear(D, interface_size)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(D + R * W, out_channels(c.bits) if c.bits else c.vocab_size)   # y = W_y h + W_r r

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def for_decoding(self):
        return self

    def initial_part(self, batch_size: int, *, device, dtype):
        raise NotImplementedError

    def access(self, interface: torch.Tensor, part):
        raise NotImplementedError

    def init_state(self, batch_size: int, *, device: torch.device | str | None = None) -> State:
        weight = self.interface.weight
        part = self.initial_part(batch_size, device=device if device is not None else weight.device,
                                 dtype=weight.dtype)
        return State(batch_size, {self.part: part})

    def forward(self, tokens: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None,
                reset: torch.Tensor | None = None) -> LMOutput:
        state = start_call(tokens, state, reset, init_state=self.init_state,
                           has_part=lambda state: state.part(self.part) is not None)
        B, N = tokens.shape
        part = state.part(self.part)
        h, c = list(part.h.unbind(1)), list(part.c.unbind(1))         # L x (B, D)
        x = self.embed(tokens)                                        # (B, N, D)
        outputs = []
        for t in range(N):
            inp = torch.cat([x[:, t], part.reads.flatten(1)], dim=-1)  # (B, D + R W): x_t and r_{t-1}
            for i, cell in enumerate(self.cells):
                h[i], c[i] = cell(inp, (h[i], c[i]))
                inp = h[i]
            part = self.access(self.interface(h[-1]), part)            # the part with new reads r_t
            outputs.append(torch.cat([h[-1], part.reads.flatten(1)], dim=-1))
        logits = self.head(self.drop(torch.stack(outputs, dim=1)))     # (B, N, V) or (B, N, C_out)
        part = replace(part, h=torch.stack(h, dim=1), c=torch.stack(c, dim=1))   # (B, L, D)
        return LMOutput(logits=logits, loss=self.loss(logits, targets), state=State(B, {self.part: part}))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy over targets (tokens), or bitwise cross-entropy per target vector (bits)."""
        if targets is None or not self.config.bits:
            return lm_loss(logits, targets)
        assert isinstance(self.embed, BitEmbedding)
        return bit_loss(logits, *self.embed.target_bits(targets))


class NTM(MemoryController):
    part = "ntm"

    def __init__(self, config: NTMConfig):
        W, K = config.memory_width, 2 * config.shift_range + 1
        self.head_size = W + K + 3                                    # key, shifts, strength, gate, gamma
        super().__init__(config, interface_size=(config.read_heads + 1) * self.head_size + 2 * W)   # + erase, add

    def initial_part(self, batch_size: int, *, device, dtype) -> NTMState:
        c = self.config
        return NTMState.initial(batch_size, n_layers=c.n_layers, width=c.d_model, slots=c.memory_slots,
                                slot_width=c.memory_width, read_heads=c.read_heads, device=device, dtype=dtype)

    def access(self, interface: torch.Tensor, part: NTMState) -> NTMState:
        c = self.config
        B, W, R, K = interface.shape[0], c.memory_width, c.read_heads, 2 * c.shift_range + 1
        interface = interface.clamp(-INTERFACE_CLIP, INTERFACE_CLIP)
        heads = interface[:, :(R + 1) * self.head_size].view(B, R + 1, self.head_size)     # (B, H, P)
        key, shifts, rest = heads.split([W, K, 3], dim=-1)
        strength, gate, gamma = F.softplus(rest[..., 0]), torch.sigmoid(rest[..., 1]), oneplus(rest[..., 2])
        erase, add = interface[:, (R + 1) * self.head_size:].split([W, W], dim=-1)          # (B, W) each
        key, add = torch.tanh(key), torch.tanh(add)            # bounded keys and memory contents (Collier & Beel)
        # every head addresses M_{t-1} at once; the read heads read it, then the write head (last) writes M_t
        w = ntm_address(part.memory, part.weights, key=key, strength=strength, gate=gate,
                        shifts=torch.softmax(shifts, dim=-1), gamma=gamma)          # (B, H, S)
        reads = read(part.memory, w[:, :R])
        memory = write(part.memory, w[:, R], torch.sigmoid(erase), add)
        return replace(part, memory=memory, weights=w, reads=reads)
