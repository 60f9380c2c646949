"""Never lose a run: resumable batches, per-sample augmentation seeds, RNG state in checkpoints, and real
training subprocesses killed (SIGKILL in the middle of a checkpoint write, SIGTERM mid-epoch) then resumed
to the same weights, bit for bit, as a run that was never interrupted (CPU, trainer.deterministic=true)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retinanet.checkpoint import CheckpointError, load_checkpoint, rng_state, set_rng_state
from retinanet.data.build import build_dataset, build_loader
from retinanet.data.samplers import EpochBatchSampler, SeededSamples, sample_seed
from retinanet.files import atomic_save
from retinanet.signals import StopSignal
from retinanet.trainer import run

import pause_write
from conftest import ROOT, TIMEOUT, compose_train, make_micro_shapes, micro_overrides


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro_shapes(tmp_path_factory.mktemp("micro") / "shapes")


def start_training(overrides: list[str], run_dir: Path, log: Path, pause: str | None = None,
                   new_session: bool = False) -> subprocess.Popen:
    """``scripts/train.py`` in a subprocess; ``pause="last.pt:3"`` pauses its 3rd write of last.pt half-way
    (tests/pause_write.py); ``new_session``: its own process group, as under a supervisor."""
    script = [str(ROOT / "scripts" / "train.py")]
    if pause:
        script = [str(ROOT / "tests" / "pause_write.py"), pause, *script]
    cmd = [sys.executable, *script, *overrides, f"hydra.run.dir={run_dir}"]
    # this checkout's package first (pause_write imports it before train.py puts the checkout on sys.path)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=new_session)


def wait_for(condition, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"training exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical weights, EMA weights, optimiser state and position."""
    assert (a["epoch"], a["step"], a["epoch_complete"]) == (b["epoch"], b["step"], b["epoch_complete"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"model {key} differs"
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), f"EMA {key} differs"
    assert a["ema"]["updates"] == b["ema"]["updates"]
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {pid}/{name} differs"
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    losses = [[e["train"][k] for k in ("loss", "loss_cls", "loss_box")] for e in a["history"]]
    assert losses == [[e["train"][k] for k in ("loss", "loss_cls", "loss_box")] for e in b["history"]]
    assert a["metrics"]["stats"] == b["metrics"]["stats"] and a["metrics"]["loss"] == b["metrics"]["loss"]
    assert {k: v.tolist() for k, v in a["curves"].items()} == {k: v.tolist() for k, v in b["curves"].items()}  # the
    # per-step loss / lr record of plots/loss_lr.png: the steps before the checkpoint kept, those after it redone


# --- pieces -------------------------------------------------------------------------------------------

def test_batches_are_a_function_of_seed_epoch_and_position():
    sampler = EpochBatchSampler(23, 4, seed=5)
    assert len(sampler) == 5  # 23 // 4, the short last batch dropped
    sampler.set_epoch(3)
    full = list(sampler)
    indices = [i for batch in full for i, _ in batch]
    assert len(set(indices)) == 20 and all(len(b) == 4 for b in full)
    assert all(s == sample_seed(5, 3, i) for batch in full for i, s in batch)  # seeds from (seed, epoch, index)
    sampler.set_epoch(3, skip=2)
    assert list(sampler) == full[2:]  # a resumed epoch continues exactly where it stopped
    again = EpochBatchSampler(23, 4, seed=5)
    again.set_epoch(3)
    assert list(again) == full  # a new process (a resumed run) gets the same epoch
    again.set_epoch(4)
    assert [i for b in again for i, _ in b] != indices  # another epoch, another order
    other_seed = EpochBatchSampler(23, 4, seed=6)
    other_seed.set_epoch(3)
    assert list(other_seed) != full
    assert len(EpochBatchSampler(23, 4, seed=5, multiple_of=2)) == 4  # whole accumulation windows only


def test_augmentation_depends_only_on_seed_epoch_and_index(micro):
    cfg = compose_train(micro_overrides(micro))
    dataset = SeededSamples(build_dataset(cfg.data, "train", train=True))
    key = (3, sample_seed(0, 1, 3))
    first = dataset[key]
    dataset[(5, sample_seed(0, 1, 5))]  # other draws in between do not matter
    assert np.array_equal(dataset[key]["image"], first["image"]) and np.array_equal(dataset[key]["boxes"],
                                                                                     first["boxes"])
    assert any(not np.array_equal(dataset[(3, sample_seed(0, e, 3))]["image"], first["image"]) for e in (2, 3, 4))

    def epoch_images(num_workers: int) -> list:
        loader = build_loader(dataset.dataset, 4, True, num_workers, 32, seed=0, pin_memory=False)
        loader.batch_sampler.set_epoch(1)
        return [b.images for b in loader]

    in_process, two_workers = epoch_images(0), epoch_images(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, two_workers, strict=True))  # workers do not matter


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"model": {}, "rng": rng_state()}, tmp_path / "last.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])  # torch.load(weights_only=True) inside
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_signal_asks_for_a_stop_and_a_later_second_one_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    stop = StopSignal(grace=0.3).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested() and stop.exit_code() == 128 + signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # within the grace time: the same stop (torchrun forwards Ctrl-C)
        time.sleep(0.4)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) == previous


# --- real runs, killed and resumed --------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(micro, tmp_path_factory) -> tuple[list[str], dict]:
    """The reference: the same run, never interrupted (in this process)."""
    overrides = micro_overrides(micro) + ["trainer.deterministic=true", "trainer.ema.decay=0.9",
                                          "trainer.checkpoint_every_steps=1", "trainer.keep_last=1"]
    out = tmp_path_factory.mktemp("uninterrupted")
    run(compose_train(overrides), out)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["epoch_complete"]
    assert {"model", "optimizer", "scheduler", "ema", "rng", "config", "label_map", "epoch_progress"} <= set(ckpt)
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "epoch_0002.pt", "last.pt"]  # keep_last=1
    return overrides, ckpt


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_mid_epoch_then_resume_is_bit_identical(uninterrupted, tmp_path):
    overrides, reference = uninterrupted
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    run_dir.mkdir()
    # a training subprocess pauses inside its 3rd write of last.pt (after step 3 of the 4 of epoch 1) with
    # part of the file on disk, and is killed there with SIGKILL
    proc = start_training(overrides, run_dir, log, pause="last.pt:3")
    marker = run_dir / "last.pt.paused"
    wait_for(marker.exists, proc, log)
    partial = list(run_dir.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    marker.unlink()
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(partial[0])  # what was being written is garbage ...
    previous = load_checkpoint(run_dir / "last.pt")  # ... and the previous last.pt is intact
    assert (previous["epoch"], previous["step"], previous["epoch_complete"]) == (1, 2, False)
    assert previous["epoch_progress"]["batches"] == 2

    run(compose_train(overrides + ["trainer.resume=auto"]), run_dir)  # the same command with resume=auto
    assert not list(run_dir.glob(".*.tmp"))  # the killed write's leftovers are cleaned up
    assert_same_training_state(load_checkpoint(run_dir / "last.pt"), reference)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_mid_epoch_and_resume_is_bit_identical(uninterrupted, tmp_path, monkeypatch,
                                                                            caplog):
    overrides, reference = uninterrupted
    overrides = overrides + ["trainer.checkpoint_every_steps=2"]  # periodic saves at even steps only
    run_dir = tmp_path / "run"
    # hold the run inside its step-2 save, deliver SIGTERM to this process there, then let it go on
    pause_write.install("last.pt", 1)
    marker = run_dir / "last.pt.paused"

    def terminate_when_paused():
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        marker.unlink()

    before = signal.getsignal(signal.SIGTERM)
    helper = threading.Thread(target=terminate_when_paused, daemon=True)
    helper.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            run(compose_train(overrides), run_dir)
    finally:
        pause_write.uninstall()
    helper.join()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone with the run
    saved = load_checkpoint(run_dir / "last.pt")
    # the signal arrived during step 2's save: step 3 finished, then the run saved it and stopped
    assert (saved["epoch"], saved["step"], saved["epoch_complete"]) == (1, 3, False)
    assert "SIGTERM received" in caplog.text and "stopped by a signal at step 3" in caplog.text

    new_dir = tmp_path / "continued"  # continue in a new run dir, from an explicit path
    run(compose_train(overrides + [f"trainer.resume={run_dir / 'last.pt'}"]), new_dir)
    assert_same_training_state(load_checkpoint(new_dir / "last.pt"), reference)
    assert json.loads((new_dir / "metrics.json").read_text())["resumed_from"] == str(run_dir / "last.pt")


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_a_loader_worker_saves_and_resumes_exactly(uninterrupted, tmp_path):
    # what docker stop, Kubernetes, SLURM and systemd do: SIGTERM to every process of the group, the DataLoader
    # worker included. The worker must leave the stop to the main process, which saves and exits with 143.
    overrides, reference = uninterrupted
    overrides = overrides + ["trainer.num_workers=1", "trainer.checkpoint_every_steps=2"]
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    run_dir.mkdir()
    proc = start_training(overrides, run_dir, log, pause="last.pt:1", new_session=True)  # paused after step 2
    marker = run_dir / "last.pt.paused"
    wait_for(marker.exists, proc, log)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(1.0)  # the signal reaches every process of the group while the main one is held
    marker.unlink()
    assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("SIGTERM received") == 1, text[-3000:]  # once: the worker ignores it, silently
    assert "stopped by a signal at step 3" in text and "Traceback" not in text
    saved = load_checkpoint(run_dir / "last.pt")
    assert (saved["epoch"], saved["step"], saved["epoch_complete"]) == (1, 3, False)
    run(compose_train(overrides + ["trainer.resume=auto"]), run_dir)
    assert_same_training_state(load_checkpoint(run_dir / "last.pt"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"garbage bytes" * 50, "truncated", "pickled code"])
def test_a_bad_resume_file_is_one_line_and_exit_code_2(micro, tmp_path, content):
    bad = tmp_path / "bad.pt"
    if content == "truncated":
        atomic_save({"model": {"w": torch.zeros(1000)}}, bad)
        bad.write_bytes(bad.read_bytes()[:300])
    elif content == "pickled code":
        torch.save({"model": {}, "hook": os.system}, bad)  # a function: refused by weights_only
    else:
        bad.write_bytes(content)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *micro_overrides(micro),
                           f"trainer.resume={bad}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text and f"checkpoint '{bad}' cannot be read" in text
    assert "weights_only=False" not in text and "weights_only" not in text  # never advise unsafe loading


def test_resume_errors_name_the_key(micro, tmp_path):
    from retinanet.errors import UserError

    with pytest.raises(UserError, match="trainer.resume='/nowhere/last.pt' does not exist"):
        run(compose_train(micro_overrides(micro) + ["trainer.resume=/nowhere/last.pt"]), tmp_path)
    with pytest.raises(UserError, match="trainer.resume=True must be null, auto or the path"):
        run(compose_train(micro_overrides(micro) + ["trainer.resume=true"]), tmp_path)
