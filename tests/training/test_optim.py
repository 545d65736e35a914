"""Learning-rate schedule and optimizer parameter groups (the loop itself runs in test_cli)."""
from __future__ import annotations

import pytest

import torch

from longmem.config import RunConfig, TrainConfig
from longmem.training.optim import build_optimizer, lr_at, param_groups


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=10, total=100)
    lrs = [lr_at(s, **kw) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)
    assert lr_at(0, lr=1e-3, min_lr=0.0, warmup=0, total=5) == pytest.approx(1e-3)


def test_step_schedule_halves_every_n_steps_after_warmup():
    kw = dict(lr=0.01, min_lr=0.0, warmup=2, total=100, halve_every=10)
    assert lr_at(1, **kw) == pytest.approx(0.01)
    assert [lr_at(s, **kw) for s in (2, 11, 12, 21, 22, 32)] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025,
                                                                               0.00125])


def test_build_optimizer_sgd_or_adamw():
    model = torch.nn.Linear(3, 2)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0
    assert isinstance(build_optimizer(model, TrainConfig()), torch.optim.AdamW)
    rms = build_optimizer(model, TrainConfig(optimizer="rmsprop", lr=1e-4))       # the NTM's (Graves et al. 2014)
    assert isinstance(rms, torch.optim.RMSprop) and rms.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match="accepted: adamw, sgd, rmsprop"):
        RunConfig().override({"train.optimizer": "adam"})


def test_weight_decay_only_on_matrices(make_model):
    model = make_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())   # every parameter exactly once
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert all(p is not model.embed.weight for p in decay["params"])
