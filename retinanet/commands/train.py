"""Train a RetinaNet: `retinanet-train [group=preset ...] [key=value ...]` (from a clone: `python scripts/train.py ...`).

Examples:
    retinanet-train                                  # embedded shapes dataset, CPU preset
    retinanet-train trainer.epochs=3 optim.lr=0.005
    retinanet-train data=coco data.root=/datasets/coco model=retinanet_r50 optim=sgd schedule=multistep
    retinanet-train -m loss.gamma=0,1,2 loss.alpha=0.25,0.5   # sweep (Hydra multirun)
    torchrun --nproc_per_node=4 -m retinanet.commands.train optim.reference_batch_size=16  # DDP (README: many GPUs)
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from retinanet import distributed
from retinanet.cli import run_or_exit
from retinanet.trainer import run


@hydra.main(version_base="1.3", config_path="pkg://retinanet.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
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
