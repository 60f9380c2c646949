"""Optimisers (one factory each, weight decay off for norms and biases, linear LR scaling) and learning-rate
schedules whose warmup and decay are fractions of the run: a 50-step run and a 90,000-step run both warm up
and then decay. Once planned, the warmup stays as it is when the run's length is re-planned."""

import logging
import math

import pytest
import torch
from torch import nn

from retinanet.config import build
from retinanet.errors import ConfigError
from retinanet.optim import (
    adamw,
    constant,
    cosine,
    multistep,
    schedule_plan,
    set_schedule_plan,
    set_total_steps,
    sgd,
    start_warmup,
    warmup_steps,
)

from conftest import compose_train


def lrs(schedule, total=100, **kw):
    opt = sgd(nn.Linear(2, 2), lr=1.0)
    sched = schedule(opt, total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_factor():
    v = lrs(constant, warmup=0.1, warmup_factor=0.1)  # 10 of 100 steps
    assert v[0] == pytest.approx(0.1)
    assert v[5] == pytest.approx(0.1 * 0.5 + 0.5)
    assert v[10] == pytest.approx(1.0)


def test_warmup_is_a_fraction_of_the_run_with_a_cap_in_steps():
    assert warmup_steps(60, 0.05, 1000) == 3
    assert warmup_steps(90_000, 0.05, 500) == 500  # the paper's 500 iterations
    assert warmup_steps(3, 0.9, None) == 2  # never the whole run: it ends with decay
    assert warmup_steps(100, 0.0, 500) == 0


@pytest.mark.parametrize("total", [50, 90_000])
def test_short_and_long_runs_both_warm_up_then_decay(total):
    opt = sgd(nn.Linear(2, 2), lr=1.0)
    sched = cosine(opt, total)  # the config's defaults: 5% warmup, at most 1000 steps
    factor = sched.lr_lambdas[0]
    curve = [factor(s) for s in range(total)]
    peak = max(range(total), key=curve.__getitem__)
    assert 0 < peak < total // 2
    assert all(a < b for a, b in zip(curve[:peak], curve[1:peak + 1]))  # rising during the warmup ...
    assert all(a >= b for a, b in zip(curve[peak:], curve[peak + 1:]))  # ... then falling to the end
    assert curve[0] < 0.01 and curve[-1] < 1e-6


def test_multistep_drops_at_fractions():
    v = lrs(multistep, total=90, warmup=0, milestones=[2 / 3, 8 / 9], gamma=0.1)
    assert v[59] == pytest.approx(1.0) and v[60] == pytest.approx(0.1) and v[80] == pytest.approx(0.01)


def test_cosine_reaches_min_factor():
    v = lrs(cosine, total=101, warmup=0, min_factor=0.05)
    assert v[0] == pytest.approx(1.0)
    assert v[50] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert v[100] == pytest.approx(0.05)


def test_set_total_steps_replans_the_cosine_to_its_new_end():
    opt = sgd(nn.Linear(2, 2), lr=1.0)
    sched = cosine(opt, 100, warmup=0, min_factor=0.0)
    seen = []
    for step in range(60):
        if step == 20:
            set_total_steps(sched, 41)  # the run now ends at step 40
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 99)))
    assert seen[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert seen[40] == pytest.approx(0.0, abs=1e-12)
    # the plan comes from the config, not from a checkpoint: no lambda state is saved
    assert all(state is None for state in sched.state_dict()["lr_lambdas"])


def run_schedule(sched, steps: int, replans: dict) -> list[float]:
    """The learning rate of each step; ``replans``: {step: function(scheduler)} applied before that step."""
    seen = []
    for step in range(steps):
        if step in replans:
            replans[step](sched)
        seen.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return seen


def test_the_warmup_stays_as_planned_when_the_length_moves():
    warmup = cosine(sgd(nn.Linear(2, 2), lr=1.0), 1000)  # 5%: 50 steps
    seen = run_schedule(warmup, 400, {10: lambda s: set_total_steps(s, 400), 30: lambda s: set_total_steps(s, 380)})
    assert schedule_plan(warmup) == {"total_steps": 380, "warmup_steps": 50, "warmup_start": 0}
    assert seen[:50] == pytest.approx([0.001 + 0.999 * s / 50 for s in range(50)])  # no jump at the re-plans
    assert seen[50] == pytest.approx(1.0) and seen[379] == pytest.approx(0.0, abs=1e-12)
    cut = cosine(sgd(nn.Linear(2, 2), lr=1.0), 1000)
    seen = run_schedule(cut, 30, {2: lambda s: set_total_steps(s, 30)})  # cut shorter than its warmup
    assert seen[29] == pytest.approx(0.0, abs=1e-12)  # still ends with the decay


def test_a_warmup_planned_later_waits_then_starts_where_it_is_planned():
    sched = cosine(sgd(nn.Linear(2, 2), lr=1.0), 10)
    set_schedule_plan(sched, warmup_start=None)  # a time-limited run before its pace is measured
    seen = run_schedule(sched, 204, {4: lambda s: (set_total_steps(s, 204), start_warmup(s))})
    assert seen[:5] == pytest.approx([0.001] * 5)  # waits at the warmup's start, then rises from there
    assert schedule_plan(sched) == {"total_steps": 204, "warmup_steps": 10, "warmup_start": 4}  # 5% of 200 left
    assert seen[4:15] == pytest.approx([0.001 + 0.999 * s / 10 for s in range(11)])
    assert seen[203] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="not keys of a schedule's plan"):
        set_schedule_plan(sched, warmup=3)


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = adamw(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert isinstance(opt, torch.optim.AdamW)


def test_linear_learning_rate_scaling_is_stated(caplog):
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.INFO):
        scaled = build(compose_train(["optim.reference_batch_size=16", "optim.lr=0.01"]).optim, model=model,
                       global_batch=64)
    assert scaled.param_groups[0]["lr"] == pytest.approx(0.04)
    assert "optim.lr 0.01 x global batch 64 / optim.reference_batch_size 16" in caplog.text
    as_given = build(compose_train(["optim.lr=0.01"]).optim, model=model, global_batch=64)
    assert as_given.param_groups[0]["lr"] == 0.01


def test_each_optimiser_and_schedule_file_holds_only_its_own_keys():
    for overrides in (["optim=adamw"], ["optim=sgd"]):
        cfg = compose_train(overrides)
        build(cfg.optim, model=nn.Linear(2, 2), global_batch=8)  # every key is an argument of its factory
    for name in ("cosine", "multistep", "constant"):
        cfg = compose_train([f"schedule={name}"])
        build(cfg.schedule, optimizer=sgd(nn.Linear(2, 2)), total_steps=10)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim: lr=-1 must be a number > 0"),
    ("optim.betas=[0.9,1.5]", "optim: betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ("+optim.momentum=0.9", "optim.momentum is not a setting of optim"),  # adamw has none
    ("optim.reference_batch_size=0", "optim: reference_batch_size=0 must be an integer >= 1"),
    ("schedule.warmup=1.5", "schedule: warmup=1.5 must be a fraction of the run"),
    ("schedule.min_factor=2", "schedule: min_factor=2 must be in [0, 1]"),
])
def test_bad_settings_name_group_and_key(override, message):
    cfg = compose_train([override])
    with pytest.raises(ConfigError) as err:
        optimizer = build(cfg.optim, model=nn.Linear(2, 2), global_batch=8)
        build(cfg.schedule, optimizer=optimizer, total_steps=10)
    assert message in str(err.value)
