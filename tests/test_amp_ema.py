"""Mixed precision (bf16 autocast on CPU, fp16 with GradScaler: the CUDA recipe's code path, run here on CPU)
with the loss in fp32, and the EMA of the weights: its formula, its evaluation and its checkpoint."""

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from retinanet.checkpoint import TrainState, load_checkpoint
from retinanet.data.build import build_dataset, build_loader
from retinanet.ema import ModelEma
from retinanet.engine import TrainStep, train_one_epoch
from retinanet.errors import ConfigError
from retinanet.runtime import precision_setup
from retinanet.trainer import run

from conftest import compose_train, make_micro_shapes, micro_overrides


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return make_micro_shapes(tmp_path_factory.mktemp("micro") / "shapes")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer runs here (trainer.threads=1): 2 threads on 2 busy cores crawl
    yield
    torch.set_num_threads(threads)


class RecordingLoss(torch.nn.Module):
    """Wraps the criterion and records the dtypes it sees and returns."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion, self.seen = criterion, []
        self.normalization = criterion.normalization

    def forward(self, cls_logits, box_deltas, *rest, **kwargs):
        out = self.criterion(cls_logits, box_deltas, *rest, **kwargs)
        self.seen.append((cls_logits.dtype, box_deltas.dtype, out["loss"].dtype))
        return out


SMALL = ["data.min_size=32", "data.max_size=32"]  # bf16 / fp16 convolutions are slow on CPUs without AMX


def epoch_pieces(micro: Path, autocast_dtype, scaler):
    cfg = compose_train(micro_overrides(micro) + SMALL)
    dataset = build_dataset(cfg.data, "train", train=True)
    anchors = instantiate(cfg.model.anchors)
    torch.manual_seed(0)
    model = instantiate(cfg.model.net, num_classes=6, num_anchors=anchors.num_anchors_per_location)
    model.to(memory_format=torch.channels_last)  # as the trainer does (trainer.channels_last): much faster here
    head_dtypes = []
    model.cls_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    loader = build_loader(dataset, 4, True, 0, 32, seed=0, pin_memory=False)
    loader.batch_sampler.set_epoch(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    states = []  # the weights before step 1, after step 1, ...

    def record(step: int) -> float:  # the schedule's factor: asked at the start and after every step, skipped or not
        states.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, record)
    criterion = RecordingLoss(instantiate(cfg.loss, num_classes=6))
    train_step = TrainStep(model, criterion, anchors, optimizer, scheduler, torch.device("cpu"),
                           autocast_dtype=autocast_dtype, scaler=scaler, channels_last=True)
    return model, (train_step, loader), head_dtypes, states


def epoch(train_step, loader) -> tuple[TrainState, dict]:
    """One epoch from a new training state: the state after it and the epoch's metrics."""
    state = TrainState()
    return state, train_one_epoch(train_step, loader, state, show_progress=False).metrics


def test_bf16_autocast_on_cpu_runs_the_model_in_bf16_and_the_loss_in_fp32(micro, one_thread):
    model, pieces, head_dtypes, states = epoch_pieces(micro, torch.bfloat16, None)
    state, metrics = epoch(*pieces)
    assert state.step == 4 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert set(head_dtypes) == {torch.bfloat16}  # convolutions under autocast
    assert set(pieces[0].criterion.seen) == {(torch.float32, torch.float32, torch.float32)}  # the loss is fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights, updated
    assert not all(torch.equal(states[0][k], states[-1][k]) for k in states[0])


def test_fp16_with_grad_scaler_skips_overflowing_steps_without_counting_them_bad(micro, one_thread):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    model, pieces, head_dtypes, states = epoch_pieces(micro, torch.float16, scaler)
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    weight = next(p for p in model.box_head.parameters())
    weight.register_hook(lambda g: g * float("inf") if calls[0] == 2 else g)  # an fp16 overflow at step 2
    state, _ = epoch(*pieces)
    assert set(head_dtypes) == {torch.float16} and state.step == 4
    assert set(pieces[0].criterion.seen) == {(torch.float32, torch.float32, torch.float32)}
    assert all(torch.equal(states[2][k], states[1][k]) for k in states[1])  # the scaler skipped step 2 ...
    assert scaler.get_scale() == 2.0**13  # ... and halved the scale
    assert state.bad_steps == 0  # normal AMP behaviour, not a bad step
    assert not all(torch.equal(states[4][k], states[3][k]) for k in states[3])


def test_the_ema_is_not_updated_by_a_step_the_grad_scaler_skipped(micro, one_thread):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    model, pieces, _, _ = epoch_pieces(micro, torch.float16, scaler)
    pieces[0].ema = ema = ModelEma(model, 0.5)
    calls, averages = [0], []
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    weight = next(p for p in model.box_head.parameters())
    weight.register_hook(lambda g: g * float("inf") if calls[0] == 2 else g)  # an fp16 overflow at step 2
    ema_weight = next(p for p in ema.module.box_head.parameters())
    model.register_forward_pre_hook(lambda module, args: averages.append(ema_weight.detach().clone()))
    state, _ = epoch(*pieces)
    assert state.step == 4 and scaler.get_scale() == 2.0**13  # step 2 skipped by the scaler
    assert ema.updates == 3  # steps 1, 3 and 4
    assert torch.equal(averages[2], averages[1])  # the average before step 3 is the one after step 1


def test_precision_settings(caplog):
    with caplog.at_level(logging.INFO):
        assert precision_setup("bf16-mixed", torch.device("cpu")) == (torch.bfloat16, None)
    assert "trainer.precision=bf16-mixed on CPU: bf16 autocast" in caplog.text
    assert precision_setup("32", torch.device("cpu")) == (None, None)
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed needs CUDA; on CPU use bf16-mixed"):
        precision_setup("16-mixed", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(native, monkeypatch, caplog):
    from retinanet import runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    with caplog.at_level(logging.INFO):
        got = precision_setup("auto", torch.device("cpu"))
    assert got == ((torch.bfloat16, None) if native else (None, None))
    assert ("bf16-mixed (this cpu computes bf16 natively)" if native else "32 (no native bf16 on this cpu") in caplog.text


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    from retinanet.runtime import native_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16(torch.device("cpu"))
    assert not native_bf16(torch.device("meta"))


def test_ema_follows_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # batch-norm statistics move too (averaged as well)
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        ema.update(model)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
    assert ema.module.state_dict()["1.num_batches_tracked"] == 30  # integer buffers are copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="trainer.ema.decay=1.0 must be in"):
        ModelEma(model, 1.0)


@pytest.mark.slow
def test_trainer_with_bf16_and_ema_evaluates_and_checkpoints_both(micro, tmp_path):
    ap = run(compose_train(micro_overrides(micro, epochs=1) + SMALL + ["trainer.precision=bf16-mixed",
                                                                       "trainer.ema.decay=0.5"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    entry = metrics["history"][-1]
    assert {"val", "val_ema"} <= set(entry) and metrics["final_ema"] == entry["val_ema"]
    assert ap == entry["val_ema"]["stats"]["AP"]  # the run is judged by its EMA weights
    assert entry["val"]["loss"] != entry["val_ema"]["loss"]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["ema"]["updates"] == 4 and ckpt["ema"]["decay"] == 0.5
    assert any(not torch.equal(ckpt["ema"]["model"][k], v) for k, v in ckpt["model"].items())
    assert ckpt["config"]["trainer"]["precision"] == "bf16-mixed"
