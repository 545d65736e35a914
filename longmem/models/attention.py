"""The pieces of a block: RMSNorm, rotary positions, causal attention over [memory; segment], the MLP.

Dimension legend: B batch (lanes), T segment length (the positions of ``x``), M memory slots in front
of it, S = M + T keys, H query heads, G key/value heads (H / G queries share one, grouped-query
attention), Dh head size, D model width, F MLP width.

Positions are assigned inside the attention window: memory slot j has position j, segment
position t has position M + t. Rotary embeddings only see differences of positions (Su et al.
2021), so a token's output depends on how far back a key is, never on how long the stream has run.

The block options cover the Llama family (Touvron et al. 2023) and its relatives, so pretrained
checkpoints map onto this one block: grouped-query attention (Ainslie et al. 2023; ``n_kv_heads``),
SwiGLU (Shazeer 2020; ``mlp: swiglu``), optional q/k/v biases (Qwen2), optional per-head RMSNorm of
queries and keys before rotary positions (Qwen3), RMSNorm epsilon, rotary base and scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) in float32, gain ``weight``: (..., D) -> (..., D).
    Written out (square, mean, rsqrt, two products) rather than ``F.rms_norm``: on CPU the same numbers, and
    the fused op costs about 1.6x as much forward + backward at training sizes and more per decoded token."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope_inv_freq(head_dim: int, *, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """(Dh/2,) rotary frequencies ``theta ** (-2i / Dh)``, optionally rescaled:
    ``{"rope_type": "linear", "factor": f}`` is position interpolation (Chen et al. 2023: positions
    divided by f); ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` is Llama 3.1's frequency-dependent scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - low) / (high - low)                    # 0 at low_freq_wavelen, 1 at high
        scaled = torch.where(wavelen > old / low, inv / factor, inv)       # long waves interpolated
        mid = (1 - smooth) * inv / factor + smooth * inv
        between = (wavelen <= old / low) & (wavelen >= old / high)
        return torch.where(between, mid, scaled)
    raise ValueError(f"rope scaling type {kind!r}; accepted: default, linear, llama3")


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021). The cos/sin tables are built once per device and
    dtype and grown when a longer window is asked for; ``max_position_seen`` is kept for inspection."""
    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, *, base: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta=base, scaling=scaling), persistent=False)
        self.max_position_seen = -1
        self._tables: dict = {}

    def cos_sin(self, n_positions: int, *, device: torch.device | str,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of positions 0 .. n_positions - 1 as :meth:`rotate` takes them, each (n_positions, Dh):
        ``[cos, cos]`` and ``[-sin, sin]`` over the two halves of a head (the rotate-half layout)."""
        self.max_position_seen = max(self.max_position_seen, n_positions - 1)
        key = (torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < n_positions:
            n = max(n_positions, 2 * table[0].shape[0] if table is not None else 0, 256)
            pos = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))                  # (n, Dh/2)
            cos, sin = freqs.cos(), freqs.sin()
            table = self._tables[key] = (torch.cat([cos, cos], dim=-1).to(dtype),
                                         torch.cat([-sin, sin], dim=-1).to(dtype))
        return table[0][:n_positions], table[1][:n_positions]

    def at(self, positions: torch.Tensor, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of :meth:`cos_sin` for any positions: ``positions`` (B, L) long -> cos, sin (B, 1, L, Dh),
        the angles computed in float64, so a position in the millions keeps float32 accuracy (a key cached
        with its rotation then meets queries millions of positions later at the right distance)."""
        angles = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(torch.float64)   # (B, L, Dh/2)
        cos, sin = angles.cos(), angles.sin()
        return (torch.cat([cos, cos], dim=-1).unsqueeze(1).to(dtype),
                torch.cat([-sin, sin], dim=-1).unsqueeze(1).to(dtype))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Rotary":
        self._tables = {}                                                       # moved or cast: rebuild
        return super()._apply(fn, recurse)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the pairs (x1, x2) of the two halves of each head (rotate-half layout):
        ``[x1 cos - x2 sin, x2 cos + x1 sin]``. x: (B, H, L, Dh); cos, sin: (L, Dh) from :meth:`cos_sin`.
        Three passes over ``x`` (the halves swapped, a product, a fused multiply-add) instead of seven:
        decoding rotates every cached key at each token (about 20% less time for the rotation)."""
        h = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., h:], x[..., :h]), dim=-1), sin)


def smear(k: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Smeared keys (Olsson et al. 2022, "In-context learning and induction heads" §"smeared keys"):
    each key mixed with the key of the position before it, ``sigmoid(mix) k_s + (1 - sigmoid(mix)) k_{s-1}``
    per head. A key then also says which token came before it, so one layer can find "the token after
    the earlier occurrence of this one" (an induction head) without first learning a previous-token
    head in another layer: associative recall is learned in hundreds of steps instead of thousands.

    k: (B, G, S, Dh) keys of the context [memory; segment] before rotary positions; mix: (G,) logits.
    The first key of the context has no predecessor (zeros); neither has the first token after a reset,
    since empty memory slots hold zeros (a reset zeroes them) and so have zero keys.

    Wider (``model.smear_width`` w > 2; mix: (G, w) logits): ``sum_j softmax(mix)_j k_{s-j}`` over the offsets
    j = 0 .. w - 1, a depthwise causal convolution of the keys (Primer, So et al. 2021 §3.2, on keys only)."""
    if mix.dim() == 1:
        prev = F.pad(k, (0, 0, 1, 0))[:, :, :-1]                           # (B, G, S, Dh): k_{s-1}
        a = torch.sigmoid(mix).view(1, -1, 1, 1).to(k.dtype)
        return a * k + (1 - a) * prev
    w = mix.softmax(-1).to(k.dtype)                                         # (G, width)
    out = k * w[:, 0].view(1, -1, 1, 1)
    for j, kj in enumerate(keys_before(k, mix.shape[1], k.shape[2]), 1):        # k_{s-j}
        out = out + kj * w[:, j].view(1, -1, 1, 1)
    return out


def keys_before(k: torch.Tensor, width: int, n: int) -> list[torch.Tensor]:
    """The keys j = 1 .. width - 1 positions before each of the last ``n`` positions of ``k`` (B, G, S, Dh), zeros
    before the context: width - 1 tensors (B, G, n, Dh), the taps of :func:`smear` and :func:`smear_queries`."""
    S = k.shape[2]
    padded = F.pad(k, (0, 0, width - 1, 0))                                 # (B, G, width - 1 + S, Dh)
    return [padded[:, :, width - 1 + S - n - j:width - 1 + S - j] for j in range(1, width)]


def smear_queries(q: torch.Tensor, keys: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Queries mixed with the keys of the positions before them: ``softmax(mix)_0 q_t + sum_j softmax(mix)_j
    k_{t-j}``, j = 1 .. w - 1 (``model.smear_queries`` = w - 1), per query head, each query head reading its key
    head's keys. A query at "Where is Mary? Answer:" then carries the key of "Mary" three positions back, and
    meets the key of a place a few positions after "Mary" (smeared keys, ``model.smear_width``) with the product
    of the two: a binding of a subject and its place matched in one layer.

    q: (B, H, T, Dh) the segment's queries before rotary positions; keys: (B, G, S, Dh) the context [memory;
    segment] unsmeared (the segment its last T); mix: (H, w) logits. Positions before the context read zeros."""
    H, T, G = q.shape[1], q.shape[2], keys.shape[1]
    a = mix.softmax(-1).to(q.dtype)                                          # (H, w)
    out = q * a[:, 0].view(1, H, 1, 1)
    for j, kj in enumerate(keys_before(keys, mix.shape[1], T), 1):               # k_{t-j} for the segment's t
        out = out + kj.repeat_interleave(H // G, dim=1) * a[:, j].view(1, H, 1, 1)
    return out


def prefix_mask(valid: torch.Tensor, memory_len: int, length: int) -> torch.Tensor:
    """(B, 1, L, M + L) bool, True where attention is allowed: the last ``valid[b]`` of the M memory slots
    (right-aligned history) and causal attention over the L positions of the segment."""
    device = valid.device
    slot = torch.arange(memory_len, device=device)
    mem_ok = slot.unsqueeze(0) >= (memory_len - valid).unsqueeze(1)                      # (B, M)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()         # (L, L)
    B = mem_ok.shape[0]
    return torch.cat([mem_ok[:, None, :].expand(B, length, memory_len), causal.expand(B, length, length)],
                     dim=-1).unsqueeze(1)                                                # (B, 1, L, M+L)


@dataclass
class GroupedPositions:
    """Grouped distant positions (Self-Extend, Jin et al. 2024 §3) for a window longer than the model was trained
    on: a query reads the keys less than ``window`` positions back at their exact distance, and the farther keys
    at grouped positions, key p at p // g and query p at p // g + window - window // g, so the distances grow g
    times slower beyond the neighbour window and none exceeds the trained range. Rotary scores only see
    differences of positions, so the two kinds of distance are two score maps merged per (query, key).
    near: (T, S) bool, True where the exact distance is read; q_cos, q_sin (T, Dh) and k_cos, k_sin (S, Dh): the
    rotary tables of the grouped positions of the queries (the last T of the S positions) and of the keys."""
    near: torch.Tensor
    q_cos: torch.Tensor
    q_sin: torch.Tensor
    k_cos: torch.Tensor
    k_sin: torch.Tensor
    group: int


def group_size(n_positions: int, *, limit: int, window: int) -> int:
    """The smallest group size g that keeps every grouped distance of a window of ``n_positions`` below ``limit``
    (the farthest pair: query n_positions - 1, key 0); 1 (positions unchanged) when the window fits."""
    g = 1
    while n_positions > limit and (n_positions - 1) // g + window - window // g > limit - 1:
        g += 1
    return g


def grouped_positions(cos: torch.Tensor, sin: torch.Tensor, *, n_queries: int, limit: int,
                      window: int) -> GroupedPositions | None:
    """The grouped positions of a window of S = ``cos.shape[0]`` positions whose last ``n_queries`` are the
    queries (``cos``, ``sin``: (S, Dh) rotary tables of positions 0 .. S - 1), or None when S <= ``limit``: a
    window the model was trained on is read unchanged."""
    S, T = cos.shape[0], n_queries
    g = group_size(S, limit=limit, window=window)
    if g == 1:
        return None
    pos = torch.arange(S, device=cos.device)
    k_pos = pos // g                                                             # (S,)
    q_pos = pos[S - T:] // g + window - window // g                              # (T,)
    near = (pos[S - T:].unsqueeze(1) - pos.unsqueeze(0)) < window                # (T, S)
    return GroupedPositions(near=near, q_cos=cos[q_pos], q_sin=sin[q_pos], k_cos=cos[k_pos], k_sin=sin[k_pos],
                            group=g)


def attention_probs(qr: torch.Tensor, kr: torch.Tensor, mask: torch.Tensor | None,
                    far: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, H, T, S) float32 attention probabilities of queries ``qr`` (B, H, T, Dh) over keys ``kr`` (B, G, S, Dh),
    both with rotary positions, as ``F.scaled_dot_product_attention`` weighs them (which does not return them):
    ``mask`` (B, 1, T, S) bool, or None for causal attention (S == T) or, for S > T, every key. ``far``: (queries,
    keys, near) with grouped positions (:class:`GroupedPositions`), scoring the pairs outside ``near`` (T, S)."""
    H, G, T, S = qr.shape[1], kr.shape[1], qr.shape[2], kr.shape[2]
    k = kr.float().repeat_interleave(H // G, dim=1)                              # (B, H, S, Dh)
    scores = qr.float() @ k.transpose(-1, -2) / math.sqrt(qr.shape[-1])          # (B, H, T, S)
    if far is not None:
        qg, kg, near = far
        kg = kg.float().repeat_interleave(H // G, dim=1)                         # (B, H, S, Dh)
        scores = torch.where(near, scores, qg.float() @ kg.transpose(-1, -2) / math.sqrt(qr.shape[-1]))
    if mask is None and S == T:
        mask = torch.ones(T, S, dtype=torch.bool, device=qr.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(0.0)                               # a row with no key: zeros


# a hook of a memory on one layer's attention, called with keyword arguments: q, k, v, y of the segment before
# rotary positions (q, y: (B, H, T, Dh); k (smeared if the model smears), v: (B, G, T, Dh)), raw_k (B, G, T, Dh)
# unsmeared, context = (keys, values) (B, G, M + T, Dh) of [memory; segment] unsmeared, and probs, a function
# that returns the local attention's probabilities (B, H, T, M + T) (computed when called: for inspection);
# returns y. It may record keys and values (a cache) or mix y (kNN memory). Hooks take ``**_`` for arguments
# they do not use.
AttentionHook = Callable[..., torch.Tensor]


@dataclass
class LayerView:
    """What one block's attention sees of the memories during a segment.

    hidden: (B, M, D) past layer inputs to attend to (Transformer-XL memory; normed and projected by
    the block, Dai et al. 2019 eq. 1), or None. kv: (keys, values), each (B, G, M, Dh), cached keys
    (unsmeared) and values before rotary positions; or a function of the segment's queries
    ``q (B, H, T, Dh) -> (keys, values, valid)`` for memories that choose what to attend to from the
    queries (retrieval), ``valid`` (B,) the right-aligned slots that hold history; or None. At most
    one of hidden and kv. mask: (B, 1, T, M + T) bool, True where attention is allowed (for a ``kv``
    function, built from its ``valid``); None means plain causal. cos, sin: (M + T, Dh) rotary
    tables. hooks: called in order after the local attention.
    """
    mask: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    hidden: torch.Tensor | None = None
    kv: tuple[torch.Tensor, torch.Tensor] | Callable | None = None
    hooks: list[AttentionHook] = field(default_factory=list)
    rotated: "RotatedCache | None" = None
    grouped: GroupedPositions | None = None       # a window longer than trained: far keys at grouped positions
    # with ``rotated`` and a cache: (new keys rotated, new values) -> [cache; new] written behind the cache
    # (``memory/kv.py`` ``Room``) instead of concatenated
    join: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class RotatedCache:
    """How to read a key/value cache whose keys are stored with rotary positions (``memory/kv.py``): the
    segment's positions get their own rotation, ``cos``, ``sin`` (B, 1, T, Dh) (a lane's p-th position since
    its reset at p), so a cached key needs none. A lane that evicted positions keeps its first ``n_sinks``
    slots (attention sinks) at positions 0 .. n_sinks - 1; they are read rotated further by
    ``sink_cos``, ``sink_sin`` (B, 1, 1, Dh), which puts them right before the window as StreamingLLM
    assigns positions inside the cache (the identity for lanes that evicted nothing). Exactly the distances
    of re-rotating the whole cache at its slots, at the cost of rotating T + n_sinks keys instead of M + T."""
    cos: torch.Tensor
    sin: torch.Tensor
    n_sinks: int = 0
    sink_cos: torch.Tensor | None = None
    sink_sin: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, *, d_model: int, n_heads: int, n_kv_heads: int = 0, head_dim: int = 0, dropout: float = 0.0,
                 smear_keys: bool = False, qkv_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 smear_width: int = 2, smear_queries: int = 0):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        H, G, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        self.q = nn.Linear(d_model, H * Dh, bias=qkv_bias)
        self.kv = nn.Linear(d_model, 2 * G * Dh, bias=qkv_bias)           # [keys; values] in one matmul
        self.out = nn.Linear(H * Dh, d_model, bias=False)
        # per-head RMSNorm of queries and keys before rotary positions (Qwen3)
        self.q_norm = RMSNorm(Dh, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(Dh, eps=norm_eps) if qk_norm else None
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        # smeared keys: one mixing logit per key head, 0 = half this key, half the one before; wider: logits over
        # the offsets, this key's share 1/2 at the start, the earlier ones sharing the other half
        self.smear: nn.Parameter | None = None
        if smear_keys and smear_width > 2:
            self.smear = nn.Parameter(torch.cat([torch.full((G, 1), math.log(smear_width - 1)),
                                                 torch.zeros(G, smear_width - 1)], dim=1))
        elif smear_keys:
            self.smear = nn.Parameter(torch.zeros(G))
        # queries mixed with the keys before them: the query's own share 1/2 at the start
        self.smear_q = nn.Parameter(torch.cat([torch.full((H, 1), math.log(smear_queries)),
                                               torch.zeros(H, smear_queries)], dim=1)) if smear_queries else None

    def project_kv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, G, N, Dh) of normed inputs ``h`` (B, N, D), before rotary positions."""
        B, N, _ = h.shape
        k, v = self.kv(h).view(B, N, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(self, x: torch.Tensor, *, view: LayerView, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) normed inputs of the segment positions -> (B, T, D); memory: (B, M, D) the normed
        XL memory of this layer (``view.hidden`` through the block's norm), or None."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, Dh)
        if self.q_norm is not None:
            q = self.q_norm(q)
        k, v = self.project_kv(x)                                                # (B, G, T, Dh)
        mask, cached = view.mask, view.kv
        if callable(cached):                                                     # chosen from the queries
            pk, pv, valid = cached(q)
            cached, mask = (pk, pv), prefix_mask(valid, pk.shape[2], T)
        if memory is not None:                                                   # XL: project the memory here
            mk, mv = self.project_kv(memory)
            keys, values = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)  # (B, G, S, Dh)
        elif cached is not None and view.rotated is None:                        # a cache of keys and values
            values = torch.cat([cached[1].to(v.dtype), v], dim=2)
            keys = torch.cat([cached[0].to(k.dtype), k], dim=2)
        else:
            keys, values = k, v
        restore = None
        if view.rotated is not None:                                             # cached keys hold their rotation
            rc = view.rotated
            qr, kr_seg = Rotary.rotate(q, rc.cos, rc.sin), Rotary.rotate(k, rc.cos, rc.sin)
            raw_keys = kr_seg                                                    # as cached
            if view.join is not None:
                raw_keys, values = view.join(kr_seg, v)
            elif cached is not None:
                raw_keys = torch.cat([cached[0].to(k.dtype), kr_seg], dim=2)
                values = torch.cat([cached[1].to(v.dtype), v], dim=2)
            kr, s = raw_keys, rc.n_sinks
            if rc.sink_cos is not None and rc.sink_sin is not None and cached is not None:   # sinks: before the window
                sinks = Rotary.rotate(raw_keys[:, :, :s], rc.sink_cos, rc.sink_sin)
                if torch.is_grad_enabled():
                    kr = torch.cat([sinks, raw_keys[:, :, s:]], dim=2)
                else:                                                            # no copy: put them back after
                    restore = raw_keys[:, :, :s].clone()
                    raw_keys[:, :, :s] = sinks
            k_seg = k
        else:
            raw_keys = keys                                                      # [memory; segment] unsmeared
            if self.smear_q is not None:
                q = smear_queries(q, raw_keys, self.smear_q)
            if self.smear is not None:
                keys = smear(keys, self.smear)
            k_seg = keys[:, :, keys.shape[2] - T:]                               # (B, G, T, Dh) the memories see
            qr = Rotary.rotate(q, view.cos[-T:], view.sin[-T:])
            kr = Rotary.rotate(keys, view.cos, view.sin)
        far = None
        if view.grouped is not None:                                             # Self-Extend: two score maps
            if view.rotated is not None:
                raise ValueError("grouped positions (model.position_range) need keys cached before rotary "
                                 "positions; this cache stores them rotated")
            gp = view.grouped
            far = (Rotary.rotate(q, gp.q_cos, gp.q_sin), Rotary.rotate(keys, gp.k_cos, gp.k_sin), gp.near)
            p = attention_probs(qr, kr, mask, far)                               # (B, H, T, S)
            if self.training and self.dropout:
                p = F.dropout(p, self.dropout)
            y = p.to(values.dtype) @ values.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        else:
            y = F.scaled_dot_product_attention(
                qr, kr, values, attn_mask=mask, is_causal=mask is None and kr.shape[2] == T,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads)                      # (B, H, T, Dh)
        if view.hooks:
            def probs() -> torch.Tensor:                                         # only when a hook asks (tracing)
                return attention_probs(qr, kr, mask, far)
            for hook in view.hooks:
                y = hook(q=q, k=k_seg, v=v, y=y, raw_k=k, context=(raw_keys, values), probs=probs)
        if restore is not None:
            raw_keys[:, :, :restore.shape[2]] = restore
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)        # (B, T, H*Dh)
        y = self.out(y)
        return self.resid_drop(y) if self.training and self.dropout else y


class MLP(nn.Module):
    """``down(gelu(up x))`` (GPT-2) or SwiGLU ``down(silu(gate x) * up x)`` (Shazeer 2020; Llama), the
    gate and up projections in one matrix ``up`` of 2F rows, gate first."""

    def __init__(self, *, d_model: int, d_ff: int, dropout: float, kind: str = "gelu"):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp={kind!r}; accepted: gelu, swiglu")
        self.kind = kind
        self.up = nn.Linear(d_model, (2 if kind == "swiglu" else 1) * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)                                                           # (B, T, F) or (B, T, 2F)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        h = self.down(h)
        return self.drop(h) if self.training and self.dropout else h        # no call at evaluation


class Block(nn.Module):
    """Pre-norm block; keys and values of the memory come from norm([memory; x]) (Dai et al. 2019 eq. 1)."""

    def __init__(self, *, d_model: int, n_heads: int, d_ff: int, dropout: float, smear_keys: bool = False,
                 n_kv_heads: int = 0, head_dim: int = 0, mlp: str = "gelu", qkv_bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-6, smear_width: int = 2, smear_queries: int = 0):
        super().__init__()
        self.norm1 = RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                              dropout=dropout, smear_keys=smear_keys, qkv_bias=qkv_bias, qk_norm=qk_norm,
                              norm_eps=norm_eps, smear_width=smear_width, smear_queries=smear_queries)
        self.norm2 = RMSNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model=d_model, d_ff=d_ff, dropout=dropout, kind=mlp)

    def forward(self, x: torch.Tensor, *, view: LayerView) -> torch.Tensor:
        memory = self.norm1(view.hidden) if view.hidden is not None else None   # (B, M, D)
        x = x + self.attn(self.norm1(x), view=view, memory=memory)
        return x + self.mlp(self.norm2(x))
