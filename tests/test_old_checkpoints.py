"""Checkpoints of earlier runs still load: a ``last.pt`` in the layout written by commit 9bc0943, before
checkpoints, reports and deployment moved to modules of their own.

``tests/data/checkpoint_9bc0943.json`` is the skeleton of the ``last.pt`` of a tiny run of that commit (one epoch
on ``conftest.make_micro_shapes`` data, trainer.ema.decay=0.9, the r18 CPU preset at width 16): every entry as it
was written (the resolved config with its ``_target_`` paths, label map, history, sampler key, ...), each tensor as
its dtype and shape, the RNG states in full; the data folder reads ``<root>``. It was made with that commit on the
path by running ``retinanet.trainer.run`` and replacing every tensor of the loaded file by its description.

The test fills the skeleton with the weights of the model its own config describes (the ``_target_`` paths must
still resolve, the state-dict names and shapes must still be those of the file), writes it with ``torch.save``
and reads it as every reader of checkpoints does: ``Detector.from_checkpoint`` and ``evaluate``, the
``Checkpointer`` of ``trainer.resume``, ``model.init_from`` and ``read_state_dict``.
"""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retinanet.checkpoint import Checkpointer, read_state_dict
from retinanet.data.build import build_dataset, build_loader
from retinanet.detector import Detector
from retinanet.ema import ModelEma
from retinanet.evaluation import STAT_NAMES, evaluate
from retinanet.model.init import init_from

from conftest import make_micro_shapes

FIXTURE = Path(__file__).parent / "data" / "checkpoint_9bc0943.json"


def materialise(node, gen: torch.Generator):
    """The skeleton as a checkpoint: tensors back from their descriptions (stored values, else random normal floats
    and zero integers), the integer keys of dicts back to integers."""
    if isinstance(node, dict) and "tensor" in node and "shape" in node:
        dtype = getattr(torch, node["tensor"])
        if "values" in node:
            return torch.tensor(node["values"], dtype=dtype).reshape(node["shape"])
        if dtype.is_floating_point:
            return torch.randn(node["shape"], generator=gen, dtype=torch.float64).to(dtype)
        return torch.zeros(node["shape"], dtype=dtype)
    if isinstance(node, dict):
        ints = node.get("__int_keys__", False)
        return {(int(k) if ints else k): materialise(v, gen) for k, v in node.items() if k != "__int_keys__"}
    if isinstance(node, list):
        return [materialise(v, gen) for v in node]
    return node


def shapes(state: dict) -> dict:
    return {k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()}


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """``(path of the old-layout last.pt, its dict, the model its config built, the dataset root)``."""
    root = make_micro_shapes(tmp_path_factory.mktemp("old") / "shapes")  # the run's data, regenerated
    skeleton = json.loads(FIXTURE.read_text().replace("<root>", str(root)))
    ckpt = materialise(skeleton, torch.Generator().manual_seed(0))
    config = ckpt["config"]
    torch.manual_seed(0)
    anchors = instantiate(config["model"]["anchors"])
    model = instantiate({**config["model"]["net"], "weights": None}, num_classes=len(ckpt["label_map"]["class_names"]),
                        num_anchors=anchors.num_anchors_per_location)
    # the model the old config describes has exactly the tensors the old file holds
    assert shapes(model.state_dict()) == shapes(ckpt["model"]) == shapes(ckpt["ema"]["model"])
    ckpt["model"] = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt["ema"]["model"] = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in ckpt["model"].items()}
    path = tmp_path_factory.mktemp("old_run") / "last.pt"
    torch.save(ckpt, path)
    return path, ckpt, model, root


def test_the_fixture_is_the_old_layout():
    skeleton = json.loads(FIXTURE.read_text())
    assert set(skeleton) == {"model", "optimizer", "scheduler", "epoch", "step", "epoch_complete", "epoch_progress",
                             "sampler", "rng", "config", "label_map", "metrics", "history", "best_ap", "bad_steps",
                             "planned_steps", "curves", "provenance", "ema"}
    assert skeleton["provenance"]["git"]["commit"].startswith("9bc0943")
    targets = {node["_target_"] for node in (skeleton["config"]["model"]["net"], skeleton["config"]["model"]["anchors"],
                                             skeleton["config"]["loss"], skeleton["config"]["loss"]["matcher"],
                                             skeleton["config"]["optim"], skeleton["config"]["schedule"],
                                             skeleton["config"]["postprocess"])}
    assert targets == {"retinanet.model.RetinaNet", "retinanet.anchors.AnchorGenerator", "retinanet.losses.RetinaNetLoss",
                       "retinanet.matcher.Matcher", "retinanet.optim.adamw", "retinanet.optim.cosine",
                       "retinanet.postprocess.PostProcessor"}


def test_every_target_of_the_old_config_resolves(old):
    _, ckpt, model, _ = old
    config = ckpt["config"]
    criterion = instantiate(config["loss"], num_classes=6, class_counts=torch.ones(6))
    optimizer = instantiate(config["optim"], model=model, global_batch=4)
    scheduler = instantiate(config["schedule"], optimizer=optimizer, total_steps=4)
    postprocess = instantiate(config["postprocess"])
    assert type(criterion).__name__ == "RetinaNetLoss" and type(postprocess).__name__ == "PostProcessor"
    assert len(optimizer.param_groups) == len(ckpt["optimizer"]["param_groups"]) and scheduler is not None


def test_detector_and_evaluate_run_the_old_checkpoint(old):
    path, ckpt, _, _ = old
    detector = Detector.from_checkpoint(path, "cpu")
    assert detector.class_names == ckpt["label_map"]["class_names"]
    assert detector.category_ids == ckpt["label_map"]["category_ids"]
    weights = detector.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in ckpt["ema"]["model"].items())  # the weights that scored: EMA
    data = OmegaConf.create(ckpt["config"]["data"])
    val = build_dataset(data, "val", train=False, resize=(detector.min_size, detector.max_size))
    result = evaluate(detector, build_loader(val, 8, False, 0, detector.size_divisible, 0, False), val, progress=False)
    assert set(result.metrics["stats"]) == set(STAT_NAMES) and result.metrics["images"] == 5


def test_resume_loads_the_old_training_state(old, tmp_path):
    path, ckpt, _, _ = old
    config = ckpt["config"]
    anchors = instantiate(config["model"]["anchors"])
    model = instantiate({**config["model"]["net"], "weights": None}, num_classes=6,
                        num_anchors=anchors.num_anchors_per_location)
    optimizer = instantiate(config["optim"], model=model, global_batch=4)
    scheduler = instantiate(config["schedule"], optimizer=optimizer, total_steps=4)
    ema = ModelEma(model, config["trainer"]["ema"]["decay"])
    checkpointer = Checkpointer(tmp_path, model, optimizer, scheduler, None, ema, dict(ckpt["sampler"]), config,
                                ckpt["label_map"])
    state = checkpointer.load(path)
    assert (state.epoch, state.step, state.planned_steps) == (2, 4, None)  # epoch 1 was complete: continue with 2
    assert state.history == ckpt["history"] and state.best_ap == ckpt["best_ap"]
    assert {k: len(v) for k, v in state.curves.items()} == {"loss": 4, "loss_cls": 4, "loss_box": 4, "lr": 4}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in ckpt["ema"]["model"].items())
    assert ema.updates == 4 and scheduler.last_epoch == 4
    assert optimizer.state_dict()["state"][0]["step"].item() == ckpt["optimizer"]["state"][0]["step"].item()
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])  # the RNG states are restored


def test_init_from_and_read_state_dict_take_the_old_checkpoint(old):
    path, ckpt, model, _ = old
    state = read_state_dict(path)
    assert all(torch.equal(state[k], v) for k, v in ckpt["ema"]["model"].items())
    report = init_from(model, str(path))
    assert report.kind == "ours" and report.skipped == {} and len(report.loaded) == len(ckpt["model"])
