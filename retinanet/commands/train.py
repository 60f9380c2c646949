"""Train a RetinaNet: `retinanet-train [group=preset ...] [key=value ...]` (from a clone: `python scripts/train.py ...`).

Examples:
    retinanet-train                                  # embedded shapes dataset, CPU preset
    retinanet-train trainer.epochs=3 optim.lr=0.005
    retinanet-train experiment=coco data.root=/datasets/coco  # the paper's setup (configs/experiment/coco.yaml)
    retinanet-train loss=focal trainer=default       # the paper's loss values, the plain loop
    retinanet-train -m loss.gamma=0,1,2 loss.alpha=0.25,0.5   # sweep (Hydra multirun)
    torchrun --nproc_per_node=4 -m retinanet.commands.train optim.reference_batch_size=16  # DDP (README: many GPUs)
    srun python -m retinanet.commands.train ...      # one task per GPU of a SLURM allocation (docs/cluster.md)
    retinanet-train -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=8 \
        hydra.launcher.gpus_per_node=8 ...           # submitted by submitit, requeued on preemption (docs/cluster.md)
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from retinanet import cluster, distributed
from retinanet.cli import run_or_exit
from retinanet.errors import UserError
from retinanet.trainer import run

log = logging.getLogger(__name__)


def describe_choices(choices) -> str:
    """``data=shapes data/augment=flip model=retinanet_r18_cpu ...``: the preset of each config group, in the order
    of train.yaml's defaults, a nested group after its parent (Hydra's own groups and unset ones left out)."""
    items = [(group, choice) for group, choice in reversed(list(choices.items()))  # Hydra lists them last first
             if choice is not None and not group.startswith("hydra/")]
    rank = {group: i for i, (group, _) in enumerate(items) if "/" not in group}
    items.sort(key=lambda item: (rank.get(item[0].split("/")[0], len(rank)), item[0].count("/")))
    return " ".join(f"{group}={choice}" for group, choice in items)


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run_or_exit(train_job, cfg, HydraConfig.get().runtime.output_dir)
    finally:
        distributed.shutdown()


def train_job(cfg: DictConfig, out_dir: str) -> float:
    """One training run in ``out_dir``, in this process's place of a torchrun / srun / submitit job (if any)."""
    # torchrun / srun: joined in cli(); a task of a submitit job (hydra/launcher=submitit_*) joins here
    if distributed.init_from_env().is_main:
        log.info("config groups: %s", describe_choices(HydraConfig.get().runtime.choices))
    if cluster.submitit_job() is None:
        distributed.share_run_dir(out_dir)  # torchrun / srun: every rank uses rank 0's
    # submitit's tasks compute the same run dir; a requeued job finds its last.pt there and continues
    cfg.trainer.resume = cluster.continue_requeued_run(cfg.trainer.resume, out_dir)
    return run(cfg, out_dir)


def cli() -> None:
    """The ``retinanet-train`` command (and ``scripts/train.py``, ``python -m retinanet.commands.train``)."""
    try:
        distributed.adopt_rank0_run_dir(sys.argv)  # torchrun / srun ranks > 0: wait for rank 0's run dir
    except UserError as err:  # e.g. a SLURM variable that cannot be read
        log.error("%s", err)
        sys.exit(2)
    try:
        main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
