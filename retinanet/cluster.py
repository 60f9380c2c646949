"""Where a process of a cluster job learns its place: submitit's job environment, or SLURM's ``srun`` variables.

torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) say it all
when present. Otherwise a task started by submitit (``hydra/launcher=submitit_local`` or ``submitit_slurm``;
``submitit.JobEnvironment``) or by a plain ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
``SLURM_JOB_NODELIST``) gets the same five variables from ``rendezvous_variables``: the rendezvous is the first
host of the job (``127.0.0.1`` for submitit's local executor) on ``MASTER_PORT`` if set, else a port derived
from the job id, so every task of a job agrees without talking.

A submitit job is requeued on preemption or time limit (``preemption_signal``: submitit's SIGUSR2 unless
``SUBMITIT_PREEMPT_SIGNAL`` names another): the requeued job runs the same command in the same run dir, and
``continue_requeued_run`` makes it resume from that run dir's ``last.pt``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

from retinanet.errors import UserError

log = logging.getLogger(__name__)

PORT_BASE, PORT_SPAN = 15000, 15000  # derived ports: 15000-29999, below Linux's ephemeral range (32768-60999)


class ClusterEnvironmentError(UserError):
    """A cluster variable that cannot be read (e.g. a node list that is not SLURM's syntax)."""


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``gpu[01-03,07]`` -> gpu01 gpu02 gpu03 gpu07, ``a1,b[2-3]`` ->
    a1 b2 b3; zero padding is kept, several bracket groups in one name multiply (``r[1-2]n[1-2]``)."""
    hosts: list[str] = []
    for name in _split_top_level(text):
        hosts += _expand_name(name, text)
    if not hosts:
        raise ClusterEnvironmentError(f"node list {text!r} names no host (SLURM writes e.g. gpu[01-04,07])")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """``a1,b[2-3]`` -> ``a1``, ``b[2-3]``: commas outside brackets separate host names."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ClusterEnvironmentError(f"node list {text!r}: unbalanced brackets (SLURM writes e.g. gpu[01-04,07])")
        if char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ClusterEnvironmentError(f"node list {text!r}: unbalanced brackets (SLURM writes e.g. gpu[01-04,07])")
    names.append(text[start:])
    if any(not n.strip() for n in names):
        raise ClusterEnvironmentError(f"node list {text!r}: an empty host name (SLURM writes e.g. a1,b[2-3])")
    return [n.strip() for n in names]


def _expand_name(name: str, whole: str) -> list[str]:
    """One host name with bracket groups (``gpu[01-02]`` or ``r[1-2]n[3,5]``) -> its hosts."""
    match = re.search(r"\[([^\[\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    return [head + number + rest for number in _expand_range(match.group(1), whole) for rest in _expand_name(tail, whole)]


def _expand_range(spec: str, whole: str) -> list[str]:
    """``01-03,7`` -> 01 02 03 7 (the width of the first bound is kept: 01-03 stays two digits)."""
    numbers = []
    for part in spec.split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None or (found.group(2) is not None and int(found.group(2)) < int(found.group(1))):
            raise ClusterEnvironmentError(f"node list {whole!r}: {part!r} in [{spec}] is not a number or a rising "
                                          "range like 01-04 (SLURM writes e.g. gpu[01-04,07])")
        low, high = found.group(1), found.group(2) or found.group(1)
        numbers += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return numbers


def derived_port(job_id: str) -> int:
    """The rendezvous port of a job without ``MASTER_PORT``: from the digits of its id, the same on every task."""
    digits = re.sub(r"\D", "", str(job_id))
    return PORT_BASE + (int(digits) % PORT_SPAN if digits else 0)


def _int_variable(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ClusterEnvironmentError(f"{name}={value!r} is not an integer") from None


def submitit_job():
    """submitit's ``JobEnvironment`` of this process when it is a task of a submitit job, else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit
    except ImportError:  # the variable leaked from another environment: not our job
        return None
    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # an executor submitit does not know
        return None


def rendezvous_variables() -> tuple[str, dict[str, str]]:
    """(where they came from, torchrun's variables) for this process: ``("torchrun", {})`` when torchrun's are
    set (they win), ``("submitit", {...})`` in a submitit task, ``("SLURM", {...})`` under ``srun``, else
    ``("", {})`` (one process)."""
    if "WORLD_SIZE" in os.environ:
        return "torchrun", {}
    job = submitit_job()
    if job is not None:
        local = job.cluster == "local"
        return "submitit", _variables(job.global_rank, job.local_rank, job.num_tasks,
                                      "127.0.0.1" if local else job.hostnames[0], job.raw_job_id)
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # the step's node list under srun (rank 0 runs on its first node), the job's otherwise
        name = "SLURM_STEP_NODELIST" if os.environ.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
        nodes = os.environ.get(name) or os.environ.get("SLURM_NODELIST")
        if not nodes:
            raise ClusterEnvironmentError("SLURM_PROCID and SLURM_NTASKS are set but SLURM_JOB_NODELIST is not: "
                                          "the rendezvous host (its first node) is unknown")
        return "SLURM", _variables(_int_variable("SLURM_PROCID"), _int_variable("SLURM_LOCALID")
                                   if "SLURM_LOCALID" in os.environ else 0, _int_variable("SLURM_NTASKS"),
                                   expand_nodelist(nodes)[0], os.environ.get("SLURM_JOB_ID", ""))
    return "", {}


def _variables(rank: int, local_rank: int, world: int, host: str, job_id: str) -> dict[str, str]:
    if not 0 <= rank < world:
        raise ClusterEnvironmentError(f"task rank {rank} is not within the {world} task(s) of the job")
    port = os.environ.get("MASTER_PORT") or str(derived_port(job_id))
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR") or host, "MASTER_PORT": port}


def preemption_signal() -> signal.Signals | None:
    """The signal submitit sends a job's tasks before preemption or the time limit (SIGUSR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` names another); None outside a submitit job."""
    job = submitit_job()
    if job is None:
        return None
    name = "SIG" + type(job).USR_SIG
    if not hasattr(signal, name):
        raise ClusterEnvironmentError(f"SUBMITIT_PREEMPT_SIGNAL={type(job).USR_SIG!r} is not a signal name (e.g. USR2)")
    return signal.Signals[name]


def continue_requeued_run(resume: str | None, out_dir: Path) -> str | None:
    """``trainer.resume`` for this run: in a submitit job whose run dir already holds ``last.pt`` (the job was
    requeued, or started again on the same run dir) ``auto``, so it continues that run; else ``resume``."""
    if submitit_job() is None or not (Path(out_dir) / "last.pt").is_file() or str(resume) == "auto":
        return resume
    log.warning("submitit job %s: %s holds last.pt: continuing it (trainer.resume=auto%s)", submitit_job().job_id,
                out_dir, "" if resume in (None, "", "null", "none") else f" instead of trainer.resume={resume}")
    return "auto"
