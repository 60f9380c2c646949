"""trainer.time_limit: the run plans its length per step from its pace. With trainer.epochs=null it fills the
budget (at least 95% of it, never more than 100%); with epochs given the limit is a cap. The schedule is
re-planned to warm up and decay within the run, and a resumed run keeps the plan."""

import json
import random

import pytest

from retinanet import engine
from retinanet.budget import TimeBudget, train_seconds
from retinanet.checkpoint import load_checkpoint
from retinanet.trainer import run

from conftest import compose_train, tiny_train_overrides


def simulate(budget: TimeBudget, step_seconds, first_total: int) -> tuple[int, float]:
    """Steps of the given durations until the plan is reached: (steps trained, seconds spent)."""
    total, spent, steps = first_total, 0.0, 0
    budget.record(spent)
    for duration in step_seconds:
        if steps >= total:
            break
        spent += duration
        steps += 1
        budget.record(spent)
        total = steps if budget.exhausted(spent) else budget.total_steps(steps, spent, total)
    return steps, spent


@pytest.mark.parametrize("seed", range(5))
def test_a_budget_to_fill_is_spent_to_within_a_few_percent_never_over(seed):
    rng = random.Random(seed)
    slow_start = [3.0, 2.0]  # the first steps are slower (allocations)
    durations = slow_start + [rng.uniform(0.8, 1.2) for _ in range(2000)]
    steps, spent = simulate(TimeBudget(600, None), durations, first_total=10)
    assert 0.95 * 600 <= spent <= 600
    assert 450 < steps < 700


def test_a_cap_never_trains_more_than_asked_and_cuts_what_does_not_fit():
    steps, spent = simulate(TimeBudget(600, planned_steps=100), [1.0] * 2000, first_total=100)
    assert steps == 100 and spent == 100  # fits: the limit changes nothing
    steps, spent = simulate(TimeBudget(600, planned_steps=5000), [1.0] * 6000, first_total=5000)
    assert 0.95 * 600 <= spent <= 600 and steps < 600  # does not fit: cut to what does


def test_train_seconds_sums_the_history():
    assert train_seconds([{"train": {"seconds": 1.5}}, {"train": {"seconds": 2.0}}]) == 3.5
    assert train_seconds([]) == 0.0


class FakeClock:
    """``time.perf_counter`` of the training loop: each call is 0.1 s later (steps of about 0.1 s)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.1
        return self.now


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
