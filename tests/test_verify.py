"""Every image counts (issue 22, item 0): with data.on_error=raise every image of both splits is checked when the
dataset is built (data.verify: decode, header only, or not at all), a JPEG truncated by 20 bytes decodes to what
it holds with one counted warning, an undecodable file stops a run before its first step, and a failure in the
final evaluation keeps the trained weights and says how to evaluate them."""

import json
import logging

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from retinanet.data import CocoDetection, DatasetError, load_rgb
from retinanet.data.build import build_dataset
from retinanet.errors import ConfigError, EvaluationError
from retinanet.trainer import run

from conftest import compose_train, make_micro_shapes, micro_overrides


def jpeg_bytes(h=48, w=64, seed=0) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_jpeg_dataset(tmp_path, n=4, truncated=(), junk=(), size=(64, 48)):
    """n JPEGs i0.jpg ..; names in ``truncated`` lose their last 20 bytes, those in ``junk`` are not images."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    images = [{"id": i + 1, "file_name": f"i{i}.jpg", "width": size[0], "height": size[1]} for i in range(n)]
    for img in images:
        data = jpeg_bytes(size[1], size[0], img["id"])
        if img["file_name"] in truncated:
            data = data[:-20]
        if img["file_name"] in junk:
            data = b"\xff\xd8 not a JPEG at all" * 4
        (img_dir / img["file_name"]).write_bytes(data)
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 16]} for i in range(n)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann, img_dir


def test_a_jpeg_truncated_by_20_bytes_decodes_to_what_it_holds_with_one_counted_warning(tmp_path, caplog):
    ann, img_dir = make_jpeg_dataset(tmp_path, truncated={"i1.jpg", "i2.jpg"})
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(ann, img_dir, verify=True, progress=False)
        images = [ds[i]["image"] for i in range(len(ds))]  # the loads do not warn again
    assert all(im.shape == (48, 64, 3) for im in images)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 4 images of") and "i1.jpg, i2.jpg" in warnings[0]
    intact = load_rgb(img_dir / "i0.jpg")
    assert intact.std() > 10  # the test images are not flat: what the truncated ones hold is real content
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow's global switch is ours for one decode only


def test_a_truncated_jpeg_read_without_verification_warns_once_per_process(tmp_path, caplog):
    ann, img_dir = make_jpeg_dataset(tmp_path, truncated={"i3.jpg"})
    ds = CocoDetection(ann, img_dir)  # verify=False: found when loaded
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert ds[3]["image"].shape == (48, 64, 3)
    assert sum("i3.jpg is truncated" in r.getMessage() for r in caplog.records) == 1


def test_an_undecodable_image_stops_the_build_listing_the_files_and_how_to_go_on(tmp_path):
    ann, img_dir = make_jpeg_dataset(tmp_path, truncated={"i0.jpg"}, junk={"i2.jpg", "i3.jpg"})
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, img_dir, verify=True, progress=False)
    message = str(err.value)
    assert message.startswith(f"2 of 4 images of {ann}") and "i2.jpg: cannot be decoded" in message
    assert "i3.jpg" in message and "i0.jpg" not in message  # the truncated one is usable
    assert "data.on_error=skip" in message and "data.verify=false" in message
    CocoDetection(ann, img_dir, verify=False)  # no check: built (fails when loaded)
    CocoDetection(ann, img_dir, on_error="skip", verify=True)  # skip: skipped when loaded, not checked


def test_header_mode_finds_wrong_sizes_without_decoding(tmp_path):
    ann, img_dir = make_jpeg_dataset(tmp_path, junk={"i1.jpg"})
    Image.new("RGB", (30, 30)).save(img_dir / "i0.jpg")
    with pytest.raises(DatasetError, match=r"i0.jpg: is width=30, height=30 but the annotation file says "
                                           r"width=64, height=48.*i1.jpg: cannot be"):
        CocoDetection(ann, img_dir, verify="header", progress=False)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(img_dir / "i0.jpg")
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(img_dir / "i1.jpg", format="PNG")  # decoding goes by content: a PNG
    data = (img_dir / "i1.jpg").read_bytes()
    (img_dir / "i1.jpg").write_bytes(data[:len(data) // 2])  # a valid header, half the pixel data
    CocoDetection(ann, img_dir, verify="header", progress=False)  # the header is fine: cheap mode passes
    with pytest.raises(DatasetError, match="i1.jpg: cannot be decoded"):
        CocoDetection(ann, img_dir, verify=True, progress=False)
    with pytest.raises(ConfigError, match="data.verify='all' must be true"):
        CocoDetection(ann, img_dir, verify="all")


def test_both_splits_are_checked_by_build_dataset(tmp_path):
    ann, img_dir = make_jpeg_dataset(tmp_path, junk={"i1.jpg"})
    cfg = OmegaConf.create({"val_ann": str(ann), "val_images": str(img_dir), "min_size": 32, "max_size": 64,
                            "augment": {"hflip_prob": 0.5, "scale_range": [1.0, 1.0], "translate": 0.0,
                                        "color_jitter": 0.0, "min_visibility": 0.3}})  # no data.verify: checked
    with pytest.raises(DatasetError, match="i1.jpg"):
        build_dataset(cfg, "val", train=False, progress=False)


@pytest.fixture
def micro(tmp_path):
    return make_micro_shapes(tmp_path / "shapes")


def replace_with_jpeg(path, cut: int = 0, junk: bool = False) -> None:
    """``path`` (a PNG of the micro dataset) rewritten as a JPEG of the same pixels (the name stays: decoding goes
    by content), ``cut`` bytes cut from its end."""
    import io

    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="JPEG", quality=90)
    data = out.getvalue()
    path.write_bytes(b"\xff\xd8 junk" * 8 if junk else data[:len(data) - cut])


def test_a_truncated_val_jpeg_trains_and_evaluates(micro, tmp_path, caplog):
    replace_with_jpeg(micro / "val" / "000002.png", cut=20)
    with caplog.at_level(logging.WARNING):
        ap = run(compose_train(micro_overrides(micro, epochs=1)), tmp_path / "run")
    assert ap is not None and (tmp_path / "run" / "best.pt").is_file()
    assert sum("truncated JPEG" in r.getMessage() for r in caplog.records) == 1


def test_an_undecodable_val_image_stops_before_the_first_step(micro, tmp_path):
    replace_with_jpeg(micro / "val" / "000003.png", junk=True)
    with pytest.raises(DatasetError, match="000003.png: cannot be decoded"):
        run(compose_train(micro_overrides(micro, epochs=1)), tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()  # no training step ran


def test_a_failed_final_evaluation_keeps_the_weights_and_says_how_to_evaluate_them(micro, tmp_path):
    replace_with_jpeg(micro / "val" / "000001.png", junk=True)  # found only when loaded (data.verify=false), in a worker
    overrides = micro_overrides(micro, epochs=1) + ["data.verify=false", "trainer.num_workers=1"]
    with pytest.raises(EvaluationError) as err:
        run(compose_train(overrides), tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    assert last.is_file()
    assert "000001.png" in str(err.value) and f"retinanet-evaluate checkpoint={last}" in str(err.value)
    assert "\n" not in str(err.value)  # one line, not the worker's traceback
