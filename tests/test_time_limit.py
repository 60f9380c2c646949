"""trainer.time_limit: the run plans its length per step from its pace. With trainer.epochs=null it fills the
budget (at least 95% of it, never more than 100%); with epochs given the limit is a cap. The learning rate never
jumps: the first steps after a (re)start (compilation) are not timed, the warmup is fixed once planned, each
re-plan moves the length by a bounded factor, and a resumed run keeps the plan, the pace and the curve."""

import json
import random

import pytest
from torch import nn

from retinanet import engine
from retinanet.budget import MAX_CHANGE, plan_run, train_seconds
from retinanet.checkpoint import load_checkpoint
from retinanet.optim import cosine, sgd, warmup_steps
from retinanet.trainer import run

from conftest import compose_train, tiny_train_overrides


def simulate(step_seconds, limit: float, epochs: int | None = None, steps_per_epoch: int = 225):
    """A time-limited run of steps of the given durations with the default cosine schedule (5% warmup, at most 1000
    steps, from 0.001 x lr) and no training: (the learning rate of each step, the plan after each step, seconds
    spent)."""
    optimizer = sgd(nn.Linear(2, 2), lr=1.0)
    scheduler = cosine(optimizer, steps_per_epoch * (epochs or 1))
    plan = plan_run(scheduler, steps_per_epoch, epochs, limit)
    lrs, totals, spent = [], [], 0.0
    for duration in step_seconds:
        if len(lrs) >= plan.total:
            break
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        spent += duration
        plan.after_step(len(lrs), spent)
        totals.append(plan.total)
    return lrs, totals, spent


@pytest.mark.parametrize("seed", range(5))
def test_a_budget_to_fill_is_spent_to_within_a_few_percent_never_over(seed):
    rng = random.Random(seed)
    slow_start = [3.0, 2.0]  # the first steps are slower (allocations)
    durations = slow_start + [rng.uniform(0.8, 1.2) for _ in range(2000)]
    lrs, _, spent = simulate(durations, 600)
    assert 0.95 * 600 <= spent <= 600
    assert 450 < len(lrs) < 700
    assert lrs[-1] < 1e-3  # the cosine decayed to the run's end


def test_a_cap_never_trains_more_than_asked_and_cuts_what_does_not_fit():
    lrs, _, spent = simulate([1.0] * 2000, 600, epochs=1, steps_per_epoch=100)
    assert len(lrs) == 100 and spent == 100  # fits: the limit changes nothing
    lrs, _, spent = simulate([1.0] * 6000, 600, epochs=1, steps_per_epoch=5000)
    assert 0.95 * 600 <= spent <= 600 and len(lrs) < 600  # does not fit: cut to what does
    assert lrs[-1] < 0.02  # ... and the schedule decays to the cut


@pytest.mark.parametrize("limit", [600, 100])
def test_a_slow_first_step_is_not_timed_and_the_warmup_still_happens(limit):
    # torch.compile: the first step takes 60 s, then 0.1 s
    lrs, totals, spent = simulate([60.0] + [0.1] * 20_000, limit)
    assert spent <= limit and len(lrs) > 0.9 * (limit * 0.99 - 60) / 0.1  # not cut to a few steps by one slow step
    warm = warmup_steps(len(lrs), 0.05, 1000)
    rise = [b - a for a, b in zip(lrs, lrs[1:warm])]
    assert lrs[0] == pytest.approx(0.001) and warm > 15
    assert all(r >= 0 for r in rise) and max(rise) < 1.5 / warm  # a linear rise over the warmup, no jump
    assert max(lrs) == pytest.approx(1.0, abs=0.01) and lrs[-1] < 1e-3


def test_capped_mode_warms_up_at_its_planned_rate_from_step_1():
    # make train on a slow machine: 14 epochs of 225 steps asked, a slower first step, the limit cuts the run
    lrs, totals, spent = simulate([2.0] + [0.4] * 20_000, 660, epochs=14)
    warm = warmup_steps(14 * 225, 0.05, 1000)  # planned for the epochs asked for
    expected = [0.001 + (1 - 0.001) * s / warm for s in range(20)]
    assert lrs[:20] == pytest.approx(expected)
    assert spent <= 660 and len(lrs) < 14 * 225 and lrs[-1] < 1e-3


@pytest.mark.parametrize("epochs", [None, 14])
def test_each_replan_moves_the_length_by_a_bounded_factor(epochs):
    rng = random.Random(0)
    durations = [30.0, 5.0] + [rng.uniform(0.15, 0.25) for _ in range(20_000)]
    durations[400] = 30.0  # a recompilation mid-run
    for i in range(1000, 1200):
        durations[i] *= 2  # a slower stretch (another job on the machine)
    lrs, totals, spent = simulate(durations, 660, epochs=epochs)
    first = 5  # the first plan from a measured pace (after the steps that are not timed)
    for a, b in zip(totals[first:-1], totals[first + 1:-1]):  # the last: the limit ends the run
        assert max(b / a, a / b) <= MAX_CHANGE or abs(b - a) <= 1
    assert 0.9 * 660 <= spent <= 660 and lrs[-1] < 0.01
    steps = [b - a for a, b in zip(lrs[first + 60:], lrs[first + 61:])]
    assert max(abs(s) for s in steps) < 0.01  # the learning rate moves smoothly after the warmup


def test_train_seconds_sums_the_history():
    assert train_seconds([{"train": {"seconds": 1.5}}, {"train": {"seconds": 2.0}}]) == 3.5
    assert train_seconds([]) == 0.0


class FakeClock:
    """``time.perf_counter`` of the training loop: each call is 0.1 s later (steps of about 0.1 s); with
    ``first_step``, the first step takes that long (the clock's 2nd call: the 1st starts the epoch)."""

    def __init__(self, first_step: float | None = None):
        self.now, self.calls, self.first_step = 0.0, 0, first_step

    def perf_counter(self):
        self.calls += 1
        self.now += self.first_step if self.calls == 2 and self.first_step is not None else 0.1
        return self.now


def lr_curve(run_dir) -> list[list[float]]:
    """The learning rate of every step of a run ([step, lr], trainer.log_every=1), as its last.pt keeps it."""
    return load_checkpoint(run_dir / "last.pt")["curves"]["lr"].tolist()


@pytest.mark.slow
def test_a_run_without_epochs_fills_its_time_limit_and_decays_to_its_end(tiny_shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "time", FakeClock())
    overrides = tiny_train_overrides(tiny_shapes) + ["trainer.epochs=null", "trainer.time_limit=2.5"]
    run(compose_train(overrides), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.95 * 2.5 <= metrics["train_seconds"] <= 2.5
    assert metrics["steps"] >= 20 and metrics["epochs_trained"] >= 4  # 6 steps an epoch: the plan spans epochs
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["planned_steps"] == ckpt["step"] == metrics["steps"]
    assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-9)  # the cosine reached its end
    assert "of the budget" in capsys.readouterr().out

    # resumed: nothing more to train, the plan stands
    run(compose_train(overrides + ["trainer.resume=auto"]), tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == metrics["steps"]


@pytest.mark.slow
def test_epochs_given_the_limit_is_a_cap_that_can_end_mid_epoch(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "time", FakeClock())
    overrides = tiny_train_overrides(tiny_shapes, out_epochs=3) + ["trainer.time_limit=1.0"]
    run(compose_train(overrides), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_seconds"] <= 1.0 and metrics["steps"] < 18  # 3 epochs of 6 steps did not fit
    assert metrics["epochs_planned"] == 3 and "val" in metrics["history"][-1]


@pytest.mark.slow
def test_no_time_limit_trains_every_epoch(tiny_shapes, tmp_path):
    run(compose_train(tiny_train_overrides(tiny_shapes, out_epochs=2) + ["trainer.time_limit=null"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["steps"] == 12
    assert load_checkpoint(tmp_path / "last.pt")["planned_steps"] is None


@pytest.mark.slow
def test_a_60s_first_step_still_trains_the_budget_with_a_warmup(tiny_shapes, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "time", FakeClock(first_step=60.0))  # trainer.compile=true: the first step compiles
    overrides = tiny_train_overrides(tiny_shapes) + ["trainer.epochs=null", "trainer.time_limit=62.5"]
    run(compose_train(overrides), tmp_path)
    lrs = [lr for _, lr in lr_curve(tmp_path)]
    assert len(lrs) >= 15  # not one step: the 60 s step is not the pace
    peak = max(lrs)
    rising = [lr for lr in lrs[:lrs.index(peak) + 1] if lr > 0.01 * peak]
    assert lrs[0] < 0.01 * peak and len(rising) >= 3  # the warmup climbs over several steps
    assert all(b - a <= 0.5 * peak for a, b in zip(lrs, lrs[1:]))  # no jump


@pytest.mark.slow
def test_a_resumed_time_limited_run_follows_the_learning_rate_curve_of_an_uninterrupted_one(tiny_shapes, tmp_path,
                                                                                             monkeypatch):
    overrides = tiny_train_overrides(tiny_shapes) + ["trainer.epochs=null", "trainer.time_limit=12",
                                                     "trainer.checkpoint_every_steps=4"]
    train_step = engine.TrainStep.__call__

    def slow_step_45(self, batches, step, *args, **kwargs):  # 1.1 s instead of 0.1 s: the resumed run's first step
        if step == 44:                                       # (start-up); the uninterrupted run has the same hiccup
            engine.time.now += 1.0
        return train_step(self, batches, step, *args, **kwargs)

    def killed_at_step_46(self, batches, step, *args, **kwargs):
        if step == 45:
            raise RuntimeError("killed")
        return train_step(self, batches, step, *args, **kwargs)

    monkeypatch.setattr(engine, "time", FakeClock())
    monkeypatch.setattr(engine.TrainStep, "__call__", slow_step_45)
    run(compose_train(overrides), tmp_path / "whole")
    monkeypatch.setattr(engine, "time", FakeClock())
    monkeypatch.setattr(engine.TrainStep, "__call__", killed_at_step_46)
    with pytest.raises(RuntimeError, match="killed"):
        run(compose_train(overrides), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 44  # mid-epoch 8 of about 16
    monkeypatch.setattr(engine, "time", FakeClock())  # a new process
    monkeypatch.setattr(engine.TrainStep, "__call__", slow_step_45)
    run(compose_train(overrides + ["trainer.resume=auto"]), tmp_path / "resumed")

    whole, resumed = lr_curve(tmp_path / "whole"), lr_curve(tmp_path / "resumed")
    assert [s for s, _ in resumed] == [s for s, _ in whole] and len(whole) > 80
    peak = max(lr for _, lr in whole)
    assert all(abs(a - b) <= 0.02 * peak for (_, a), (_, b) in zip(whole, resumed))
