"""CocoDetection (label map, box cleaning, clear errors) and image decoding (modes, EXIF, bad files)."""

import json
import logging
import math

import numpy as np
import pytest
from PIL import Image

from retinanet.data import CocoDetection, DatasetError, ImageReadError, build_transforms, load_rgb

CATS = [{"id": 9, "name": "ring"}, {"id": 2, "name": "box"}, {"id": 5, "name": "star"}]


def write_dataset(tmp_path, images=None, annotations=None, categories=None, extra=None, make_files=True):
    """A COCO JSON in tmp_path/ann.json with images in tmp_path/img (default: two 40x30 images)."""
    images = images if images is not None else [
        {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 11, "file_name": "b.png", "width": 40, "height": 30},
    ]
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 10, "category_id": 5, "bbox": [10, 5, 20, 15], "iscrowd": 0, "area": 300},
        {"id": 2, "image_id": 10, "category_id": 2, "bbox": [0, 0, 4, 4], "iscrowd": 1, "area": 16},
    ]
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    if make_files:
        for img in images:
            Image.new("RGB", (img["width"], img["height"]), (50, 100, 150)).save(img_dir / img["file_name"])
    data = {"images": images, "annotations": annotations, "categories": categories or CATS, **(extra or {})}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def test_label_map_boxes_and_sample(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path))
    assert ds.label_to_cat_id == [2, 5, 9] and ds.class_names == ["box", "star", "ring"]
    assert ds.cat_id_to_label == {2: 0, 5: 1, 9: 2} and ds.num_classes == 3
    assert ds.image_ids == [10, 11] and len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (30, 40, 3) and s["image"].dtype == np.uint8
    assert (s["image"] == [50, 100, 150]).all()
    np.testing.assert_array_equal(s["boxes"], [[10, 5, 30, 20], [0, 0, 4, 4]])  # xywh -> xyxy
    assert s["boxes"].dtype == np.float32 and s["labels"].dtype == np.int64 and s["crowd"].dtype == bool
    assert s["labels"].tolist() == [1, 0] and s["crowd"].tolist() == [False, True]
    assert s["image_id"] == 10 and s["orig_size"] == (30, 40) and s["scale"] == (1.0, 1.0)
    empty = ds[1]  # images without annotations are kept
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["crowd"].shape == (0,)
    assert ds.class_counts().tolist() == [0, 1, 0]  # the crowd box is not counted
    assert ds.coco.getAnnIds(imgIds=[10]) == [1, 2] and ds.coco.loadCats([9])[0]["name"] == "ring"


def test_degenerate_boxes_dropped_and_clipped_with_one_warning(tmp_path, caplog):
    bad = [[1, 1, 0, 5], [1, 1, 5, -2], [math.nan, 1, 5, 5], [1, 1, math.inf, 5], [50, 40, 5, 5]]
    anns = [{"id": i + 1, "image_id": 10, "category_id": 2, "bbox": b} for i, b in enumerate(bad)]
    anns += [{"id": 100, "image_id": 10, "category_id": 9, "bbox": [-5, 20, 15, 30]},  # partly outside
             {"id": 101, "image_id": 11, "category_id": 5, "bbox": [2.5, 3.5, 4.25, 5.0]}]
    with caplog.at_level(logging.WARNING, logger="retinanet.data.coco"):
        ds = CocoDetection(*write_dataset(tmp_path, annotations=anns))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    for part in ("ann.json", "dropped 5 of 7", "2 non-finite", "2 zero or negative width/height",
                 "1 entirely outside the image", "clipped 1", "annotation id 1"):
        assert part in msg, (part, msg)
    np.testing.assert_array_equal(ds[0]["boxes"], [[0, 20, 10, 30]])  # clipped to the 40x30 image
    assert ds[0]["labels"].tolist() == [2]
    np.testing.assert_allclose(ds[1]["boxes"], [[2.5, 3.5, 6.75, 8.5]])
    assert ds.class_counts().tolist() == [0, 1, 1]
    assert sorted(ds.coco.getAnnIds()) == [100, 101]  # evaluation sees what was validated, as training does
    assert ds.coco.anns[100]["bbox"] == [0, 20, 10, 10]  # clipped like the training box


def test_no_warning_for_clean_data(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        CocoDetection(*write_dataset(tmp_path))
    assert not caplog.records


def test_missing_area_and_iscrowd_are_filled_for_evaluation(tmp_path):
    anns = [{"id": 1, "image_id": 10, "category_id": 5, "bbox": [1, 2, 3, 4]}]
    ds = CocoDetection(*write_dataset(tmp_path, annotations=anns))
    assert ds.coco.anns[1]["area"] == 12 and ds.coco.anns[1]["iscrowd"] == 0


def _mutate(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


BAD_INPUTS = [
    ("no top key", lambda d: d.pop("annotations"), ["missing top-level key", "annotations"]),
    ("not a list", lambda d: d.update(images={}), ["'images' must be a list"]),
    ("image field", lambda d: d["images"][1].pop("file_name"), ["images[1]", "id=11", "file_name"]),
    ("ann field", lambda d: d["annotations"][0].pop("bbox"), ["annotations[0]", "id=1", "bbox"]),
    ("dup image", lambda d: d["images"][1].update(id=10), ["images[0, 1] share the id 10"]),
    ("dup ann", lambda d: d["annotations"][1].update(id=1), ["annotations[1]", "duplicate id 1"]),
    ("unknown image", lambda d: d["annotations"][1].update(image_id=77),
     ["annotations[1]", "id=2", "'image_id'=77"]),
    ("unknown cat", lambda d: d["annotations"][0].update(category_id=3),
     ["annotations[0]", "'category_id'=3", "[2, 5, 9]"]),
    ("bbox type", lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), ["'bbox'=[1, 2, '3', 4]"]),
    ("bbox len", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), ["'bbox'=[1, 2, 3]", "4 numbers"]),
    ("width", lambda d: d["images"][0].update(width=0), ["images[0]", "'width'", "got 0"]),
    ("id type", lambda d: d["categories"][0].update(id="9"), ["categories[0]", "'id' must be an integer"]),
    ("iscrowd", lambda d: d["annotations"][0].update(iscrowd=2), ["'iscrowd'=2"]),
    ("escape", lambda d: d["images"][0].update(file_name="../a.png"), ["images[0]", "'../a.png'", "outside"]),
    ("absolute", lambda d: d["images"][0].update(file_name="/etc/passwd"), ["'/etc/passwd'", "outside"]),
    ("nested escape", lambda d: d["images"][0].update(file_name="x/../../a.png"), ["outside"]),
]


@pytest.mark.parametrize("name, mutate, parts", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_annotations_are_named(tmp_path, name, mutate, parts):
    ann, img_dir = write_dataset(tmp_path)
    _mutate(ann, mutate)
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann, img_dir)
    assert str(ann) in str(err.value)
    for part in parts:
        assert part in str(err.value), (part, str(err.value))


def test_missing_and_malformed_files(tmp_path):
    ann, img_dir = write_dataset(tmp_path)
    with pytest.raises(DatasetError, match="annotation file not found: .*nope.json"):
        CocoDetection(tmp_path / "nope.json", img_dir)
    ann.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DatasetError, match=r"ann.json: malformed JSON at line 3 column 19"):
        CocoDetection(ann, img_dir)
    ann.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="top level must be a JSON object"):
        CocoDetection(ann, img_dir)


def test_missing_images_detected_at_construction(tmp_path):
    images = [{"id": i, "file_name": f"sub/{i}.png", "width": 8, "height": 8} for i in range(8)]
    ann, img_dir = write_dataset(tmp_path, images=images, annotations=[], make_files=False)
    (img_dir / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(img_dir / "sub" / "3.png")
    with pytest.raises(DatasetError, match=r"7 of 8 images .* missing from .*img, e.g. \['sub/0.png', 'sub/1.png'"):
        CocoDetection(ann, img_dir)
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoDetection(ann, tmp_path / "elsewhere")


def test_image_size_mismatch_is_reported(tmp_path):
    ann, img_dir = write_dataset(tmp_path)
    Image.new("RGB", (41, 30)).save(img_dir / "b.png")
    ds = CocoDetection(ann, img_dir)
    with pytest.raises(DatasetError, match=r"b.png: the image is width=41, height=30 but .* width=40, height=30"):
        ds[1]


def test_eval_transform_and_scale(tmp_path):
    ann, img_dir = write_dataset(tmp_path)
    ds = CocoDetection(ann, img_dir, transform=build_transforms(False, 80))
    s = ds[0]
    assert s["image"].shape == (60, 80, 3) and s["scale"] == (2.0, 2.0) and s["orig_size"] == (30, 40)
    np.testing.assert_allclose(s["boxes"], [[20, 10, 60, 40], [0, 0, 8, 8]])


# ---- image decoding -----------------------------------------------------------------------------


def exif_jpeg(path, orientation):
    """A 40x20 (w x h) JPEG: left half red, right half blue, with an EXIF orientation tag."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())


def test_modes_convert_to_rgb(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    out = load_rgb(tmp_path / "l.png")
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8 and (out == grey[:, :, None]).all()

    Image.fromarray(grey > 60).save(tmp_path / "1.png")
    assert set(np.unique(load_rgb(tmp_path / "1.png")).tolist()) == {0, 255}

    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    assert out[1, 1].tolist() == [10, 200, 30] and out[0, 0].tolist() == [0, 0, 0]
    pal.save(tmp_path / "pt.png", transparency=0)  # palette entry 0 transparent -> white
    out = load_rgb(tmp_path / "pt.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 200, 30]

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)
    rgba[0, 1] = (200, 10, 20, 0)
    rgba[0, 2] = (0, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_rgb(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [200, 10, 20] and out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())  # half-transparent black over white

    Image.fromarray(np.stack([grey, 255 - grey], axis=2), "LA").save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").shape == (12, 10, 3)


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[..., 1] = cmyk[..., 2] = 255  # magenta + yellow = red
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    out = load_rgb(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_high_bit_depth_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really decoded as a 16-bit mode
    out = load_rgb(tmp_path / "g16.png")
    assert out[0, :, 0].tolist() == [0, 4, 128, 255] and (out[..., 0] == out[..., 2]).all()
    floats = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "f.tiff")
    assert load_rgb(tmp_path / "f.tiff")[0, :, 1].tolist() == [0, 64, 255]


def test_format_by_content_and_exif_orientation(tmp_path):
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "really_png.jpg", format="PNG")
    assert load_rgb(tmp_path / "really_png.jpg")[0, 0].tolist() == [1, 2, 3]  # lossless: exact

    exif_jpeg(tmp_path / "rot.jpg", 6)  # 6 = display rotated 90 degrees clockwise: stored left -> top
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50  # top is red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50  # bottom is blue
    assert load_rgb(tmp_path / "rot.jpg", exif=False).shape == (20, 40, 3)


def test_dataset_follows_exif_or_falls_back_to_stored_pixels(tmp_path, caplog):
    images = [{"id": 1, "file_name": "upright.jpg", "width": 20, "height": 40},  # annotated as displayed
              {"id": 2, "file_name": "stored.jpg", "width": 40, "height": 20}]  # annotated on stored pixels
    ann, img_dir = write_dataset(tmp_path, images=images, annotations=[], make_files=False)
    exif_jpeg(img_dir / "upright.jpg", 6)
    exif_jpeg(img_dir / "stored.jpg", 6)
    ds = CocoDetection(ann, img_dir)
    assert ds[0]["image"].shape == (40, 20, 3)
    with caplog.at_level(logging.WARNING):
        assert ds[1]["image"].shape == (20, 40, 3)
    assert "EXIF orientation" in caplog.text


def test_unreadable_images_raise_clear_errors(tmp_path):
    with pytest.raises(ImageReadError, match="image file not found: .*missing.png"):
        load_rgb(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="cannot read image .*junk.png"):
        load_rgb(tmp_path / "junk.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for name in ("t.png", "t.jpg"):
        Image.fromarray(noise).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot read image .*t.png"):
        load_rgb(tmp_path / "t.png")
    assert load_rgb(tmp_path / "t.jpg").shape == (64, 64, 3)  # a truncated JPEG: what it holds (test_verify.py)
    assert issubclass(ImageReadError, ValueError) and issubclass(DatasetError, ValueError)


def square_exif_jpeg(path, orientation, side=30):
    """A square JPEG: left half red, right half blue, with an EXIF orientation tag."""
    arr = np.zeros((side, side, 3), np.uint8)
    arr[:, : side // 2] = (255, 0, 0)
    arr[:, side // 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("convention", ["stored", "upright", None])
def test_square_images_follow_the_exif_convention_the_other_images_show(tmp_path, caplog, convention):
    """Suspect of issue 22: a square image's size cannot tell whether its annotations follow its EXIF rotation;
    the dataset's non-square rotated images can (checked when the dataset is built)."""
    images = [{"id": 1, "file_name": "square.jpg", "width": 30, "height": 30}]
    if convention is not None:
        w, h = (40, 20) if convention == "stored" else (20, 40)
        images += [{"id": 2 + k, "file_name": f"wide{k}.jpg", "width": w, "height": h} for k in range(2)]
    ann, img_dir = write_dataset(tmp_path, images=images, annotations=[], make_files=False)
    square_exif_jpeg(img_dir / "square.jpg", 6)  # 6: displayed rotated 90 degrees clockwise (stored left -> top)
    for k in range(len(images) - 1):
        exif_jpeg(img_dir / f"wide{k}.jpg", 6)
    with caplog.at_level(logging.INFO, logger="retinanet.data.coco"):
        ds = CocoDetection(ann, img_dir, verify=True, progress=False)
    image = ds[0]["image"].astype(int)
    left_red = image[15, 3, 0] > 200 and image[15, 3, 2] < 50  # as stored
    top_red = image[3, 15, 0] > 200 and image[27, 15, 2] > 200  # as displayed
    assert (left_red, top_red) == ((True, False) if convention == "stored" else (False, True))
    if convention is None:
        assert "no other image shows whether the annotations follow it" in caplog.text
