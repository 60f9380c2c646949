"""The synthetic shapes generator: deterministic bytes, valid COCO, honest content, atomic reuse."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from retinanet.data import shapes
from retinanet.data.shapes import ensure_shapes_dataset
from retinanet.errors import UserError

SMALL = dict(num_train=24, num_val=8)


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """120 training images with the default content parameters."""
    root = tmp_path_factory.mktemp("medium") / "shapes"
    paths = ensure_shapes_dataset(root, num_train=120, num_val=10, seed=3, workers=2)
    return paths


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    a = ensure_shapes_dataset(tmp_path / "a", seed=5, workers=1, **SMALL)
    b = ensure_shapes_dataset(tmp_path / "b", seed=5, workers=2, **SMALL)
    files_a, files_b = tree_bytes(Path(a["root"])), tree_bytes(Path(b["root"]))
    assert len(files_a) == SMALL["num_train"] + SMALL["num_val"] + 3  # PNGs + 2 JSON + manifest
    assert files_a == files_b


def test_different_seed_different_data(tmp_path):
    a = tree_bytes(Path(ensure_shapes_dataset(tmp_path / "a", seed=5, workers=1, **SMALL)["root"]))
    b = tree_bytes(Path(ensure_shapes_dataset(tmp_path / "b", seed=6, workers=1, **SMALL)["root"]))
    assert a.keys() == b.keys()
    differing = [k for k in a if k.endswith(".png") and a[k] != b[k]]
    assert len(differing) == SMALL["num_train"] + SMALL["num_val"]
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]


def test_coco_json_is_valid_and_complete(medium):
    coco = COCO(medium["train_ann"])
    data = coco.dataset
    assert set(data) >= {"info", "images", "annotations", "categories"}
    assert [(c["id"], c["name"], c["supercategory"]) for c in data["categories"]] == [
        (1, "ellipse", "shape"), (2, "rectangle", "shape"), (4, "triangle", "shape"), (5, "star", "shape"),
        (7, "cross", "shape"), (9, "ring", "shape")]
    assert len(data["images"]) == 120 and len({img["id"] for img in data["images"]}) == 120
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    used = {a["category_id"] for a in data["annotations"]}
    assert used == {1, 2, 4, 5, 7, 9}  # every class occurs, ids stay non-contiguous
    for img in data["images"]:
        with Image.open(Path(medium["train_images"]) / img["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (img["width"], img["height"])
        assert 160 <= img["width"] <= 224 and 160 <= img["height"] <= 224
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) <= 6
        for a in anns:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert a["area"] == pytest.approx(w * h) and a["iscrowd"] == 0
            assert max(w, h) <= 81  # object_size max 80 (+1 px of rasterisation)


def test_content_statistics(medium):
    data = json.loads(Path(medium["train_ann"]).read_text())
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=121)[1:]
    assert 2 <= (per_image == 0).sum() <= 15  # ~5 % empty images
    assert per_image.max() == 6 and 2.5 < per_image.mean() < 4.0
    boxes = np.array([a["bbox"] for a in data["annotations"]])
    long_side = boxes[:, 2:].max(axis=1)
    assert long_side.min() < 25 and long_side.max() > 70  # sizes span the 16..80 range
    aspect = boxes[:, 2] / boxes[:, 3]
    assert aspect.min() < 0.6 and aspect.max() > 1.7  # elongated ellipses / rectangles occur
    ious = []
    for img_id in range(1, 121):
        b = boxes[[i for i, a in enumerate(data["annotations"]) if a["image_id"] == img_id]]
        for i in range(len(b)):
            for j in range(i):
                ious.append(shapes._box_iou(np.r_[b[i, :2], b[i, :2] + b[i, 2:]],
                                            np.r_[b[j, :2], b[j, :2] + b[j, 2:]][None])[0])
    assert max(ious) <= shapes.MAX_IOU + 1e-9 and sum(v > 0 for v in ious) > 10  # overlaps happen, bounded


def test_boxes_are_tight_around_the_drawn_pixels(medium):
    """For isolated objects, the pixels of the object's colour span exactly its box (rings skipped: their
    centre, where the colour is sampled, is a hole)."""
    data = json.loads(Path(medium["train_ann"]).read_text())
    checked = exact = 0
    for img in data["images"][:60]:
        image = np.asarray(Image.open(Path(medium["train_images"]) / img["file_name"])).astype(np.float32)
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        for a in (a for a in anns if a["category_id"] != 9):
            x, y, w, h = (int(v) for v in a["bbox"])
            others = [o for o in anns if o is not a]
            pad = 3
            x0, y0, x1, y1 = max(x - pad, 0), max(y - pad, 0), x + w + pad, y + h + pad
            if any(o["bbox"][0] < x1 + 2 and o["bbox"][0] + o["bbox"][2] > x0 - 2 and o["bbox"][1] < y1 + 2
                   and o["bbox"][1] + o["bbox"][3] > y0 - 2 for o in others):
                continue
            crop = image[y0:y1, x0:x1]
            colour = np.median(image[y + h // 2 - 1:y + h // 2 + 2, x:x + w].reshape(-1, 3), axis=0)
            near = np.linalg.norm(crop - colour, axis=2) < 30
            ys, xs = np.nonzero(near)
            checked += 1
            exact += (xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1) == (x, y, x + w, y + h)
    assert checked >= 30 and exact == checked


def test_shape_size_is_the_longer_box_side():
    rng = np.random.default_rng(0)
    for name in ("ellipse", "rectangle", "triangle", "star", "cross", "ring"):
        polys, w, h = shapes._shape_polygons(name, 40.0, rng)
        assert max(w, h) == pytest.approx(40.0)
        mask, ix, iy = shapes._rasterise(polys, 10.0, 10.0, w, h)
        ys, xs = np.nonzero(mask)
        assert abs((xs.max() - xs.min() + 1) - w) <= 2 and abs((ys.max() - ys.min() + 1) - h) <= 2
    polys, _, _ = shapes._shape_polygons("ring", 60.0, rng)
    mask, _, _ = shapes._rasterise(polys, 0.0, 0.0, 60, 60)
    assert not mask[mask.shape[0] // 2, mask.shape[1] // 2]  # a ring has a hole


def test_manifest_reuse_and_regeneration(tmp_path):
    root = tmp_path / "shapes"
    paths = ensure_shapes_dataset(root, seed=1, workers=1, **SMALL)
    manifest = json.loads(Path(paths["manifest"]).read_text())
    assert manifest["version"] == shapes.GENERATOR_VERSION
    assert manifest["params"] == {"num_train": 24, "num_val": 8, "seed": 1, "image_size": [160, 224],
                                  "object_size": [16.0, 80.0], "max_objects": 6, "empty_fraction": 0.05}
    png = root / "train" / "000000.png"
    stamps = (os.stat(paths["manifest"]).st_mtime_ns, os.stat(png).st_mtime_ns)
    assert ensure_shapes_dataset(root, seed=1, workers=2, **SMALL) == paths  # worker count is not a parameter
    assert (os.stat(paths["manifest"]).st_mtime_ns, os.stat(png).st_mtime_ns) == stamps

    ensure_shapes_dataset(root, seed=1, workers=1, num_train=24, num_val=5)  # changed: regenerated
    assert len(list((root / "val").glob("*.png"))) == 5
    assert json.loads(Path(paths["manifest"]).read_text())["params"]["num_val"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary or old folders left


def test_killed_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "shapes"
    calls = []

    def dying(job):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(job)
        return real(job)

    real = shapes._render_job
    monkeypatch.setattr(shapes, "_render_job", dying)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes_dataset(root, workers=1, **SMALL)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    # a temp folder of a process that no longer runs (killed -9) is cleaned up by the next generation
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".shapes.tmp-{int(dead.stdout)}-deadbeef"
    (stale / "train").mkdir(parents=True)
    monkeypatch.setattr(shapes, "_render_job", real)
    ensure_shapes_dataset(root, workers=1, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a generated shapes dataset"):
        ensure_shapes_dataset(tmp_path, workers=1, **SMALL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=(224, 160)), "image_size"),
    (dict(object_size=(16, 300)), "object_size"),
    (dict(num_train=-1), "num_train=-1"),
])
def test_bad_parameters_are_named(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        ensure_shapes_dataset(tmp_path / "x", **kwargs)


def _worker_handlers(_):
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_render_workers_do_not_inherit_the_trainers_stop_handler(tmp_path):
    """The trainer installs its SIGTERM handler before it generates the data; the pool's shutdown
    (SIGTERM to each worker) must end the workers, not log "SIGTERM received" from each of them."""
    from retinanet.signals import StopSignal

    stop = StopSignal().install()
    try:
        with shapes._pool(2) as pool:
            assert pool.map(_worker_handlers, range(4)) == [(True, True)] * 4
        # and a whole generation under the trainer's handler completes (the pool shuts down cleanly)
        ensure_shapes_dataset(tmp_path / "d", num_train=4, num_val=2, seed=3, workers=2)
        assert (tmp_path / "d" / "manifest.json").is_file() and len(list((tmp_path / "d" / "train").glob("*.png"))) == 4
    finally:
        stop.restore()
