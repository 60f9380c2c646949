"""VOC XML, box CSV and YOLO txt -> COCO JSON: exact boxes through CocoDetection, class maps, difficult
objects as crowd regions, and clear errors naming the file, line or record, field and value."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retinanet.data import CocoDetection
from retinanet.data.convert import ConvertError, convert_csv, convert_voc, convert_yolo, split_train_val, write_coco

from conftest import ROOT


def image(path, w, h, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 30)).save(path, format=fmt)


def voc_xml(filename, objects, size=(64, 48)):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    fname = f"<filename>{filename}</filename>" if filename is not None else ""
    return (f"<annotation>{fname}<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"{objs}</annotation>")


def load(data, tmp_path, img_dir):
    write_coco(data, tmp_path / "out.json")
    return CocoDetection(tmp_path / "out.json", img_dir)


@pytest.fixture
def voc(tmp_path):
    ann, img = tmp_path / "Annotations", tmp_path / "JPEGImages"
    ann.mkdir()
    image(img / "a.jpg", 64, 48)
    image(img / "b.jpg", 40, 30, fmt="PNG")  # a PNG named .jpg
    image(img / "c.png", 50, 20)
    (ann / "a.xml").write_text(voc_xml("a.jpg", [("dog", (1, 1, 20, 10), 0), ("cat", (11, 21, 40, 48), 1)]))
    (ann / "b.xml").write_text(voc_xml("b", [("cat", (5, 5, 3, 9), 0)], size=(0, 0)))  # no ext, size 0, xmax < xmin
    (ann / "c.xml").write_text(voc_xml(None, []))  # no filename: found by the XML's stem; no objects
    return ann, img


def test_voc(voc, tmp_path, caplog):
    ann, img = voc
    data = convert_voc(ann, img)
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"] and [c["id"] for c in data["categories"]] == [1, 2]
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        ("a.jpg", 64, 48), ("b.jpg", 40, 30), ("c.png", 64, 48)]
    assert "dropped 1 boxes with zero or negative width/height" in caplog.text and "b.xml: object 0" in caplog.text
    ds = load(data, tmp_path, img)
    s = ds[0]
    np.testing.assert_array_equal(s["boxes"], [[0, 0, 20, 10], [10, 20, 40, 48]])  # 1-based inclusive -> 0-based
    assert s["labels"].tolist() == [1, 0] and s["crowd"].tolist() == [False, True]  # difficult -> ignore region
    assert convert_voc(ann, img, difficult="keep")["annotations"][1]["iscrowd"] == 0
    assert len(convert_voc(ann, img, difficult="drop")["annotations"]) == 1
    fixed = convert_voc(ann, img, class_names=["dog", "cat", "bird"], ids=["a"])
    assert [c["name"] for c in fixed["categories"]] == ["dog", "cat", "bird"] and len(fixed["images"]) == 1
    assert fixed["annotations"][0]["category_id"] == 1


@pytest.mark.parametrize("xml, message", [
    ("<annotation><filename>a.jpg</filename>", r"a.xml: malformed XML at line 1 column \d+"),
    (voc_xml("a.jpg", [("dog", (1, 1, "x", 10), 0)]), r"a.xml: object 0: field <bndbox/xmax>='x' is not a number"),
    ("<annotation><filename>a.jpg</filename><object><name>dog</name></object></annotation>",
     r"a.xml: object 0: missing field <bndbox/xmin>"),
    (voc_xml("zzz.jpg", []), r"a.xml: field <filename>='zzz.jpg': no such image"),
    (voc_xml("a.jpg", [("emu", (1, 1, 5, 5), 0)]), r"a.xml: object 0: class 'emu' is not one of the given classes"),
])
def test_voc_errors(voc, xml, message):
    ann, img = voc
    (ann / "a.xml").write_text(xml)
    with pytest.raises(ConvertError, match=message):
        convert_voc(ann, img, class_names=["cat", "dog"])


def test_csv(tmp_path):
    image(tmp_path / "imgs" / "x.jpg", 64, 48)
    image(tmp_path / "imgs" / "sub" / "y.png", 32, 32)
    image(tmp_path / "imgs" / "z.png", 10, 10)
    rows = ["path,x1,y1,x2,y2,class", "imgs/x.jpg,1.5,2,30,40,person", "imgs/x.jpg,0,0,10,10,car",
            f"{tmp_path / 'imgs' / 'sub' / 'y.png'},5,6,7,8,person", "", "imgs/z.png,,,,,"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.csv").write_text("person,0\ncar,1\n")
    data = convert_csv(tmp_path / "train.csv", classes=tmp_path / "classes.csv")
    assert [c["name"] for c in data["categories"]] == ["person", "car"]
    assert [i["file_name"] for i in data["images"]] == ["imgs/x.jpg", "imgs/sub/y.png", "imgs/z.png"]
    ds = load(data, tmp_path, tmp_path)
    np.testing.assert_allclose(ds[0]["boxes"], [[1.5, 2, 30, 40], [0, 0, 10, 10]])
    assert ds[0]["labels"].tolist() == [0, 1] and ds[1]["labels"].tolist() == [0]
    assert ds[2]["boxes"].shape == (0, 4)  # the empty row: an image without objects
    by_name = convert_csv(tmp_path / "train.csv")  # no class file: sorted names
    assert [c["name"] for c in by_name["categories"]] == ["car", "person"]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "val.csv").write_text("sub/y.png,1,1,4,4,car\n")  # relative to the given root
    rooted = convert_csv(tmp_path / "lists" / "val.csv", images=tmp_path / "imgs")
    assert rooted["images"] == [{"id": 1, "file_name": "sub/y.png", "width": 32, "height": 32}]


@pytest.mark.parametrize("row, message", [
    ("imgs/x.jpg,1,2,3,person", r"train.csv line 1: expected 6 columns path,x1,y1,x2,y2,class, got 5"),
    ("imgs/x.jpg,1,2,three,4,person", r"train.csv line 1: field 'x2'='three' is not a number"),
    ("imgs/x.jpg,1,2,3,4,", r"train.csv line 1: field 'class' is empty"),
    ("imgs/nope.jpg,1,2,3,4,a", r"train.csv line 1: image .*nope.jpg' not found"),
    ("../x.jpg,1,2,3,4,a", r"train.csv line 1: image .* is outside the image folder"),
])
def test_csv_errors(tmp_path, row, message):
    image(tmp_path / "imgs" / "x.jpg", 64, 48)
    image(tmp_path.parent / "x.jpg", 8, 8)
    (tmp_path / "train.csv").write_text(row + "\n")
    with pytest.raises(ConvertError, match=message):
        convert_csv(tmp_path / "train.csv")


def test_yolo(tmp_path):
    root = tmp_path / "ds"
    image(root / "images" / "train" / "a.jpg", 100, 50)
    image(root / "images" / "train" / "b.png", 20, 40)
    image(root / "images" / "train" / "c.jpg", 10, 10)  # no label file: no objects
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.1 0.1\n")
    (root / "labels" / "train" / "b.txt").write_text("2 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n")  # polygon
    (tmp_path / "data.yaml").write_text("names:\n  0: person\n  1: bike\n  2: car\n")
    data = convert_yolo(root / "images", tmp_path / "data.yaml")
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "person"), (2, "bike"), (3, "car")]
    assert [i["file_name"] for i in data["images"]] == ["train/a.jpg", "train/b.png", "train/c.jpg"]
    ds = load(data, tmp_path, root / "images")
    np.testing.assert_allclose(ds[0]["boxes"], [[40, 15, 60, 35], [5, 2.5, 15, 7.5]], atol=1e-4)
    assert ds[0]["labels"].tolist() == [1, 0]
    np.testing.assert_allclose(ds[1]["boxes"], [[2, 4, 10, 24]], atol=1e-4)
    assert ds[2]["boxes"].shape == (0, 4)
    (tmp_path / "names.txt").write_text("person\nbike\ncar\n")
    assert convert_yolo(root / "images", tmp_path / "names.txt")["categories"] == data["categories"]


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.1 0.1", r"a.txt line 1: class 3 is out of range: .* lists 3 classes \(0..2\)"),
    ("1 50 20 10 10", r"a.txt line 1: coordinates .* must be normalised to \[0, 1\]"),
    ("1 0.5 0.5 0.1", r"a.txt line 1: expected 'class cx cy w h'"),
    ("x 0.5 0.5 0.1 0.1", r"a.txt line 1: class 'x' is not an integer"),
])
def test_yolo_errors(tmp_path, line, message):
    image(tmp_path / "images" / "a.jpg", 100, 50)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(line + "\n")
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    with pytest.raises(ConvertError, match=message):
        convert_yolo(tmp_path / "images", tmp_path / "names.txt")


def test_split_is_by_image_and_seeded():
    data = {"images": [{"id": i} for i in range(10)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": i, "image_id": i % 10} for i in range(30)]}
    train, val = split_train_val(data, 0.3, seed=1)
    assert len(val["images"]) == 3 and len(train["images"]) == 7
    val_ids = {i["id"] for i in val["images"]}
    assert all(a["image_id"] in val_ids for a in val["annotations"]) and len(val["annotations"]) == 9
    assert split_train_val(data, 0.3, seed=1) == (train, val)
    with pytest.raises(ConvertError, match="empty split"):
        split_train_val(data, 0.01)


def test_cli(voc, tmp_path):
    ann, img = voc
    script = str(ROOT / "scripts" / "convert_to_coco.py")
    out = tmp_path / "conv" / "mine.json"
    proc = subprocess.run([sys.executable, script, "--format", "voc", "--input", str(ann), "--images", str(img),
                           "--output", str(out), "--val-fraction", "0.34"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    train, val = (json.loads((tmp_path / "conv" / f"mine_{s}.json").read_text()) for s in ("train", "val"))
    assert len(train["images"]) == 2 and len(val["images"]) == 1 and "mine_val.json: 1 images" in proc.stdout
    (ann / "a.xml").write_text("<annotation>")
    proc = subprocess.run([sys.executable, script, "--format", "voc", "--input", str(ann), "--images", str(img),
                           "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "a.xml: malformed XML" in proc.stderr and "Traceback" not in proc.stderr
