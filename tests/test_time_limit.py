"""trainer.time_limit: a run that would overrun its budget trains fewer epochs, with its schedule
re-planned to end with them; a resumed run keeps the cut."""

import json
import math

import pytest
from torch import nn

from conftest import compose_train, tiny_train_overrides
from retinanet.budget import epochs_within, train_seconds
from retinanet.checkpoint import load_checkpoint
from retinanet.optim import build_optimizer, build_scheduler, set_total_steps
from retinanet.trainer import run


@pytest.mark.parametrize("limit, planned, done, spent, last, expected", [
    (600, 14, 1, 40, 40, 14),    # 40 s a epoch: all 14 fit (560 s)
    (600, 14, 1, 110, 110, 5),   # 110 s a epoch: 5 fit (550 s), a sixth would end at 660 s
    (600, 14, 3, 300, 100, 6),   # the pace slowed down: 3 more epochs of 100 s
    (600, 14, 4, 700, 200, 4),   # already over: stop now, never below what is trained
    (600, 14, 1, 100, 100, 6),   # exactly at the limit counts as fitting
    (600, 3, 1, 1, 1, 3),        # never more than planned
])
def test_epochs_within(limit, planned, done, spent, last, expected):
    assert epochs_within(limit, planned, done, spent, last) == expected


def test_train_seconds_sums_the_history():
    assert train_seconds([{"train": {"seconds": 1.5}}, {"train": {"seconds": 2.0}}]) == 3.5
    assert train_seconds([]) == 0.0


def test_set_total_steps_replans_the_cosine_to_its_new_end():
    opt = build_optimizer(nn.Linear(2, 2), "sgd", lr=1.0)
    sched = build_scheduler(opt, 100, name="cosine", warmup_steps=0, min_factor=0.0)
    lrs = []
    for step in range(60):
        if step == 20:
            set_total_steps(sched, 41)  # the run now ends at step 40
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 99)))
    assert lrs[20] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lrs[40] == pytest.approx(0.0, abs=1e-12)
    # the plan comes from the config, not from a checkpoint: no lambda state is saved
    assert all(state is None for state in sched.state_dict()["lr_lambdas"])


def test_a_run_over_its_time_limit_trains_fewer_epochs_and_a_resume_keeps_the_cut(tiny_shapes, tmp_path, capsys):
    overrides = tiny_train_overrides(tiny_shapes, out_epochs=3) + ["trainer.time_limit=0.001"]
    run(compose_train(overrides), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["epochs_planned"], metrics["epochs_trained"]) == (3, 1)
    assert [e["epoch"] for e in metrics["history"]] == [1] and "val" in metrics["history"][0]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epochs_cut"] == 1 and ckpt["epoch"] == 1
    # the schedule was re-planned to end at the last step of epoch 1: the cosine reached its floor
    steps = ckpt["step"]
    assert steps == 6  # 48 images / batch 8
    assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    assert "trained 1 of the 3 planned epochs: the others would not have fitted" in capsys.readouterr().out

    # the same command again, resumed: nothing more to train, the cut stands
    ap = run(compose_train(overrides + ["trainer.resume=auto"]), tmp_path)
    assert ap == pytest.approx(metrics["final"]["stats"]["AP"])
    assert load_checkpoint(tmp_path / "last.pt")["step"] == steps


def test_no_time_limit_trains_every_epoch(tiny_shapes, tmp_path):
    run(compose_train(tiny_train_overrides(tiny_shapes, out_epochs=2) + ["trainer.time_limit=null"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2
    assert load_checkpoint(tmp_path / "last.pt")["epochs_cut"] is None

