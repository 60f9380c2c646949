"""The ``logger`` config group: each backend's real library, offline, on a tiny run, read back through that
library's own reader (csv module, MlflowClient, W&B's record protobufs, TensorBoard's EventAccumulator)."""

import csv
import json
import math
import struct
import sys

import pytest
import torch

from retinanet.errors import ConfigError
from retinanet.evaluation import STAT_NAMES
from retinanet.trainer import run

from conftest import compose_train, make_micro_shapes, micro_overrides

TRAIN_TAGS = ("train/loss", "train/loss_cls", "train/loss_box", "train/lr", "train/num_pos_per_image",
              "train/grad_norm")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return make_micro_shapes(tmp_path_factory.mktemp("micro_loggers"))


def train(micro, out, *overrides):
    """A one-epoch run (4 steps, evaluated at its end) into ``out``; returns its metrics.json."""
    run(compose_train(micro_overrides(micro, epochs=1) + ["trainer.time_limit=null", *overrides]), out)
    return json.loads((out / "metrics.json").read_text())


def expected_final(summary: dict) -> dict:
    stats = summary["final"]["stats"]
    return {**{k: stats[k] for k in STAT_NAMES if stats[k] is not None}, "val_loss": summary["final"]["loss"]["loss"]}


def test_csv_logger_writes_step_evaluation_and_final_rows(micro, tmp_path):
    out = tmp_path / "run"
    summary = train(micro, out, "logger=csv")
    assert not (out / "tensorboard").exists()  # logger=csv replaces the default
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4]  # log_every=1
    assert all(math.isfinite(float(r[t])) for r in train_rows for t in TRAIN_TAGS)
    assert all(r["epoch"] == "1" for r in train_rows)
    eval_rows = [r for r in rows if r["val/AP"]]
    assert len(eval_rows) == 1 and eval_rows[0]["step"] == "4" and not eval_rows[0]["train/loss"]
    val = summary["history"][-1]["val"]
    assert float(eval_rows[0]["val/AP"]) == pytest.approx(val["stats"]["AP"])
    assert float(eval_rows[0]["val/loss"]) == pytest.approx(val["loss"]["loss"])
    final = rows[-1]
    for name, value in expected_final(summary).items():
        assert float(final[f"final/{name}"]) == pytest.approx(value)
    # the mean of the logged step losses is the epoch's loss of metrics.json
    mean = sum(float(r["train/loss"]) for r in train_rows) / 4
    assert mean == pytest.approx(summary["history"][-1]["train"]["loss"], rel=1e-6)
    with (out / "hparams.csv").open(newline="") as f:
        hparams = dict(csv.reader(f))
    assert hparams["optim.lr"] == str(compose_train().optim.lr)
    assert (out / "plots" / "loss_lr.png").is_file()  # the curves are kept whatever the logger


def test_csv_logger_of_a_resumed_run_drops_the_rows_after_the_checkpoint_and_widens_its_header(tmp_path):
    from retinanet.report.loggers.csv_file import CsvLogger

    logger = CsvLogger(tmp_path)
    for step in range(1, 6):
        logger.log_scalars({"train/loss": 1.0 / step}, step)
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("6,17")  # a row cut short by a crash
    resumed = CsvLogger(tmp_path, resumed_step=3)
    resumed.log_scalars({"train/loss": 0.3, "val/AP": 0.5}, 4)
    with (tmp_path / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["val/AP"] for r in rows] == ["", "", "", "0.5"] and rows[2]["train/loss"] == str(1.0 / 3)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One sqlite store for several runs, as a team's would be (a new store costs seconds of migrations)."""
    return tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"


def mlflow_client(out, store):
    from mlflow.tracking import MlflowClient

    ids = json.loads((out / "loggers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == f"sqlite:///{store}"
    return MlflowClient(tracking_uri=ids["tracking_uri"]), ids["run_id"]


def check_mlflow_run(out, summary, store, experiment="shapes"):
    client, run_id = mlflow_client(out, store)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == out.name
    assert client.get_experiment(logged.info.experiment_id).name == experiment
    history = {tag: client.get_metric_history(run_id, tag) for tag in TRAIN_TAGS}
    assert all([m.step for m in history[tag]] == [1, 2, 3, 4] for tag in TRAIN_TAGS)
    mean = sum(m.value for m in history["train/loss"]) / 4
    assert mean == pytest.approx(summary["history"][-1]["train"]["loss"], rel=1e-6)
    ap = client.get_metric_history(run_id, "val/AP")
    assert [(m.step, m.value) for m in ap] == [(4, pytest.approx(summary["history"][-1]["val"]["stats"]["AP"]))]
    metrics = logged.data.metrics
    for name, value in expected_final(summary).items():
        assert metrics[f"final/{name}"] == pytest.approx(value)
    params = logged.data.params
    assert params["optim.lr"] == str(compose_train().optim.lr) and params["loss._target_"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"model_card.md", "model_card.json", "metrics.json", "plots/loss_lr.png", "plots/ap_history.png"} <= artifacts
    local = client.download_artifacts(run_id, "metrics.json", str(out / "download"))
    assert json.loads(open(local).read()) == summary
    assert (store.parent / "mlflow_artifacts").is_dir()  # beside the store, not in the working directory
    return history


def test_mlflow_logger_keeps_a_local_store_in_the_run_dir(micro, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (./mlruns)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    summary = train(micro, out, "logger=mlflow")
    check_mlflow_run(out, summary, out.resolve() / "mlflow.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_tensorboard_and_mlflow_at_once_get_the_same_scalars(micro, mlflow_store, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    summary = train(micro, out, "logger=[tensorboard,mlflow]", "logger.experiment=team",
                    f"logger.tracking_uri=sqlite:///{mlflow_store}")
    history = check_mlflow_run(out, summary, mlflow_store, experiment="team")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for tag in TRAIN_TAGS:
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)] == \
            [(m.step, m.value) for m in history[tag]]
    assert events.Scalars("hparam/AP")[-1].value == pytest.approx(summary["final"]["stats"]["AP"])
    assert "pictures/loss_lr" in events.Tags()["images"]


def test_mlflow_logger_continues_its_run_on_resume(tmp_path, mlflow_store):
    from retinanet.report.loggers.mlflow_run import MlflowLogger

    uri = f"sqlite:///{mlflow_store}"
    first = MlflowLogger(tmp_path, "e", uri, run_name="r")
    first.log_hparams({"a": 1})
    first.log_scalars({"train/loss": 1.0}, 1)
    first.close("KILLED")
    again = MlflowLogger(tmp_path, "e", uri, run_name="r", resumed_step=1)
    assert again.run_id == first.run_id
    again.log_hparams({"a": 1, "trainer.resume": "auto"})  # params already logged are not logged again
    again.log_scalars({"train/loss": 0.5}, 2)
    again.close()
    client, run_id = mlflow_client(tmp_path, mlflow_store)
    assert run_id == first.run_id and client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
    assert client.get_run(run_id).data.params == {"a": "1", "trainer.resume": "auto"}
    fresh = MlflowLogger(tmp_path, "e", uri)  # a fresh start in the same dir: a new run
    fresh.close()
    assert fresh.run_id != first.run_id


def test_a_resumed_run_continues_its_csv_rows_and_its_mlflow_run(micro, mlflow_store, tmp_path):
    out = tmp_path / "run"
    loggers = ["logger=[csv,mlflow]", f"logger.tracking_uri=sqlite:///{mlflow_store}", "logger.experiment=resumed"]
    train(micro, out, *loggers)
    client, first_id = mlflow_client(out, mlflow_store)
    summary = train(micro, out, *loggers, "trainer.epochs=2", "trainer.resume=auto")  # 4 more steps, same dir
    client, run_id = mlflow_client(out, mlflow_store)
    assert run_id == first_id and client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run_id, "val/AP")] == [4, 8]
    assert client.get_run(run_id).data.metrics["final/AP"] == pytest.approx(summary["final"]["stats"]["AP"])
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(1, 9))
    assert [int(r["step"]) for r in rows if r["final/AP"]] == [4, 8]  # each finished leg's final row


def test_mlflow_logger_follows_mlflow_tracking_uri_when_none_is_given(tmp_path, mlflow_store, monkeypatch):
    from retinanet.report.loggers.mlflow_run import MlflowLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_store}")
    logger = MlflowLogger(tmp_path, "env")
    logger.close()
    client, run_id = mlflow_client(tmp_path, mlflow_store)
    assert run_id == logger.run_id and not (tmp_path / "mlflow.db").exists()


def wandb_records(path):
    """The records of a ``.wandb`` file, as W&B's own protobuf ``Record``s. The file is W&B's transaction log:
    a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (checksum, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_logger_writes_a_run_wandb_can_read(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    summary = train(micro, out, "logger=wandb", "logger.mode=offline", "logger.project=p")
    wandb_id = json.loads((out / "loggers.json").read_text())["wandb"]["id"]
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb")
    history, summary_items, config, files, run_record = {}, {}, {}, set(), None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
        elif kind == "summary":
            summary_items.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                  for u in record.summary.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "files":
            files |= {f.path for f in record.files.files}
    assert run_record.project == "p" and run_record.display_name == out.name and run_record.run_id == wandb_id
    assert sorted(history) == [1, 2, 3, 4]
    mean = sum(history[s]["train/loss"] for s in (1, 2, 3, 4)) / 4
    assert mean == pytest.approx(summary["history"][-1]["train"]["loss"], rel=1e-6)
    assert all(math.isfinite(history[s][t]) for s in history for t in TRAIN_TAGS)
    assert history[4]["val/AP"] == pytest.approx(summary["history"][-1]["val"]["stats"]["AP"])
    assert history[4]["pictures/loss_lr/_type"] == "image-file"
    for name, value in expected_final(summary).items():
        assert summary_items[f"final/{name}"] == pytest.approx(value)
    assert config["optim.lr"] == compose_train().optim.lr
    assert {"model_card.md", "model_card.json", "metrics.json"} <= files
    assert (run_file.parent / "files" / "model_card.md").read_text() == (out / "model_card.md").read_text()


def test_no_logger_still_draws_the_loss_curve(micro, tmp_path):
    out = tmp_path / "run"
    train(micro, out, "logger=[]", "trainer.log_every=2")
    assert not (out / "tensorboard").exists() and not (out / "metrics.csv").exists()
    assert (out / "plots" / "loss_lr.png").is_file()
    curves = torch.load(out / "last.pt", weights_only=False)["curves"]
    assert curves["loss"][:, 0].tolist() == [2, 4]  # every trainer.log_every steps


def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    from retinanet.report.loggers.group import open_backend

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    cfg = compose_train(["logger=mlflow"])
    with pytest.raises(ConfigError, match=r"^logger=mlflow needs the mlflow package .*pip install 'retinanet\[mlflow\]'"):
        open_backend("mlflow", cfg.logger, tmp_path, 0)


@pytest.mark.parametrize(("overrides", "message"), [
    (["logger=wandb", "logger.mode=sometimes"], r"logger\.mode='sometimes' is not one of"),
    (["logger=csv", "+logger.colour=red"], r"logger\.colour is not a setting of logger"),
    (["logger=csv", "logger.csv=yes"], r"logger\.csv='yes' must be true or false"),
])
def test_bad_logger_settings_are_refused_by_name(micro, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(micro, tmp_path / "run", *overrides)


def test_only_rank_0_opens_loggers(tmp_path, monkeypatch):
    from retinanet import distributed
    from retinanet.report.loggers.group import open_loggers

    cfg = compose_train(["logger=[tensorboard,csv]"])
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(rank=1, local_rank=1, world_size=2))
    other = open_loggers(cfg, tmp_path, {})
    other.log_scalars({"train/loss": 1.0}, 1)
    other.close()
    assert other.loggers == [] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo())
    curves = {}
    main = open_loggers(cfg, tmp_path, curves)
    main.log_scalars({"train/loss": 1.0}, 1)
    main.close()
    assert main.names == ["curves", "tensorboard", "csv"] and curves == {"loss": [[1, 1.0]]}
    assert (tmp_path / "metrics.csv").is_file() and list((tmp_path / "tensorboard").iterdir())
