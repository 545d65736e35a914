"""Associative recall over long distances: key-value pairs stated early, queried much later.

A sequence is ``k1 v1 k2 v2 ... kP vP`` (P distinct keys, random values), then
``filler`` random filler tokens, then the same pairs again in a shuffled order as
queries ``k v`` (or ``n_queries`` queries drawn with replacement from the pairs: a denser
training signal). Only the answers count: the target after each query key is its
value, every other target is ignored (-100). Keys, values and filler use disjoint
token ranges, so the filler never looks like a key and chance is 1 / n_values.

The distance of an answer is how many tokens back its pair was stated (query key
position minus statement key position); a model whose memory spans fewer tokens
must guess. Seeded: the same generator state gives the same batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RecallBatch:
    tokens: torch.Tensor      # (B, N) inputs
    targets: torch.Tensor     # (B, N) the value after each query key, IGNORE_INDEX elsewhere
    distance: torch.Tensor    # (B, N) tokens between statement and query of the answer, -1 elsewhere


@dataclass(frozen=True)
class RecallTask:
    """Token ids: keys [0, n_keys), values [n_keys, n_keys + n_values), filler after them."""
    n_keys: int = 64
    n_values: int = 64
    n_filler: int = 64
    distinct_values: bool = False     # values drawn without replacement: which values occur says nothing

    def __post_init__(self):
        for name in ("n_keys", "n_values", "n_filler"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RecallTask.{name} must be positive, got {getattr(self, name)}")

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + self.n_filler

    @property
    def chance(self) -> float:
        return 1.0 / self.n_values

    def sample(self, *, batch_size: int, n_pairs: int, filler: int, generator: torch.Generator,
               n_queries: int | None = None) -> RecallBatch:
        """``batch_size`` sequences of ``2 * n_pairs + filler + 2 * n_queries`` tokens; ``n_queries``
        None asks every pair once (in a random order), a number asks that many pairs drawn with replacement."""
        if not 0 < n_pairs <= self.n_keys:
            raise ValueError(f"n_pairs must be in 1..{self.n_keys} (distinct keys), got {n_pairs}")
        if filler < 0:
            raise ValueError(f"filler must be >= 0, got {filler}")
        if n_queries is not None and n_queries <= 0:
            raise ValueError(f"n_queries must be positive (or None: every pair once), got {n_queries}")
        B, P, F = batch_size, n_pairs, filler
        keys = torch.rand(B, self.n_keys, generator=generator).argsort(-1)[:, :P]            # (B, P) distinct
        if self.distinct_values:
            if P > self.n_values:
                raise ValueError(f"distinct values need n_pairs <= n_values={self.n_values}, got {n_pairs}")
            values = self.n_keys + torch.rand(B, self.n_values, generator=generator).argsort(-1)[:, :P]
        else:
            values = self.n_keys + torch.randint(0, self.n_values, (B, P), generator=generator)  # (B, P)
        stated = torch.stack([keys, values], dim=-1).reshape(B, 2 * P)                       # k1 v1 k2 v2 ...
        fill = self.n_keys + self.n_values + torch.randint(0, self.n_filler, (B, F), generator=generator)
        if n_queries is None:
            order = torch.rand(B, P, generator=generator).argsort(-1)                        # (B, Q=P) query order
        else:
            order = torch.randint(0, P, (B, n_queries), generator=generator)                 # (B, Q) with repeats
        Q = order.shape[1]
        asked = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=-1).reshape(B, 2 * Q)
        tokens = torch.cat([stated, fill, asked], dim=1)                                     # (B, 2P + F + 2Q)
        N = tokens.shape[1]
        targets = torch.full((B, N), IGNORE_INDEX, dtype=torch.long)
        distance = torch.full((B, N), -1, dtype=torch.long)
        q_pos = 2 * P + F + 2 * torch.arange(Q)                                              # query key positions
        targets[:, q_pos] = values.gather(1, order)
        distance[:, q_pos] = q_pos - 2 * order                                               # statement at 2 * i
        return RecallBatch(tokens=tokens, targets=targets, distance=distance)


@torch.no_grad()
def recall_accuracy(model, batch: RecallBatch, *, bins: list[int] | None = None) -> dict:
    """Accuracy of the arg-max prediction at answer positions (one fresh state per call),
    overall and, if ``bins`` (ascending lower edges) are given, per distance bin."""
    logits = model(batch.tokens).logits                                # (B, N, V)
    mask = batch.targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == batch.targets)[mask].float()
    dist = batch.distance[mask]
    out = {"accuracy": float(correct.mean()), "answers": int(mask.sum()),
           "mean_distance": float(dist.float().mean())}
    if bins:
        edges = list(bins) + [float("inf")]
        out["bins"] = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (dist >= lo) & (dist < hi)
            if sel.any():
                out["bins"].append({"from": lo, "to": hi, "accuracy": float(correct[sel].mean()),
                                    "answers": int(sel.sum())})
    return out
