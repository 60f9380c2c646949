"""COCO evaluation of a checkpoint: `python scripts/evaluate.py ...` from a clone;
installed, the same command is `retinanet-evaluate`.

A thin wrapper around retinanet/commands/evaluate.py (the documentation, examples and the job itself live there).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.commands.evaluate import main, run  # noqa: E402,F401

if __name__ == "__main__":
    main()
