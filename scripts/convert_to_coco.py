"""Convert annotations to COCO detection JSON: `python scripts/convert_to_coco.py ...` from a clone;
installed, the same command is `retinanet-convert`.

A thin wrapper around retinanet/commands/convert_to_coco.py (the documentation, examples and the job itself live there).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from retinanet.commands.convert_to_coco import convert, main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
