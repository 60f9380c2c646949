"""The command-line entry points, installed as console commands (``[project.scripts]`` in pyproject.toml).

    retinanet-train     retinanet.commands.train:cli            Hydra: key=value overrides, -m sweeps
    retinanet-evaluate  retinanet.commands.evaluate:main        Hydra
    retinanet-infer     retinanet.commands.infer:main           Hydra
    retinanet-inspect   retinanet.commands.inspect_dataset:main Hydra
    retinanet-export    retinanet.commands.export:main          Hydra
    retinanet-convert   retinanet.commands.convert_to_coco:main argparse (--format voc|csv|yolo ...)

The Hydra commands load the config tree shipped in the package (``pkg://retinanet.configs``), so they work
from any folder; run dirs (``outputs/...``, ``multirun/...``) are relative to the current folder.
``scripts/<name>.py`` in a clone are thin wrappers around the same functions. Each module's ``run(cfg, out_dir)``
is the job itself, callable from Python with a composed config.
"""
