"""Optimiser groups and learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from retinanet.optim import build_optimizer, build_scheduler


def lrs(name, total=100, **kw):
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, "sgd", lr=1.0)
    sched = build_scheduler(opt, total, name=name, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_factor():
    v = lrs("constant", warmup_steps=10, warmup_factor=0.1)
    assert v[0] == pytest.approx(0.1)
    assert v[5] == pytest.approx(0.1 * 0.5 + 0.5)
    assert v[10] == pytest.approx(1.0)


def test_multistep_drops_at_fractions():
    v = lrs("multistep", total=90, warmup_steps=0, milestones=[2 / 3, 8 / 9], gamma=0.1)
    assert v[59] == pytest.approx(1.0) and v[60] == pytest.approx(0.1) and v[80] == pytest.approx(0.01)


def test_cosine_reaches_min_factor():
    v = lrs("cosine", total=101, warmup_steps=0, min_factor=0.05)
    assert v[0] == pytest.approx(1.0)
    assert v[50] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert v[100] == pytest.approx(0.05)


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert isinstance(opt, torch.optim.AdamW)


def test_bad_names_are_reported():
    with pytest.raises(ValueError, match="'rmsprop'"):
        build_optimizer(nn.Linear(1, 1), "rmsprop")
    with pytest.raises(ValueError, match="'poly'"):
        build_scheduler(build_optimizer(nn.Linear(1, 1)), 10, name="poly")
