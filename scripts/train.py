"""Train a RetinaNet: `python scripts/train.py [group=preset ...] [key=value ...]`.

Examples:
    python scripts/train.py                                  # embedded shapes dataset, CPU preset
    python scripts/train.py trainer.epochs=3 optim.lr=0.005
    python scripts/train.py data=coco data.root=/datasets/coco model=retinanet_r50 optim=sgd schedule=multistep
    python scripts/train.py -m loss.gamma=0,1,2 loss.alpha=0.25,0.5   # sweep (Hydra multirun)
    torchrun --nproc_per_node=4 scripts/train.py optim.reference_batch_size=16  # DDP (README: many GPUs)
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet import distributed  # noqa: E402
from retinanet.cli import run_or_exit  # noqa: E402
from retinanet.trainer import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    out_dir = HydraConfig.get().runtime.output_dir
    distributed.share_run_dir(out_dir)  # torchrun: every rank uses rank 0's
    return run_or_exit(run, cfg, out_dir)


if __name__ == "__main__":
    distributed.adopt_rank0_run_dir(sys.argv)  # torchrun ranks > 0: wait for rank 0's run dir
    try:
        main()
    finally:
        distributed.shutdown()
