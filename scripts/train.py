"""Train a RetinaNet: `python scripts/train.py ...` from a clone;
installed, the same command is `retinanet-train`.

A thin wrapper around retinanet/commands/train.py (the documentation, examples and the job itself live there).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.commands.train import cli, main  # noqa: E402,F401

if __name__ == "__main__":
    cli()
