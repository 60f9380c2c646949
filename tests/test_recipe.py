"""recipe=auto (selected by experiment=own_data): the resize, anchors, learning rate and run length fitted to the
training set. Tiny boxes get small anchors, large boxes large ones, a pretrained backbone the fine-tuning rate,
a time limit a run that fills it; a value given on the command line is never changed."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from retinanet import recipe
from retinanet.config import validate_train_config
from retinanet.data import CocoDetection
from retinanet.data.statistics import box_statistics
from retinanet.errors import ConfigError
from retinanet.matcher import Matcher

from conftest import compose_train


def write_dataset(tmp_path, box_side: float, n: int = 12, size=(640, 480)) -> tuple:
    """``n`` blank images of ``size`` (w, h), each with three square boxes of ``box_side`` pixels."""
    img_dir = tmp_path / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.new("RGB", size).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
        for k in range(3):
            x = 20 + k * (box_side + 10) % max(1, size[0] - box_side - 20)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k % 2,
                         "bbox": [float(x), 30.0, float(box_side), float(box_side)]})
    ann = tmp_path / f"boxes_{box_side}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return ann, img_dir


def own_data(ann, img_dir, *extra) -> list[str]:
    return ["experiment=own_data", f"data.train_ann={ann}", f"data.train_images={img_dir}", f"data.val_ann={ann}",
            f"data.val_images={img_dir}", *extra]


def fitted(tmp_path, box_side, *extra, device="cpu"):
    ann, img_dir = write_dataset(tmp_path, box_side)
    cfg = compose_train(own_data(ann, img_dir, *extra))
    validate_train_config(cfg, allow_auto=True)
    choices = recipe.resolve(cfg, CocoDetection(ann, img_dir), torch.device(device))
    validate_train_config(cfg)  # every auto value replaced by a valid one
    return cfg, {c.key: c for c in choices}


def test_experiment_own_data_selects_the_recipe_and_recipe_none_keeps_the_presets():
    cfg = compose_train(own_data("a.json", "img"))
    assert cfg.recipe.name == "auto"
    assert set(recipe.auto_keys(cfg)) == {"data.min_size", "data.max_size", "model.anchors.scale", "optim.lr",
                                          "optim.weight_decay", "trainer.epochs"}
    plain = compose_train(["data=custom", *own_data("a.json", "img")[1:], "data.min_size=320", "data.max_size=320"])
    assert plain.recipe.name == "none"
    assert recipe.auto_keys(plain) == [] and plain.model.anchors.sizes == [16, 32, 64, 128, 256]
    assert recipe.auto_keys(compose_train()) == []  # the embedded demo: its own tuned values


def test_tiny_boxes_get_small_anchors_and_large_boxes_large_ones(tmp_path):
    small_cfg, small = fitted(tmp_path / "small", 12)
    large_cfg, large = fitted(tmp_path / "large", 300)
    small_sizes, large_sizes = (recipe.AnchorGenerator(**{k: v for k, v in c.model.anchors.items() if k != "_target_"}
                                                       ).sizes for c in (small_cfg, large_cfg))
    assert small_sizes[0] < 16 <= large_sizes[0]  # the preset (retinanet_r18_cpu): 16-256
    assert "of each class's boxes have an anchor at IoU >= 0.5" in small["model.anchors.scale"].reason
    # small boxes: as large as a CPU allows (12 px of 640 would need 853 px for 16 px) ...
    assert small_cfg.data.max_size == small_cfg.recipe.max_side_cpu == small_cfg.data.min_size
    # ... large ones can be shrunk to the minimum side
    assert large_cfg.data.max_size == small_cfg.recipe.min_side
    assert "data.max_size" in large and large["data.max_size"].value == large_cfg.data.max_size


def test_a_rare_class_counts_as_much_as_a_common_one_in_the_anchor_fit(monkeypatch):
    """COCO AP averages over classes, so does the anchor fit: 10 boxes of a rare class that only the half-size
    anchors cover outweigh 90 boxes of a common class that they cover half as well."""
    def fake_best_anchor_iou(dataset, anchors, *args, with_labels=False, **kwargs):
        small_anchors = anchors.sizes[0] < 20  # the candidate scale, read back from the generator
        common = np.r_[np.full(45, 0.9), np.full(45, 0.9 if not small_anchors else 0.2)]
        rare = np.full(10, 0.9 if small_anchors else 0.1)
        return np.r_[common, rare], np.r_[np.zeros(90, int), np.ones(10, int)]

    monkeypatch.setattr(recipe, "best_anchor_iou", fake_best_anchor_iou)
    anchors = OmegaConf.create({"_target_": "retinanet.anchors.AnchorGenerator", "sizes": [32, 64, 128, 256, 512]})
    scale, results, why = recipe.fit_anchor_scale(None, anchors, Matcher(0.5, 0.4), 256, 256, 32, 0.99, None)
    assert 32 * scale < 20, (scale, results)  # by box count (0.9 vs 0.55) the preset's scale would have won
    assert "class mean" in why and "worst class 100.0%" not in why


@pytest.mark.parametrize("box_side", [12, 24, 60, 300])
def test_the_fitted_anchors_cover_the_boxes(tmp_path, box_side):
    from retinanet.data.statistics import anchor_coverage
    from retinanet.matcher import Matcher

    cfg, _ = fitted(tmp_path, box_side)
    ann, img_dir = write_dataset(tmp_path, box_side)

    def coverage(scale, sizes) -> float:
        params = {k: v for k, v in cfg.model.anchors.items() if k not in ("_target_", "sizes", "scale")}
        gen = recipe.AnchorGenerator(sizes=sizes, scale=scale, **params)
        return anchor_coverage(CocoDetection(ann, img_dir), gen, Matcher(0.5, 0.4), cfg.data.min_size,
                               cfg.data.max_size, cfg.data.size_divisible, progress=False)["iou_at_fg"]

    fitted_coverage = coverage(cfg.model.anchors.scale, list(cfg.model.anchors.sizes))
    paper = coverage(1.0, [32, 64, 128, 256, 512])
    if box_side >= 24:
        assert fitted_coverage >= 0.99
    else:  # 12 px of 640 at a CPU's 512 px: 9.6 px boxes on a stride-8 grid can reach IoU 0.5 only where aligned
        assert fitted_coverage > paper + 0.3


def test_a_pretrained_backbone_gets_the_fine_tuning_optimiser(tmp_path):
    _, scratch = fitted(tmp_path / "a", 60)
    assert scratch["optim.lr"].value == 3e-3 and scratch["optim.weight_decay"].value == 0.05
    cfg, tuned = fitted(tmp_path / "b", 60, "model.net.weights=ResNet18_Weights.IMAGENET1K_V1")
    assert tuned["optim.lr"].value == pytest.approx(1e-4 * 8 / 16)  # AdamW 1e-4 per 16 images, batch 8
    assert tuned["optim.weight_decay"].value == 1e-4 and "fine-tuning" in tuned["optim.lr"].reason
    _, sgd = fitted(tmp_path / "c", 60, "optim=sgd", "model.init_from=detector.pt", "trainer.batch_size=4")
    assert sgd["optim.lr"].value == pytest.approx(0.01 * 4 / 16)  # the paper's 0.01 per 16 images


def test_the_run_length_fills_a_time_limit_or_follows_the_dataset_size(tmp_path):
    cfg, chosen = fitted(tmp_path / "a", 60, "trainer.time_limit=600")
    assert cfg.trainer.epochs is None and "as many steps as fit" in chosen["trainer.epochs"].reason
    cfg, _ = fitted(tmp_path / "b", 60, "trainer.time_limit=null")
    assert cfg.trainer.epochs == recipe.EPOCHS_RANGE[1]  # 12 images: the most epochs the rule gives


def test_explicit_values_always_win(tmp_path):
    cfg, chosen = fitted(tmp_path, 12, "data.min_size=200", "data.max_size=300", "model.anchors.sizes=[8,16,32,64,128]",
                         "model.anchors.scale=1", "optim.lr=0.0007", "trainer.epochs=3")
    assert (cfg.data.min_size, cfg.data.max_size, cfg.optim.lr, cfg.trainer.epochs) == (200, 300, 0.0007, 3)
    assert list(cfg.model.anchors.sizes) == [8, 16, 32, 64, 128] and cfg.model.anchors.scale == 1
    assert set(chosen) == {"optim.weight_decay"}
    assert dict(cfg.recipe.choices)["optim.weight_decay"]["value"] == 0.05  # recorded in the config (checkpoints)


def test_a_gpu_gets_a_larger_resize_cap(tmp_path):
    cpu_cfg, _ = fitted(tmp_path / "a", 8)  # 8 px boxes of 640: 16 px would need 1280
    gpu_cfg, _ = fitted(tmp_path / "b", 8, device="cuda")
    assert cpu_cfg.data.max_size == 512 and gpu_cfg.data.max_size == 640  # never enlarged beyond the images
    ann, img_dir = write_dataset(tmp_path / "big", 8, size=(2000, 1500))
    stats = box_statistics(CocoDetection(ann, img_dir))
    cap = compose_train(own_data(ann, img_dir)).recipe
    assert recipe.choose_side(stats, cap, torch.device("cpu"))[0] == cap.max_side_cpu
    assert recipe.choose_side(stats, cap, torch.device("cuda"))[0] == cap.max_side_gpu


def test_auto_without_the_recipe_is_a_clear_error(tmp_path):
    ann, img_dir = write_dataset(tmp_path, 60)
    cfg = compose_train(own_data(ann, img_dir, "recipe=none"))  # experiment=own_data's autos left without the recipe
    with pytest.raises(ConfigError, match="data.min_size=auto needs recipe=auto.*or use experiment=own_data"):
        recipe.resolve(cfg, CocoDetection(ann, img_dir), torch.device("cpu"))
    with pytest.raises(ConfigError, match="data.min_size=auto needs recipe=auto"):
        validate_train_config(cfg, allow_auto=True)  # before any work


def test_box_statistics_read_the_annotations(tmp_path):
    ann, img_dir = write_dataset(tmp_path, 50, n=4)
    stats = box_statistics(CocoDetection(ann, img_dir))
    assert stats["boxes"] == 12 and stats["image_longer_side"] == 640
    assert stats["box_side_p5"] == pytest.approx(50) and stats["relative_side_p5"] == pytest.approx(50 / 640)
    assert np.isfinite(stats["boxes_per_image"])


def test_a_resumed_run_keeps_its_resize_anchors_rate_and_length_on_another_device(tmp_path, caplog):
    """Fitted on a CPU (resize capped at max_side_cpu), resumed on a GPU (max_side_gpu): the checkpoint's choices
    are kept and the log says so; fitted afresh there they would differ. A value given on the command line wins."""
    ann, img_dir = write_dataset(tmp_path, 8)  # 8 px boxes of 640 px images: the CPU's cap 512 binds, the GPU's not
    first = compose_train(own_data(ann, img_dir))
    recipe.apply(first, torch.device("cpu"))
    resumed = {"path": "run/last.pt", "recipe": OmegaConf.to_container(first.recipe)}
    keys = ("data.min_size", "data.max_size", "model.anchors.scale", "optim.lr", "optim.weight_decay", "trainer.epochs")
    ran = {k: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(first, k)}))["v"] for k in keys}

    fresh = compose_train(own_data(ann, img_dir))
    recipe.apply(fresh, torch.device("cuda"))
    assert (fresh.data.max_size, first.data.max_size) == (640, 512)  # what a resume must not do
    assert fresh.model.anchors.scale != ran["model.anchors.scale"]

    again = compose_train(own_data(ann, img_dir))
    with caplog.at_level("INFO", logger="retinanet.recipe"):
        chosen = recipe.apply(again, torch.device("cuda"), resumed=resumed)
    for key in keys:
        value = OmegaConf.select(again, key)
        assert value == ran[key], key
    assert {c.key for c in chosen} == set(keys) and all("kept from the resumed run (run/last.pt)" in c.reason
                                                        for c in chosen)
    assert "data.max_size" in caplog.text and "kept from the resumed run (run/last.pt), fitted then: " in caplog.text
    assert dict(again.recipe.choices)["data.max_size"]["value"] == 512  # recorded again in the new checkpoints
    validate_train_config(again)

    told = compose_train(own_data(ann, img_dir, "data.min_size=384", "data.max_size=384"))  # the user asks
    recipe.apply(told, torch.device("cuda"), resumed=resumed)
    assert (told.data.min_size, told.data.max_size) == (384, 384)
    assert told.model.anchors.scale == ran["model.anchors.scale"]


def test_resume_through_the_trainer_keeps_the_checkpoints_choices(tmp_path):
    """trainer.prepare on a run dir whose last.pt was fitted on a CPU, now on a (fake) GPU device: config.yaml keeps
    the checkpoint's resize and anchors."""
    from retinanet import trainer

    ann, img_dir = write_dataset(tmp_path, 8)
    first = compose_train(own_data(ann, img_dir))
    recipe.apply(first, torch.device("cpu"))
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "config": OmegaConf.to_container(first, resolve=True)}, out / "last.pt")
    cfg = compose_train(own_data(ann, img_dir, "trainer.resume=auto"))
    resolved = trainer.prepare(cfg, out, torch.device("cuda"))
    assert resolved["data"]["max_size"] == first.data.max_size == 512
    assert resolved["model"]["anchors"]["scale"] == first.model.anchors.scale
    assert OmegaConf.load(out / "config.yaml").data.max_size == 512
    fresh = trainer.prepare(compose_train(own_data(ann, img_dir)), tmp_path / "other", torch.device("cuda"))
    assert fresh["data"]["max_size"] == 640  # without the checkpoint: the GPU's fit


@pytest.mark.parametrize("world_size, batch, accumulate", [(1, 8, 1), (2, 8, 1), (8, 2, 1), (2, 4, 3)])
def test_the_fine_tuning_rate_follows_the_global_batch(tmp_path, world_size, batch, accumulate):
    """Linear scaling in the images of one optimiser step over all processes: 8 GPUs x 2 images get AdamW's 1e-4."""
    ann, img_dir = write_dataset(tmp_path, 60)
    cfg = compose_train(own_data(ann, img_dir, "model.net.weights=ResNet18_Weights.IMAGENET1K_V1",
                                 f"trainer.batch_size={batch}", f"trainer.accumulate_grad_batches={accumulate}"))
    chosen = {c.key: c for c in recipe.resolve(cfg, CocoDetection(ann, img_dir), torch.device("cpu"),
                                               world_size=world_size)}
    total = world_size * batch * accumulate
    assert chosen["optim.lr"].value == pytest.approx(float(f"{1e-4 * total / 16:.3g}"))
    assert (f"linear in the global batch of {total}: {world_size} process(es) x {batch} x {accumulate} accumulated"
            in chosen["optim.lr"].reason)


# ---- issue 22: what the user set is kept, anchors fitted at the training resize, the preset's own anchors -------


def anchors_of(cfg) -> "recipe.AnchorGenerator":
    return recipe.AnchorGenerator(**{k: v for k, v in cfg.model.anchors.items() if k != "_target_"})


def test_a_given_max_size_alone_is_kept_and_sets_the_scale(tmp_path):
    from retinanet.data.transforms import resized_shape

    cfg, chosen = fitted(tmp_path, 60, "data.max_size=512")  # 640 x 480 images
    assert (cfg.data.min_size, cfg.data.max_size) == (512, 512) and "data.max_size" not in chosen
    assert resized_shape(480, 640, cfg.data.min_size, cfg.data.max_size) == (384, 512)  # not 256 x 341


def test_a_given_min_size_alone_is_kept_and_max_size_lets_it_reach_the_shorter_side(tmp_path):
    from retinanet.data.transforms import resized_shape

    cfg, chosen = fitted(tmp_path, 60, "data.min_size=480")
    assert cfg.data.min_size == 480 and "data.min_size" not in chosen
    assert cfg.data.max_size == 640 and "data.min_size 480" in chosen["data.max_size"].reason
    assert resized_shape(480, 640, cfg.data.min_size, cfg.data.max_size) == (480, 640)
    multi, _ = fitted(tmp_path / "m", 60, "data.min_size=[320,400]")  # multi-scale: its largest side reached
    assert multi.data.max_size == 534  # ceil(400 * 4 / 3)


def test_the_anchors_are_fitted_at_the_resize_training_uses(tmp_path, monkeypatch):
    seen = []
    fit = recipe.best_anchor_iou

    def spy(dataset, anchors, min_size, max_size, *args, **kwargs):
        seen.append((min_size, max_size))
        return fit(dataset, anchors, min_size, max_size, *args, **kwargs)

    monkeypatch.setattr(recipe, "best_anchor_iou", spy)
    fitted(tmp_path, 60, "data.min_size=800", "data.max_size=1333")  # COCO's: 800 x 1067 on 640 x 480 images
    assert set(seen) == {(800, 1333)}  # not (1333, 1333): 1000 x 1333, boxes 1.25x larger than in training


def test_the_side_is_not_rounded_down_since_the_collate_pads(tmp_path):
    ann, img_dir = write_dataset(tmp_path, 4, n=3, size=(500, 300))  # 4 px boxes: the full 500 px are needed
    stats = box_statistics(CocoDetection(ann, img_dir))
    side, why = recipe.choose_side(stats, compose_train(own_data(ann, img_dir)).recipe, torch.device("cpu"))
    assert side == 500 and "the images' own size" in why  # the old // 32 * 32 gave 480: boxes 4% smaller


def test_the_fit_scales_the_presets_own_anchors_sizes_or_sizes_per_level(tmp_path):
    cfg, chosen = fitted(tmp_path / "r18", 60)  # retinanet_r18_cpu: 16-256, three octave scales
    assert list(cfg.model.anchors.sizes) == [16, 32, 64, 128, 256]  # the preset's own sizes stay as the base
    assert "with the preset's own 16-406.4" in chosen["model.anchors.scale"].reason
    tv, tv_chosen = fitted(tmp_path / "tv", 12, "model=torchvision_v1")  # sizes_per_level: (32, 40, 50) ...
    results = recipe.fit_anchor_scale(CocoDetection(*write_dataset(tmp_path / "tv", 12)), tv.model.anchors,
                                      Matcher(0.5, 0.4), tv.data.min_size, tv.data.max_size, 32, 0.99, None)[1]
    assert len(set(results.values())) > 1  # the scale changes the coverage: the fit is no no-op
    assert tv.model.anchors.scale < 1 and anchors_of(tv).sizes_per_level[0][0] < 32
    assert anchors_of(tv).sizes_per_level[0][1] / anchors_of(tv).sizes_per_level[0][0] == pytest.approx(40 / 32)
    assert "with the preset's own 32-812" in tv_chosen["model.anchors.scale"].reason


def test_a_trained_detector_keeps_its_anchors(tmp_path):
    trained = compose_train(["model.anchors.scale=0.7", "model.anchors.sizes=[20,40,80,160,320]"])
    ckpt = tmp_path / "detector.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": OmegaConf.to_container(trained, resolve=True)}, ckpt)
    cfg, chosen = fitted(tmp_path, 12, f"model.init_from={ckpt}")  # tiny boxes would get small anchors
    assert cfg.model.anchors.scale == 0.7 and list(cfg.model.anchors.sizes) == [20, 40, 80, 160, 320]
    assert "trained on these anchors" in chosen["model.anchors.scale"].reason
    tv, tv_chosen = fitted(tmp_path / "tv", 12, "model.init_from=RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    assert tv.model.anchors.scale == 1.0 and "the preset's own" in tv_chosen["model.anchors.scale"].reason
    plain, _ = fitted(tmp_path / "plain", 12)
    assert plain.model.anchors.scale < 1  # without a trained detector the same data gets smaller anchors


def test_sizes_auto_of_old_command_lines_names_the_new_key(tmp_path):
    ann, img_dir = write_dataset(tmp_path, 60)
    with pytest.raises(ConfigError, match="set model.anchors.scale=auto"):
        recipe.resolve(compose_train(own_data(ann, img_dir, "model.anchors.sizes=auto")), CocoDetection(ann, img_dir),
                       torch.device("cpu"))
