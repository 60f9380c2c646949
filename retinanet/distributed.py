"""torch.distributed helpers: process group from the launcher's environment, reductions, gathering, run dir.

``torchrun --nproc_per_node=N -m retinanet.commands.train ...`` (from a clone: ``scripts/train.py``) sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; a submitit task or an ``srun``
task gets them from its job (``retinanet.cluster``). ``init_from_env`` joins that group (nccl for CUDA
tensors, gloo for CPU tensors). Without any launcher everything here is a no-op for one process, so the
trainer has a single code path.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from retinanet import cluster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return DistInfo()


def init_from_env(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group of torchrun's environment, else of this submitit or ``srun`` task's job
    (``retinanet.cluster.rendezvous_variables``, exported as torchrun's variables); idempotent; a no-op for one
    process."""
    if dist.is_available() and dist.is_initialized():
        return info()
    source, variables = cluster.rendezvous_variables()
    os.environ.update(variables)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return info()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    quiet_other_ranks(int(os.environ.get("RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_index(local_rank))
        backend = "cpu:gloo,cuda:nccl"  # nccl for CUDA tensors, gloo for CPU ones (device=cpu, small objects)
    else:
        backend = "gloo"
    if source != "torchrun":  # where each task waits: on stderr under srun (before Hydra's logging is set up)
        text = (f"{source} task: rank {os.environ['RANK']} of {world} (local rank {local_rank}), rendezvous "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
        if logging.getLogger().handlers:
            log.info("%s", text)
        else:
            print(text, file=sys.stderr, flush=True)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    log.info("rank %d of %d (local rank %d), backend %s", dist.get_rank(), world, local_rank, backend)
    return info()


def cuda_index(local_rank: int) -> int:
    """This process's GPU: its local rank among the GPUs it sees (one per task under ``srun --gpus-per-task=1``,
    all of the node's under torchrun or ``--gpus-per-node``)."""
    return local_rank % max(torch.cuda.device_count(), 1)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over all ranks (a new tensor; ``value`` itself is unchanged)."""
    if not info().enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (e.g. a signal that reached one process)."""
    if not info().enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, e.g. CPU detections)."""
    if not info().enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others."""
    if not info().enabled:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes in order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(model: nn.Module) -> list[str]:
    """``parameter_digest`` of every rank (all equal when the replicas are in sync)."""
    return gather_objects(parameter_digest(model))


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around ``model`` (optionally with SyncBatchNorm); ``model`` itself when alone."""
    if not info().enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile`` and / or DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- the Hydra run dir: every rank must write to (and resume from) rank 0's folder ------------------

def adopt_rank0_run_dir(argv: list[str]) -> None:
    """Ranks > 0: wait for rank 0's Hydra run dir and run in it too (``hydra.run.dir=...``).

    Called by ``retinanet-train`` (``retinanet.commands.train.cli``) before Hydra starts; rank 0 sends its
    folder with ``share_run_dir`` once Hydra has made it. Run dirs default to a timestamp, which processes
    started a second apart (or on other machines) would otherwise not agree on.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("retinanet-train: Hydra multirun (-m) cannot be combined with torchrun; launch one "
                             "torchrun per configuration, or let hydra/launcher=submitit_slurm start the tasks")
        return  # the multirun's launcher runs the jobs (a submitit task joins its job's group itself)
    if not init_from_env().enabled or dist.get_rank() == 0:
        return
    run_dir = str(broadcast_object(None)).replace("\\", "\\\\").replace("'", "\\'")
    # later overrides win over the user's; Hydra's config copies and log file come from rank 0 alone
    argv += [f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def share_run_dir(run_dir: str) -> None:
    """Rank 0: send the run dir Hydra made to the other ranks (see ``adopt_rank0_run_dir``)."""
    if info().enabled and dist.get_rank() == 0:
        broadcast_object(str(run_dir))


def quiet_other_ranks(rank: int | None = None) -> None:
    """Text logs from rank 0 only; other ranks keep warnings and errors, on their console (a submitit task's
    log file), never in the run dir's log file, which rank 0 writes."""
    if (info().rank if rank is None else rank) > 0:
        root = logging.getLogger()
        root.setLevel(logging.WARNING)
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
