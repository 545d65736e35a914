"""Logits processors: each one's semantics on hand-made logits, batched."""
from __future__ import annotations

import math

import pytest
import torch

from longmem.generation.processors import (LogitBias, MinP, PresenceFrequencyPenalty, RepetitionPenalty,
                                           SamplingConfig, Temperature, TokenCounts, TopK, TopP,
                                           apply_processors, build_processors, sample)

INF = float("-inf")


def counts_for(B=2, V=10):
    return TokenCounts.empty(B, V)


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    out = TopK(2)(logits, None)
    kept = torch.isfinite(out)
    assert kept.sum(-1).tolist() == [2, 2]                           # exactly k, ties included
    assert kept[1].tolist() == [True, True, False, False, False, False]
    assert torch.equal(out[kept], logits[kept])                      # kept logits unchanged
    assert torch.equal(TopK(6)(logits, None), logits)


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05],
                          [0.05, 0.1, 0.15, 0.2, 0.5]])
    logits = probs.log()
    for p, n in [(0.5, 1), (0.51, 2), (0.7, 2), (0.71, 3), (0.86, 4), (0.96, 5), (1.0, 5)]:
        kept = torch.isfinite(TopP(p)(logits, None))
        assert kept.sum(-1).tolist() == [n, n], p
        assert probs[kept].view(2, n).sum(-1).min() >= p - 1e-6       # mass >= p ...
        top = probs.sort(-1, descending=True).values[:, :n - 1].sum(-1)
        assert (top < p).all()                                       # ... and one fewer would not do
    assert torch.isfinite(TopP(0.6)(logits, None))[1].tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("probs,p,n", [
    ([0.3, 0.1, 0.1, 0.5], 0.8, 2),                  # 0.5 + 0.3 is exactly p: no third token
    ([0.3, 0.1, 0.1, 0.5], 0.9, 3),
    ([0.3, 0.1, 0.1, 0.5], 0.5, 1),                  # the top token alone is exactly p
    ([0.1, 0.2, 0.3, 0.4], 0.7, 2),
    ([0.1, 0.2, 0.3, 0.4], 0.9, 3),
    ([0.6, 0.1, 0.1, 0.1, 0.1], 0.7, 2),             # ties after the top: exactly one of them
    ([0.6, 0.1, 0.1, 0.1, 0.1], 0.8, 3),
    ([0.25, 0.25, 0.25, 0.25], 0.5, 2),              # all tied
    ([0.25, 0.25, 0.25, 0.25], 0.75, 3),
    ([0.25, 0.25, 0.25, 0.25], 1.0, 4),
    ([0.7, 0.2, 0.1], 0.70001, 2),                   # just above a cumulative sum
])
def test_top_p_at_an_exact_boundary_keeps_the_smallest_set(probs, p, n):
    logits = torch.tensor([probs]).log()
    assert torch.isfinite(TopP(p)(logits, None)).sum().item() == n


def test_min_p_keeps_tokens_above_a_fraction_of_the_top():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    kept = torch.isfinite(MinP(0.3)(probs.log(), None))
    assert kept.tolist() == [[True, True, True, False]]              # 0.15 >= 0.3 * 0.5 > 0.1


def test_logit_bias_shifts_exactly_the_given_tokens():
    logits = torch.randn(3, 10)
    out = LogitBias({2: 5.0, 7: -1.5}, vocab_size=10)(logits, None)
    delta = out - logits
    expected = torch.zeros(10)
    expected[2], expected[7] = 5.0, -1.5
    assert torch.allclose(delta, expected.expand(3, 10))
    with pytest.raises(ValueError, match="logit_bias token ids"):
        LogitBias({10: 1.0}, vocab_size=10)


def test_temperature_divides_and_zero_is_refused_by_the_processor():
    logits = torch.randn(2, 5)
    assert torch.allclose(Temperature(0.5)(logits, None), logits * 2)
    with pytest.raises(ValueError, match="temperature"):
        Temperature(0.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    c = counts_for(1, 4)
    c.add_prompt(torch.tensor([[0, 1]]))
    out = RepetitionPenalty(2.0)(logits, c)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_presence_and_frequency_penalties_follow_the_counts_per_lane():
    logits = torch.zeros(2, 4)
    c = counts_for(2, 4)
    c.add_prompt(torch.tensor([[3], [3]]))                            # prompt tokens are not "generated"
    for tok in ([1, 2], [1, 0], [1, 0]):
        c.add_generated(torch.tensor(tok))
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)(logits, c)
    assert out.tolist() == [[0.0, -1.25, 0.0, 0.0],                   # lane 0: token 1 x3
                            [-1.0, 0.0, -0.75, 0.0]]                  # lane 1: token 2 x1, token 0 x2


def test_greedy_sample_is_argmax_and_draws_stay_among_kept_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    assert torch.equal(sample(logits, greedy=True, generator=g), logits.argmax(-1))
    procs = build_processors(SamplingConfig(temperature=1.5, top_k=5), vocab_size=50)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(10):
        picked = sample(apply_processors(procs, logits, counts_for(64, 50)), greedy=False, generator=g)
        assert (top5 == picked[:, None]).any(-1).all()


def test_top_k_one_with_any_temperature_equals_greedy():
    logits = torch.randn(16, 30)
    procs = build_processors(SamplingConfig(temperature=3.0, top_k=1), vocab_size=30)
    g = torch.Generator().manual_seed(1)
    picked = sample(apply_processors(procs, logits, counts_for(16, 30)), greedy=False, generator=g)
    assert torch.equal(picked, logits.argmax(-1))


def test_build_order_and_greedy_skips_truncation():
    cfg = SamplingConfig(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                         presence_penalty=0.1, logit_bias={1: 2.0})
    names = [type(p).__name__ for p in build_processors(cfg, vocab_size=10)]
    assert names == ["LogitBias", "RepetitionPenalty", "PresenceFrequencyPenalty", "Temperature", "TopK",
                     "TopP", "MinP"]
    greedy = SamplingConfig(temperature=0.0, top_k=3, logit_bias={1: 2.0})
    assert [type(p).__name__ for p in build_processors(greedy, vocab_size=10)] == ["LogitBias"]
    assert build_processors(SamplingConfig(), vocab_size=10) == []


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, "temperature"), ("temperature", math.inf, "temperature"), ("top_k", -1, "top_k"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("min_p", -0.1, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("presence_penalty", 3.0, "presence_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"), ("max_new_tokens", -1, "max_new_tokens"),
    ("stop", [""], "stop"), ("logit_bias", {"a": 1}, "logit_bias")])
def test_sampling_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("top_p", math.nan), ("min_p", math.nan), ("repetition_penalty", math.inf),
    ("presence_penalty", math.nan), ("frequency_penalty", -math.inf)])
def test_sampling_config_refuses_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingConfig(**{field: value})


@pytest.mark.parametrize("bias", [math.nan, math.inf, -math.inf, 1e39, 1e308, 100.5, -101])
def test_logit_bias_values_must_be_finite_and_within_100(bias):
    with pytest.raises(ValueError, match=r"logit_bias values must be finite numbers in \[-100, 100\]"):
        SamplingConfig(logit_bias={65: bias})
    assert SamplingConfig(logit_bias={65: 100, 66: -100}).logit_bias == {65: 100.0, 66: -100.0}


def test_temperatures_below_the_epsilon_are_greedy_and_never_overflow():
    logits = torch.tensor([[3.0, 40.0, 39.0, -5.0]])
    for t in (0.0, 1e-39, 5e-324, 9e-6):
        cfg = SamplingConfig(temperature=t, logit_bias={2: 2.0})
        procs = build_processors(cfg, vocab_size=4)
        assert cfg.greedy and [type(p).__name__ for p in procs] == ["LogitBias"]
        assert sample(apply_processors(procs, logits, counts_for(1, 4)), greedy=cfg.greedy, generator=None) == 2
    assert not SamplingConfig(temperature=1e-5).greedy
    with pytest.raises(ValueError, match="temperature"):
        Temperature(1e-39)


def test_sample_names_lanes_without_a_distribution():
    g = torch.Generator().manual_seed(0)
    ok = torch.tensor([0.0, 1.0, INF])
    for bad in ([INF, INF, INF], [0.0, math.nan, 1.0], [0.0, math.inf, 1.0]):
        logits = torch.stack([ok, torch.tensor(bad)])
        for greedy in (True, False):
            with pytest.raises(ValueError, match=r"lane\(s\) \[1\].*NaN, \+inf or all -inf"):
                sample(logits, greedy=greedy, generator=g)
    assert sample(ok[None], greedy=False, generator=g).item() in (0, 1)


def test_sampling_config_normalizes_json_style_values():
    cfg = SamplingConfig(stop="\n", logit_bias={"5": "1.5"})
    assert cfg.stop == ["\n"] and cfg.logit_bias == {5: 1.5}
