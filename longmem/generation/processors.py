"""Logits processors: batched, composable sampling controls.

Legend: B lanes, V vocabulary.

A processor maps ``(logits (B, V), counts)`` to new logits (B, V); tokens that
may not be drawn are set to ``-inf``. ``counts`` holds, per lane, how often each
token was generated so far and which tokens appeared at all (prompt included),
so the penalties cost O(V) memory however long the output grows.

The order follows common practice (HF ``transformers``, vLLM): logit bias,
penalties, temperature, then the truncations (top-k, top-p, min-p).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch

from longmem.config import _help


@dataclass
class TokenCounts:
    """generated: (B, V) float, how often each token was generated; seen: (B, V) bool, in prompt or output."""
    generated: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, vocab_size: int, *, device: torch.device | str | None = None) -> "TokenCounts":
        return cls(generated=torch.zeros(batch_size, vocab_size, device=device),
                   seen=torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device))

    def add_prompt(self, tokens: torch.Tensor) -> None:
        """tokens: (B, N) prompt ids; they count as seen (repetition penalty), not as generated."""
        self.seen.scatter_(1, tokens, True)

    def add_generated(self, tokens: torch.Tensor) -> None:
        """tokens: (B,) the ids just drawn."""
        self.generated.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.generated.dtype))
        self.seen.scatter_(1, tokens[:, None], True)


LogitsProcessor = Callable[[torch.Tensor, TokenCounts], torch.Tensor]
NEG_INF = float("-inf")
GREEDY_BELOW = 1e-5          # temperatures below this decode greedily (dividing by them overflows float32)
MAX_BIAS = 100.0             # logit_bias values lie in [-MAX_BIAS, MAX_BIAS], as in OpenAI's API


class Temperature:
    """Divide the logits by ``t``; greedy decoding (t below GREEDY_BELOW) is the sampler's job."""

    def __init__(self, t: float):
        if not (t >= GREEDY_BELOW and math.isfinite(t)):
            raise ValueError(f"temperature must be a finite number >= {GREEDY_BELOW} here (below it decoding "
                             f"is greedy), got {t}")
        self.t = t

    def __call__(self, logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
        return logits / self.t


class TopK:
    """Keep exactly the ``k`` largest logits of each lane (ties broken by index, like torch.topk)."""

    def __init__(self, k: int):
        if k <= 0:
            raise ValueError(f"top_k must be positive, got {k}")
        self.k = k

    def __call__(self, logits: torch.Tensor, counts: TokenCounts | None = None) -> torch.Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        idx = torch.topk(logits, self.k, dim=-1).indices                            # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        return logits.masked_fill(~keep, NEG_INF)


class TopP:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely
    tokens whose probability mass is at least ``p``."""
    TOLERANCE = 1e-6                                 # float rounding of a cumulative sum near p

    def __init__(self, p: float):
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        self.p = p

    def __call__(self, logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
        if self.p >= 1:
            return logits
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)          # (B, V)
        probs = torch.softmax(sorted_logits.double(), dim=-1)
        # mass up to and including each token; within rounding of p counts as reached, so a set whose
        # mass is exactly p (0.5 + 0.3 for p = 0.8) is not followed by one more token
        reached = torch.cumsum(probs, dim=-1) >= self.p - self.TOLERANCE
        keep_sorted = torch.ones_like(reached)
        keep_sorted[..., 1:] = ~reached[..., :-1]                                    # stay while p is not reached
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return logits.masked_fill(~keep, NEG_INF)


class MinP:
    """Keep tokens whose probability is at least ``p`` times that of the most likely one
    (min-p sampling, Nguyen et al. 2024)."""

    def __init__(self, p: float):
        if not 0 < p <= 1:
            raise ValueError(f"min_p must be in (0, 1], got {p}")
        self.p = p

    def __call__(self, logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        keep = probs >= self.p * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(~keep, NEG_INF)


class RepetitionPenalty:
    """CTRL's penalty (Keskar et al. 2019): a token already in the prompt or output has its
    logit divided by ``r`` when positive, multiplied by ``r`` when negative."""

    def __init__(self, r: float):
        if not r > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {r}")
        self.r = r

    def __call__(self, logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
        penalized = torch.where(logits > 0, logits / self.r, logits * self.r)
        return torch.where(counts.seen, penalized, logits)


class PresenceFrequencyPenalty:
    """OpenAI's penalties: ``logit - frequency * count - presence * (count > 0)`` over generated tokens."""

    def __init__(self, *, presence: float, frequency: float):
        for name, v in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        self.presence, self.frequency = presence, frequency

    def __call__(self, logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
        c = counts.generated.to(logits.dtype)
        return logits - self.frequency * c - self.presence * (c > 0).to(logits.dtype)


class LogitBias:
    """Add a fixed bias to chosen tokens (``{token_id: bias}``); -100 effectively bans a token."""

    def __init__(self, bias: dict[int, float], *, vocab_size: int):
        bad = [t for t in bias if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}), got {bad[:5]}")
        self.ids = torch.tensor([int(t) for t in bias], dtype=torch.long)
        self.values = torch.tensor([float(v) for v in bias.values()])

    def __call__(self, logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
        if not len(self.ids):
            return logits
        add = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        add.index_add_(0, self.ids.to(logits.device), self.values.to(logits.device, logits.dtype))
        return logits + add                                                         # (B, V) + (V,)


@dataclass
class SamplingConfig:
    """Everything that decides how tokens are drawn and when generation stops."""
    max_new_tokens: int = _help("tokens to generate at most", default=200)
    temperature: float = _help(f"divide logits by this; 0 (or anything below {GREEDY_BELOW}) is greedy",
                               default=1.0)
    top_k: int = _help("keep the k most likely tokens (0: all)", default=0)
    top_p: float = _help("keep the smallest set of tokens with probability mass >= p (1: all)", default=1.0)
    min_p: float = _help("keep tokens with probability >= min_p * the top probability (0: off)", default=0.0)
    repetition_penalty: float = _help("CTRL penalty on tokens already present (1: off)", default=1.0)
    presence_penalty: float = _help("subtract this from tokens generated at least once, in [-2, 2]", default=0.0)
    frequency_penalty: float = _help("subtract this times the count of each generated token, in [-2, 2]",
                                     default=0.0)
    logit_bias: dict[int, float] = _help(f"token id -> additive bias in [-{MAX_BIAS:g}, {MAX_BIAS:g}] "
                                         f"(-100 bans a token in practice)", default_factory=dict)
    stop: list[str] = _help("stop before the first occurrence of any of these strings", default_factory=list)
    seed: int = _help("seed of the sampler: same seed, same text", default=0)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        try:
            self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias).items()}
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        bad = {k: v for k, v in self.logit_bias.items() if not -MAX_BIAS <= v <= MAX_BIAS}    # NaN too
        if bad:
            raise ValueError(f"logit_bias values must be finite numbers in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got "
                             f"{dict(list(bad.items())[:5])}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def build_processors(cfg: SamplingConfig, *, vocab_size: int) -> list[LogitsProcessor]:
    """The processors ``cfg`` asks for, in application order (greedy skips temperature and truncation)."""
    procs: list[LogitsProcessor] = []
    if cfg.logit_bias:
        procs.append(LogitBias(cfg.logit_bias, vocab_size=vocab_size))
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(cfg.repetition_penalty))
    if cfg.presence_penalty or cfg.frequency_penalty:
        procs.append(PresenceFrequencyPenalty(presence=cfg.presence_penalty, frequency=cfg.frequency_penalty))
    if cfg.greedy:
        return procs
    if cfg.temperature != 1.0:
        procs.append(Temperature(cfg.temperature))
    if cfg.top_k:
        procs.append(TopK(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(TopP(cfg.top_p))
    if cfg.min_p > 0:
        procs.append(MinP(cfg.min_p))
    return procs


def apply_processors(procs: list[LogitsProcessor], logits: torch.Tensor, counts: TokenCounts) -> torch.Tensor:
    logits = logits.float()
    for proc in procs:
        logits = proc(logits, counts)
    return logits


def sample(logits: torch.Tensor, *, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) ids: argmax when greedy, else a draw from softmax.

    A lane with a NaN or +inf logit, or with every token at -inf, has no distribution to draw
    from: ValueError, naming the lanes."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)
    if bool(bad.any()):
        raise ValueError(f"no token can be drawn in lane(s) {bad.nonzero().flatten().tolist()[:5]}: after the "
                         f"sampling controls their logits are NaN, +inf or all -inf (look at logit_bias, the "
                         f"penalties and truncations, or the model's weights)")
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
