"""Clusters without a cluster: SLURM's node lists and variables, ``srun`` simulated by two local processes given
SLURM variables, and Hydra's submitit launcher through submitit's local executor (real subprocesses, CPU, gloo):
one 2-task training equal to torchrun's, and a preempted job that requeues itself and ends bit-identical.

What cannot run here: a real SLURM controller (sbatch, scontrol requeue) and nccl. submitit's SLURM executor
runs the same task code; only the variables it reads (SLURM_*) and the requeue command differ.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retinanet import cluster
from retinanet.checkpoint import load_checkpoint
from retinanet.signals import StopSignal

from conftest import ROOT, TIMEOUT, free_port, make_micro_shapes, micro_overrides

SUBMITIT = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]


# --- SLURM's variables ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("node7", ["node7"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the first bound's width is kept
    ("r[1-2]-n[1,3]", ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]),
    ("x[1],y[08-09],z", ["x1", "y08", "y09", "z"]),
])
def test_slurm_node_lists_expand_as_slurm_writes_them(text, hosts):
    assert cluster.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("gpu[01-", "unbalanced brackets"),
    ("gpu]01[", "unbalanced brackets"),
    ("gpu[04-01]", "'04-01' in [04-01] is not a number or a rising range"),
    ("gpu[a-b]", "'a-b' in [a-b] is not a number"),
    ("a,,b", "an empty host name"),
    ("", "an empty host name"),
])
def test_a_node_list_it_cannot_read_is_named(text, why):
    with pytest.raises(cluster.ClusterEnvironmentError, match=re.escape(f"node list {text!r}: {why}")):
        cluster.expand_nodelist(text)


def slurm_task(monkeypatch, **variables) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
                 "SLURM_STEP_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_an_srun_task_reads_its_place_from_slurm(monkeypatch):
    slurm_task(monkeypatch, SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_ID="774321",
               SLURM_JOB_NODELIST="gpu[03-06]")
    assert cluster.rendezvous_variables() == ("SLURM", {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu03",
        "MASTER_PORT": str(cluster.PORT_BASE + 774321 % cluster.PORT_SPAN)})  # every task derives the same port
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[05-06]")  # srun on part of the allocation: its first node
    assert cluster.rendezvous_variables()[1]["MASTER_ADDR"] == "gpu05"
    assert cluster.rendezvous_variables()[1]["MASTER_PORT"] == "29511"
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win (torchrun started inside an allocation)
    assert cluster.rendezvous_variables() == ("torchrun", {})


@pytest.mark.parametrize("variables, message", [
    ({"SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
    ({"SLURM_PROCID": "4"}, "task rank 4 is not within the 2 task\\(s\\)"),
    ({"SLURM_JOB_NODELIST": "gpu[1-"}, "node list 'gpu\\[1-': unbalanced brackets"),
    ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not"),
])
def test_bad_slurm_variables_are_named(monkeypatch, variables, message):
    slurm_task(monkeypatch, **{"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                               "SLURM_JOB_NODELIST": "n1", **variables})
    with pytest.raises(cluster.ClusterEnvironmentError, match=message):
        cluster.rendezvous_variables()


def test_a_bad_slurm_variable_stops_the_command_with_one_line(tmp_path):
    env = {**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "gpu[01-", "SLURM_JOB_ID": "7"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SUBMITIT_EXECUTOR"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "node list 'gpu[01-': unbalanced brackets" in proc.stderr and "Traceback" not in proc.stderr


def submitit_task(monkeypatch, executor: str, **variables) -> None:
    """This process as a task of a submitit job (the variables submitit's executors set; submitit reads them)."""
    slurm_task(monkeypatch, SUBMITIT_EXECUTOR=executor, **variables)


def test_a_submitit_slurm_task_takes_its_place_from_submitit(monkeypatch):
    # what submitit_slurm's tasks see: submitit's SlurmJobEnvironment reads them (nodes=2, tasks_per_node=8)
    submitit_task(monkeypatch, "slurm", SLURM_JOB_ID="991", SLURM_PROCID="11", SLURM_LOCALID="3",
                  SLURM_NTASKS="16", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-08]")
    assert cluster.rendezvous_variables() == ("submitit", {
        "RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(cluster.derived_port("991"))})


def test_in_a_submitit_job_the_preemption_signal_stops_saves_and_goes_on_to_submitit(monkeypatch, tmp_path):
    submitit_task(monkeypatch, "local", SUBMITIT_LOCAL_JOB_ID="123", SUBMITIT_LOCAL_NTASKS="1",
                  SUBMITIT_LOCAL_GLOBALID="0", SUBMITIT_LOCAL_LOCALID="0")
    assert cluster.preemption_signal() == signal.SIGUSR2
    received = []  # stands in for the handler submitit installs in its tasks (checkpoint and requeue)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested() and received == []  # first: stop after the step, save last.pt ...
        stop.hand_over()  # ... then submitit's handler, which requeues
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)

    assert cluster.continue_requeued_run(None, tmp_path) is None  # a new job starts fresh
    (tmp_path / "last.pt").write_bytes(b"")
    assert cluster.continue_requeued_run(None, tmp_path) == "auto"  # a requeued one continues its run dir
    assert cluster.continue_requeued_run("/old/run/last.pt", tmp_path) == "auto"
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert cluster.continue_requeued_run(None, tmp_path) is None  # outside submitit: as configured
    assert cluster.preemption_signal() is None


def test_sigterm_is_not_handed_over(monkeypatch):
    submitit_task(monkeypatch, "local", SUBMITIT_LOCAL_JOB_ID="123")
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGTERM)
        stop.hand_over()  # SIGTERM: last.pt and exit, no requeue (SLURM requeues a preempted job itself)
        stop.restore()
        assert stop.requested() and received == []
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- real multi-process runs: torchrun, srun (simulated), submitit's local executor ---------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    """The overrides of every 2-process run below: 2 epochs of 4 steps of 2 x 2 images, deterministic."""
    micro = make_micro_shapes(tmp_path_factory.mktemp("micro") / "shapes")
    return micro_overrides(micro) + ["loss=focal", "trainer=default", "model.net.norm=gn",
                                     "trainer.deterministic=true", "trainer.batch_size=2",
                                     "trainer.eval_batch_size=4", "evaluation.plots.enabled=false"]


def clean_env(**extra) -> dict:
    """This process's environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                        "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def submitit_command(sweep: Path, base: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *SUBMITIT, f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=run", *base]


@pytest.fixture(scope="module")
def torchrun_run(base, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "scripts" / "train.py"), *base, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def submitit_run(base, tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("submitit") / "sweep"
    proc = subprocess.run(submitit_command(sweep, base), cwd=sweep.parent, capture_output=True, text=True,
                          env=clean_env(MASTER_PORT=str(free_port())), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep / "run"


@pytest.mark.slow
def test_submitit_local_two_tasks_train_one_run_equal_to_torchrun(submitit_run, torchrun_run):
    log = (submitit_run / "train.log").read_text()
    assert "submitit task: rank 0 of 2 (local rank 0), rendezvous 127.0.0.1:" in log
    assert "batches of 4 images (2 per process x 2 process(es) x 1 accumulated)" in log
    assert log.count("epoch 1: loss") == 1 and "rank 1" not in log  # rank 0 writes the run dir's log
    assert (submitit_run / ".hydra" / "config.yaml").is_file() and (submitit_run / "metrics.json").is_file()
    submitted = submitit_run.parent / ".submitit"
    assert len([p for p in submitted.glob("*/*_log.out")]) == 2  # one job of two tasks
    ckpt = load_checkpoint(submitit_run / "last.pt")
    assert len(ckpt["replica_digests"]) == 2 and len(set(ckpt["replica_digests"])) == 1  # ranks in sync
    assert_bit_identical(ckpt["model"], weights(torchrun_run))  # the same training as torchrun's, to the bit


@pytest.mark.slow
def test_srun_tasks_given_slurm_variables_train_two_ranks(base, torchrun_run, tmp_path):
    port, procs = free_port(), []
    for rank in range(2):  # what srun --ntasks=2 starts on one node: one process per task, SLURM_* set
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_JOB_ID="4242",
                        SLURM_JOB_NODELIST="localhost,gpu[01-02]", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "retinanet.commands.train", *base], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for rank, output in enumerate(outputs):  # where each task waits, on its stderr (SLURM's task log)
        assert f"SLURM task: rank {rank} of 2 (local rank {rank}), rendezvous localhost:{port}" in output
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs  # both tasks used rank 0's timestamped run dir
    log = (run_dirs[0] / "train.log").read_text()
    assert json.loads((run_dirs[0] / "metrics.json").read_text())["world_size"] == 2
    assert "batches of 4 images (2 per process x 2 process(es) x 1 accumulated)" in log
    assert_bit_identical(weights(run_dirs[0]), weights(torchrun_run))


def task_pids(launcher_pid: int) -> list[int]:
    """The tasks of the submitit job a launcher process started: the children of its local controller."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    controllers = [pid for pid, parent in parents.items() if parent == launcher_pid]
    return sorted(pid for pid, parent in parents.items() if parent in controllers)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the task processes in /proc (Linux)")
def test_a_preempted_submitit_job_requeues_itself_and_ends_bit_identical(base, submitit_run, tmp_path):
    sweep = tmp_path / "sweep"
    launcher = subprocess.Popen(submitit_command(sweep, base), cwd=tmp_path, env=clean_env(MASTER_PORT=str(free_port())),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (sweep / "run" / "last.pt").is_file():  # epoch 1 is saved: preempt the job now (it stops after its current step)
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.05)
    tasks = task_pids(launcher.pid)
    assert len(tasks) == 2, tasks
    for pid in tasks:  # what submitit's controller (locally) and SLURM (--signal) send every task
        os.kill(pid, signal.SIGUSR2)
    output = launcher.communicate(timeout=TIMEOUT)[0]
    assert launcher.returncode == 0, output[-3000:]

    run_dir = sweep / "run"
    log = (run_dir / "train.log").read_text()
    assert "SIGUSR2 received" in log and "handing SIGUSR2 over to submitit" in log, log[-3000:]
    assert "holds last.pt: continuing it (trainer.resume=auto)" in log, log[-3000:]  # the requeued job
    task0 = next(run_dir.parent.glob(".submitit/*/*_0_log.out")).read_text()
    assert "Requeued job" in task0, task0[-3000:]
    assert load_checkpoint(run_dir / "last.pt")["replica_digests"][0] == \
        load_checkpoint(submitit_run / "last.pt")["replica_digests"][0]
    assert_bit_identical(weights(run_dir), weights(submitit_run))  # as if never interrupted
