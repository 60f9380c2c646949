"""``make bench`` harness at tiny sizes: table and JSON structure, and that ours and torchvision agree on
the benchmarked inputs. No timing assertions (timings belong to the benchmark itself)."""

import json

import pytest
import torch

from benchmarks import loss, postprocess
from benchmarks.memory import measure_here
from benchmarks.report import COLUMNS
from benchmarks.runner import SIZES
from retinanet.runtime import native_bf16


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a shared machine would make two threads wait on each other
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_bench_writes_table_and_json_and_both_sides_agree(tmp_path, tiny_shapes, one_thread, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).parents[1] / "benchmarks" / "bench.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bench.json"
    report = script.main(["--size", "tiny", "--no-memory", "--out", str(out), "--data-root", str(tiny_shapes)])

    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    printed = capsys.readouterr().out
    assert "| item | what | ours | torchvision | ratio | target | met |" in printed
    items = [r["item"] for r in saved["rows"]]
    assert sorted(set(items)) == ["1", "2", "3", "4", "5", "6", "7"]
    for r in saved["rows"]:
        assert tuple(r) == COLUMNS
        assert isinstance(r["ratio"], float) and (r["ratio"] > 0 or r["item"] == "7")  # a share may round to 0
        assert (r["met"] is None) == (r["target"] == "-")
    targets = {r["what"]: r["target"] for r in saved["rows"]}
    assert targets["matching + focal + box loss, fwd+bwd: time"] == "<= 0.3x"
    assert targets["decode + top-k + NMS: time"] == "<= 0.5x"

    res = saved["results"]
    agree = res["loss"]["agreement"]
    for key in ("loss_cls_rel_diff", "loss_box_rel_diff", "grad_cls_rel_diff", "grad_box_rel_diff"):
        assert agree[key] < 1e-5, (key, agree)
    agree = res["postprocess"]["agreement"]
    assert agree["same_counts"] and agree["labels_equal"] and agree["max_score_diff"] < 1e-6
    assert agree["max_box_diff_px"] < 1e-3 and agree["candidates_above_thresh"] > 0.5
    for key in ("train_r50", "train_r18", "inference_r50", "inference_r18"):
        assert res[key]["agreement"]["same"], res[key]["agreement"]  # same parameter counts
        assert set(res[key]["times"]) >= {"ours", "torchvision"}
    for key in ("inference_r50", "inference_r18"):
        assert res[key]["agreement"]["cls_logits_rel_diff"] < 1e-4  # same weights, same logits
    assert res["train_r18"]["agreement"]["loss_ours_finite"] and res["train_r18"]["agreement"]["loss_torchvision_finite"]
    # item 3, the demo's own step: fp32, and bf16 where the CPU computes it natively; both layouts
    demo = res["train_demo"]
    assert demo["agreement"]["same"] and demo["agreement"]["all_losses_finite"]
    assert demo["precisions"] == ["fp32"] + (["bf16"] if native_bf16(torch.device("cpu")) else [])
    demo_rows = [r["what"] for r in saved["rows"] if "train step of make train" in r["what"]]
    assert len(demo_rows) == 2 * len(demo["precisions"])
    for p in demo["precisions"]:
        assert sum(f" {p} NCHW" in w for w in demo_rows) == 1 and sum(f" {p} channels_last" in w for w in demo_rows) == 1
    assert res["endtoend"]["detections_written"] > 0 and res["endtoend"]["images"] == SIZES["tiny"]["endtoend"]["images"]
    assert res["data"]["images"] == SIZES["tiny"]["data"]["batches"] * SIZES["tiny"]["data"]["batch_size"]
    assert res["flops"]["train_step_flops"] > 0 and res["flops"]["conv_peak_flop_s"] > 0

    # item 6: the 3x3 conv peak in fp32 and bf16 (both layouts), achieved FLOP/s of both train steps in both
    peak = res["conv_peak"]
    assert peak["native_bf16"] == native_bf16(torch.device("cpu"))
    for p in ("fp32", "bf16"):
        assert set(peak[p]["flop_s"]) == {"nchw", "channels_last"} and min(peak[p]["flop_s"].values()) > 0
        assert peak[p]["peak_flop_s"] == max(peak[p]["flop_s"].values())
    assert peak["bf16"]["emulated"] == (not peak["native_bf16"])
    bf16_rows = [r["what"] for r in saved["rows"] if r["item"] == "6" and " bf16" in r["what"]]
    assert len(bf16_rows) == 3 and all(("emulated" in w) == peak["bf16"]["emulated"] for w in bf16_rows)
    for key in ("train_r50", "train_r18"):
        a = res["achieved"][key]
        assert min(a["flops"].values()) > 0 and set(a["fraction"]) == {"fp32", "bf16"}
        assert 0 < a["fraction"]["fp32"] <= 1.5, a  # a train step cannot beat the large conv by much
        assert a["fraction"]["bf16"] > 0  # emulated bf16 kernels differ by shape: no upper bound at tiny sizes
    # item 7: the demo step split into the six families, ours and torchvision's, the convolutions found
    from benchmarks.flops import FAMILIES

    for side in ("ours", "torchvision"):
        sp = res["split"][side]
        assert set(sp["shares"]) == set(FAMILIES) and sum(sp["shares"].values()) == pytest.approx(1.0)
        assert sp["shares"]["convolutions"] > 0 and sp["shares"]["optimiser"] > 0 and sp["shares"]["loss"] > 0
        assert sp["shares"]["data loading"] > 0  # the loader of item 5, in the main process (tiny: no workers)
    assert len([r for r in saved["rows"] if r["item"] == "7"]) == len(FAMILIES)


def test_peak_memory_is_the_high_water_mark_above_the_baseline():
    size = 64 * 2**20

    def run():
        block = torch.ones(size // 4)  # 64 MiB, touched
        return float(block[-1])

    run()
    result = measure_here(run)
    assert set(result) == {"peak_mib", "baseline_mib"}
    assert 60 <= result["peak_mib"] <= 80  # the block (and a little interpreter noise), not the baseline


def test_loss_case_contenders_return_the_same_losses_and_gradients():
    state = loss.setup(**SIZES["tiny"]["loss"])
    run = loss.contenders(state)
    (ours, g_ours), (theirs, g_theirs) = run["ours"](), run["torchvision"]()
    torch.testing.assert_close(ours["cls"], theirs["cls"], rtol=1e-5, atol=0)
    torch.testing.assert_close(ours["box"], theirs["box"], rtol=1e-5, atol=0)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert state.cls.grad is None  # each run leaves the inputs as it found them
    assert postprocess.SETTINGS["detections_per_img"] == 100


def test_train_step_profile_groups_operators_and_finds_the_convolutions(one_thread):
    import importlib.util
    from pathlib import Path

    from benchmarks import train

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_train_step.py"
    spec = importlib.util.spec_from_file_location("profile_train_step", path)
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    assert prof.family("aten::mkldnn_convolution") == "convolution"
    assert prof.family("aten::convolution_backward") == "convolution"
    assert prof.family("aten::native_batch_norm") == "batch/group norm"
    assert prof.family("aten::_foreach_addcdiv_") == "optimizer (foreach)"  # the first matching family wins
    assert prof.family("aten::add_") == "elementwise"
    assert prof.family("aten::nonzero") == "other"
    state = train.setup(preset="retinanet_r18_cpu", batch=1, height=64, width=64, num_classes=3, optim="adamw",
                        nchw=False)
    totals, total = prof.profile_step(state.step_ours, steps=1)
    assert total == pytest.approx(sum(totals.values())) and total > 0
    assert totals["convolution"] > 0 and totals["elementwise"] > 0  # (on CPU, AdamW runs per-tensor ops)


def test_split_groups_by_scope_and_by_name(one_thread):
    """Item 7: the loss (forward and its backward), the optimiser, convolutions (their backward's copies too)."""
    from benchmarks import flops, train

    assert flops.family_of_name("aten::mkldnn_convolution") == "convolutions"
    assert flops.family_of_name("autograd::engine::evaluate_function: NativeBatchNormBackward0") == "normalisation"
    assert flops.family_of_name("aten::native_group_norm") == "normalisation"
    assert flops.family_of_name("aten::add_") == "other"
    state = train.setup(preset="retinanet_r18_cpu", batch=1, height=64, width=64, num_classes=3, optim="adamw",
                        nchw=False)
    out = flops.split(state.step_ours, steps=1)
    shares = out["shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["data loading"] == 0
    assert shares["convolutions"] > 0.2 and shares["loss"] > 0 and shares["optimiser"] > 0
    assert shares["other"] < 0.5  # the backward of the loss and of the convolutions is attributed, not left over


@pytest.mark.parametrize("head_depth,width", [(2, 32), (1, 64)])
def test_torchvision_pair_takes_the_presets_subnet_depth_and_backbone_width(head_depth, width):
    """The demo rows compare the preset as trained: torchvision's head cut to its depth, its ResNet as narrow."""
    from benchmarks.tv import to_float_list, torchvision_retinanet
    from retinanet.model import RetinaNet
    from retinanet.torchvision_weights import convert_torchvision_state_dict

    net = {"backbone": "resnet18", "backbone_width": width, "norm": "bn", "frozen_stages": 0, "fpn_channels": 64,
           "head_width": 64, "head_depth": head_depth, "head_norm": "gn"}
    torch.manual_seed(0)
    theirs = torchvision_retinanet(net, 3, (64, 96)).eval()
    ours = RetinaNet(num_classes=3, **net).eval()
    ours.load_state_dict(convert_torchvision_state_dict(theirs.state_dict(), strict=True))
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        batched, _ = theirs.transform(to_float_list(images))
        expected = theirs.head(list(theirs.backbone(batched.tensors).values()))["cls_logits"]
        torch.testing.assert_close(ours(images).cls_logits, expected, rtol=1e-4, atol=1e-5)
