"""The Hydra config tree (train.yaml, evaluate.yaml, ... and the groups), shipped inside the package.

The commands load it as ``pkg://retinanet.configs``; ``retinanet.config.CONFIGS`` is its folder. A clone
also has ``configs/``, a symlink to this folder.
"""
