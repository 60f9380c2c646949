"""A loss that cannot silently explode: a non-finite loss or gradient stops training with a message naming the
step, the loss terms and the image ids (the batch saved for inspection), or, with trainer.max_bad_steps=K, is
skipped (weights, optimiser and batch-norm statistics untouched) up to K times, counted and logged."""

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from retinanet.checkpoint import TrainState
from retinanet.data.build import build_dataset, build_loader
from retinanet.engine import EpochEnd, NonFiniteLossError, TrainStep, train_one_epoch
from retinanet.errors import UserError

from conftest import compose_train, make_micro_shapes, micro_overrides


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro_shapes(tmp_path_factory.mktemp("micro") / "shapes")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer runs here (trainer.threads=1): 2 threads on 2 busy cores crawl
    yield
    torch.set_num_threads(threads)


def setup(micro: Path, tmp_path: Path, max_bad_steps: int = 0):
    """The pieces of one training epoch (4 steps of 4 images, batch-norm model) and a per-step state log."""
    cfg = compose_train(micro_overrides(micro))
    dataset = build_dataset(cfg.data, "train", train=True)
    anchors = instantiate(cfg.model.anchors)
    torch.manual_seed(0)
    model = instantiate(cfg.model.net, num_classes=6, num_anchors=anchors.num_anchors_per_location)
    loader = build_loader(dataset, 4, True, 0, 32, seed=0, pin_memory=False)
    loader.batch_sampler.set_epoch(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    states = []  # before step 1, after step 1, ...

    def record(step: int) -> float:  # the schedule's factor: asked at the start and after every step, skipped or not
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, record)
    train_step = TrainStep(model, instantiate(cfg.loss, num_classes=6), anchors, optimizer, scheduler,
                           torch.device("cpu"), max_bad_steps=max_bad_steps, bad_batch_dir=tmp_path)
    batch_ids = [[int(dataset.image_ids[i]) for i in b] for b in loader.batch_sampler.epoch_batches()]
    return model, (train_step, loader), states, batch_ids


def epoch(train_step, loader) -> tuple[TrainState, dict]:
    """One epoch from a new training state: the state after it and the epoch's metrics."""
    state = TrainState()
    result = train_one_epoch(train_step, loader, state, show_progress=False)
    assert result.end is EpochEnd.COMPLETE
    return state, result.metrics


def poison_forward(model, bad_calls: set[int]) -> None:
    """NaN class logits on the given forward calls (1-based)."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        return output * float("nan") if calls[0] in bad_calls else output

    model.cls_head.register_forward_hook(hook)


def poison_gradients(model, bad_calls: set[int]) -> None:
    """Infinite gradients (finite loss) in the backward passes of the given forward calls (1-based)."""
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    weight = next(p for p in model.box_head.parameters())
    weight.register_hook(lambda g: g * float("inf") if calls[0] in bad_calls else g)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_stops_naming_step_terms_and_images_and_saves_the_batch(micro, tmp_path):
    model, pieces, states, batch_ids = setup(micro, tmp_path)
    poison_forward(model, {2})
    with pytest.raises(NonFiniteLossError) as err:
        epoch(*pieces)
    message = str(err.value)
    assert "non-finite loss at step 2 (epoch 1)" in message
    assert "loss=nan, loss_cls=nan" in message and "loss_box=" in message
    assert f"image ids in the batch: {batch_ids[1]}" in message
    saved_path = tmp_path / "nonfinite_step0000002.pt"
    assert str(saved_path) in message and "trainer.max_bad_steps" in message
    assert isinstance(err.value, UserError)  # scripts/train.py prints the message, no traceback
    saved = torch.load(saved_path, weights_only=True)
    assert saved["step"] == 2 and saved["batches"][0]["image_ids"].tolist() == batch_ids[1]
    assert saved["batches"][0]["images"].shape[:2] == (4, 3) and saved["batches"][0]["images"].dtype == torch.uint8
    assert len(states) == 2 and not same(states[0], states[1])  # step 1 trained ...
    weights = {k: v.detach() for k, v in model.named_parameters()}
    assert same(weights, {k: states[1][k] for k in weights})  # ... the bad step did not update the weights


def test_max_bad_steps_skips_counts_and_logs_then_stops(micro, tmp_path, caplog):
    model, pieces, states, batch_ids = setup(micro, tmp_path, max_bad_steps=2)
    poison_gradients(model, {2, 3})
    with caplog.at_level(logging.WARNING):
        state, metrics = epoch(*pieces)
    assert state.step == 4 and state.bad_steps == 2
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert "non-finite gradients at step 2 (epoch 1)" in caplog.text and str(batch_ids[1]) in caplog.text
    assert "Skipped that step (1 of trainer.max_bad_steps=2)" in caplog.text
    assert "Skipped that step (2 of trainer.max_bad_steps=2)" in caplog.text
    # skipped steps leave weights and batch-norm statistics as they were; the good ones train
    assert not same(states[1], states[0]) and same(states[2], states[1]) and same(states[3], states[1])
    assert not same(states[4], states[3])
    assert any("running_mean" in k for k in states[1])
    assert not list(tmp_path.glob("nonfinite_*.pt"))  # skipped steps save nothing

    model, pieces, states, batch_ids = setup(micro, tmp_path, max_bad_steps=1)
    poison_gradients(model, {2, 3})
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients at step 3 .*\(now 1\)"):
        epoch(*pieces)
    assert torch.load(tmp_path / "nonfinite_step0000003.pt", weights_only=True)["batches"][0]["image_ids"].tolist() \
        == batch_ids[2]


def test_max_bad_steps_is_validated(micro):
    from retinanet.config import validate_train_config
    from retinanet.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.max_bad_steps=-1 must be >= 0"):
        validate_train_config(compose_train(micro_overrides(micro) + ["trainer.max_bad_steps=-1"]))
