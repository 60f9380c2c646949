"""Train a RetinaNet: `retinanet-train [group=preset ...] [key=value ...]` (from a clone: `python scripts/train.py ...`).

Examples:
    retinanet-train                                  # embedded shapes dataset, CPU preset
    retinanet-train trainer.epochs=3 optim.lr=0.005
    retinanet-train experiment=coco data.root=/datasets/coco  # the paper's setup (configs/experiment/coco.yaml)
    retinanet-train loss=focal trainer=default       # the paper's loss values, the plain loop
    retinanet-train -m loss.gamma=0,1,2 loss.alpha=0.25,0.5   # sweep (Hydra multirun)
    torchrun --nproc_per_node=4 -m retinanet.commands.train optim.reference_batch_size=16  # DDP (README: many GPUs)
"""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from retinanet import distributed
from retinanet.cli import run_or_exit
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
    runtime = HydraConfig.get().runtime
    out_dir = runtime.output_dir
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
        log.info("config groups: %s", describe_choices(runtime.choices))
    distributed.share_run_dir(out_dir)  # torchrun: every rank uses rank 0's
    return run_or_exit(run, cfg, out_dir)


def cli() -> None:
    """The ``retinanet-train`` command (and ``scripts/train.py``, ``python -m retinanet.commands.train``)."""
    distributed.adopt_rank0_run_dir(sys.argv)  # torchrun ranks > 0: wait for rank 0's run dir
    try:
        main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
