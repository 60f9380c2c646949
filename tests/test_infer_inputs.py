"""scripts/infer.py on real inputs: a list of files, folders and globs; a video (written here frame by frame with
cv2.VideoWriter) giving per-frame detections and a rendered mp4, the same as the image's one at a time in the
precision this machine picks and in bf16; ``precision=`` chosen per device; ``predict`` batch-invariant."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.deploy.infer import load_detector
from retinanet.deploy.inputs import InputError, find_inputs
from retinanet.deploy.video import read_frames, video_info
from retinanet.detector import Detector
from retinanet.errors import ConfigError

from conftest import compose_cfg, load_script, unmatched_detections

LOW = {"score_thresh": 0.001}


@pytest.fixture(scope="module")
def photos(tiny_run, tmp_path_factory):
    """Two folders of images and a note: a/0.png a/1.png a/notes.txt b/deep/2.png b/deep/3.jpg (a PNG inside)."""
    root = tmp_path_factory.mktemp("inputs")
    src = sorted((tiny_run.root / "val").glob("*.png"))
    (root / "a").mkdir()
    (root / "b" / "deep").mkdir(parents=True)
    shutil.copy(src[0], root / "a" / "0.png")
    shutil.copy(src[1], root / "a" / "1.png")
    (root / "a" / "notes.txt").write_text("not an image")
    shutil.copy(src[2], root / "b" / "deep" / "2.png")
    shutil.copy(src[3], root / "b" / "deep" / "3.jpg")
    return root


def test_find_inputs_takes_lists_of_files_folders_and_globs(photos):
    specs = [str(photos / "a"), str(photos / "b" / "**" / "*.png"), str(photos / "a" / "1.png"),
             str(photos / "b" / "deep" / "3.jpg")]
    images, videos, skipped = find_inputs(specs)
    assert [name for _, name in images] == ["a/0.png", "a/1.png", "b/deep/2.png", "b/deep/3.jpg"]  # 1.png once
    assert videos == [] and skipped == [photos / "a" / "notes.txt"]
    images, _, _ = find_inputs(str(photos / "a"))  # one folder: names relative to it, as before
    assert [name for _, name in images] == ["0.png", "1.png"]
    (photos / "clip.MOV").write_bytes(b"")
    try:
        _, videos, _ = find_inputs([str(photos / "*.MOV"), str(photos / "a" / "0.png")])
        assert videos == [(photos / "clip.MOV", "clip.MOV")]
    finally:
        (photos / "clip.MOV").unlink()
    with pytest.raises(InputError, match=r"glob '.*\*\.gif' holds no image file and no video"):
        find_inputs([str(photos / "a"), str(photos / "*.gif")])  # the spec that names nothing is named
    with pytest.raises(InputError, match=r"input='.*nope' does not exist"):
        find_inputs([str(photos / "a"), str(photos / "nope")])


def test_infer_on_a_list_from_the_command_line(tiny_run, photos, tmp_path):
    infer = load_script("infer")
    out = tmp_path / "out"
    glob_spec = str(photos / "b" / "**" / "*.png")
    cfg = compose_cfg("infer", [f"checkpoint={tiny_run.checkpoint}", f"input=[{photos / 'a'},'{glob_spec}']",
                                f"output={out}", "progress=false", "render=false", "batch_size=1"])  # no padding
    result = infer.run(cfg, out, LOW)
    assert result["input"] == [str(photos / "a"), glob_spec]
    assert [img["file_name"] for img in result["images"]] == ["a/0.png", "a/1.png", "b/deep/2.png"]
    assert result["skipped_files"] == [str(photos / "a" / "notes.txt")] and result["videos"] == []
    # each image's detections are those of a run on that image alone
    single = infer.run(compose_cfg("infer", [f"checkpoint={tiny_run.checkpoint}", f"input={photos / 'b' / 'deep' / '2.png'}",
                                             f"output={tmp_path / 'one'}", "progress=false", "render=false"]),
                       tmp_path / "one", LOW)
    ours = [(a["category_id"], a["bbox"], a["score"]) for a in result["annotations"] if a["file_name"] == "b/deep/2.png"]
    assert ours == [(a["category_id"], a["bbox"], a["score"]) for a in single["annotations"]] and ours


@pytest.fixture(scope="module")
def clip(tiny_run, tmp_path_factory):
    """A 5-frame MJPEG .avi of four val images (resized to 160 x 120) and a repeat, at 4 frames/s."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    src = sorted((tiny_run.root / "val").glob("*.png"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 4.0, (160, 120))
    assert writer.isOpened()
    for p in src[:4] + src[:1]:
        rgb = np.asarray(Image.open(p).convert("RGB").resize((160, 120)))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.parametrize("precision", ["auto", "bf16-mixed"])  # what this machine picks; bf16 (emulated if need be)
def test_infer_on_a_video_writes_per_frame_detections_and_a_rendered_mp4(tiny_run, photos, clip, tmp_path, precision):
    infer = load_script("infer")
    out = tmp_path / "out"
    cfg = compose_cfg("infer", [f"checkpoint={tiny_run.checkpoint}", f"input=[{clip},{photos / 'a' / '0.png'}]",
                                f"output={out}", "progress=false", "batch_size=2", "render_score_thresh=0.001",
                                f"precision={precision}"])
    result = infer.run(cfg, out, LOW)
    (image,), (video,) = result["images"], result["videos"]
    common = clip.parent.parent  # the inputs' shared folder: names are relative to it
    assert image["file_name"] == (photos / "a" / "0.png").relative_to(common).as_posix()
    assert video["file_name"] == clip.relative_to(common).as_posix()
    assert video["num_frames"] == 5 and video["fps"] == 4.0 and (video["width"], video["height"]) == (160, 120)
    per_frame = json.loads((out / video["detections_file"]).read_text())
    assert [f["frame"] for f in per_frame["frames"]] == [0, 1, 2, 3, 4]
    assert [f["time"] for f in per_frame["frames"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert video["detections"] == sum(len(f["annotations"]) for f in per_frame["frames"]) > 0

    # the detections of each frame (infer ran them in batches of 2) are the Detector's on that decoded frame alone,
    # as matched sets up to the precision's tolerance (the tiny run scores every anchor about 0.01-0.03: near-ties)
    detector = Detector.from_checkpoint(tiny_run.checkpoint, "cpu", postprocess=LOW, precision=precision)
    label = {c: k for k, c in enumerate(detector.category_ids)}
    frames = list(read_frames(clip))
    for frame, record in zip(frames, per_frame["frames"]):
        det = detector.predict(frame)
        anns = record["annotations"]
        got = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4),
               "scores": torch.tensor([a["score"] for a in anns]),
               "labels": torch.tensor([label[a["category_id"]] for a in anns], dtype=torch.int64)}
        assert len(anns) == len(det["scores"]) > 0
        assert not unmatched_detections(got, det, detector.autocast_dtype)
    assert np.array_equal(frames[4], frames[0])  # the repeated picture: checked above like every frame

    rendered = out / video["rendered_file"]
    assert rendered.suffix == ".mp4" and video_info(rendered)["width"] == 160
    drawn = list(read_frames(rendered))
    assert len(drawn) == 5 and drawn[0].shape == (120, 160, 3)
    assert np.abs(drawn[0].astype(int) - frames[0].astype(int)).mean() > 1  # boxes drawn (beyond codec noise)


def test_unreadable_video_is_reported_not_fatal(tiny_run, photos, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    infer = load_script("infer")
    cfg = compose_cfg("infer", [f"checkpoint={tiny_run.checkpoint}", f"input=[{broken},{photos / 'a' / '0.png'}]",
                                "progress=false", "render=false"])
    result = infer.run(cfg, tmp_path / "out", LOW)
    assert result["unreadable_files"] == [str(broken)] and len(result["images"]) == 1 and result["videos"] == []


def test_precision_is_chosen_per_device_or_as_given(tiny_run, monkeypatch, caplog):
    from retinanet import runtime

    assert load_detector(tiny_run.checkpoint, "cpu", precision=32).autocast_dtype is None
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA device"):
        load_detector(tiny_run.checkpoint, "cpu", precision="fp16")
    with pytest.raises(ConfigError, match="precision='fp8' is not one of"):
        load_detector(tiny_run.checkpoint, "cpu", precision="fp8")
    with pytest.raises(ConfigError, match="precision=bf16: .*exported in fp32"):
        load_detector(tiny_run.checkpoint.with_suffix(".onnx"), "cpu", precision="bf16")
    detector = load_detector(tiny_run.checkpoint, "cpu", postprocess=LOW, precision="bf16")
    assert detector.autocast_dtype == torch.bfloat16  # as asked, native or not
    image = np.asarray(Image.open(next((tiny_run.root / "val").glob("*.png"))).convert("RGB"))
    bf16 = detector.predict(image)
    detector.autocast_dtype = None
    fp32 = detector.predict(image)
    assert len(bf16["scores"]) > 0 and abs(float(bf16["scores"][0]) - float(fp32["scores"][0])) < 0.01
    for native, auto in ((True, torch.bfloat16), (False, None)):  # the tiny run trained with precision=auto
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        assert load_detector(tiny_run.checkpoint, "cpu").autocast_dtype == auto
    with caplog.at_level("WARNING"):
        assert load_detector(tiny_run.checkpoint, "cpu", precision="bf16-mixed").autocast_dtype == torch.bfloat16
    assert "precision=bf16 on a cpu without native bf16: emulated, slower than fp32" in caplog.text


def test_predict_is_batch_invariant(tiny_run):
    """An image's detections are the same alone, in a list of images of other sizes, in batches of any size, or
    repeated: in fp32 and in bf16, matched as sets up to the precision's tolerance; in bf16, where the network's
    outputs for an image do not change with the batch (native here), the very same tensors."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tiny_run.root / "val").glob("*.png"))]
    assert len({im.shape for im in images}) > 1  # sizes differ: a padded batch would change the borders
    for precision in ("32", "bf16"):
        detector = Detector.from_checkpoint(tiny_run.checkpoint, "cpu", postprocess=LOW, precision=precision)
        alone = [detector.predict(image) for image in images]
        assert all(len(det["scores"]) > 0 for det in alone)
        for batch_size in (3, 8):
            for one, det in zip(alone, detector.predict(images, batch_size=batch_size)):
                assert not unmatched_detections(one, det, detector.autocast_dtype), (precision, batch_size)
        for det in detector.predict([images[0]] * 3):
            assert not unmatched_detections(alone[0], det, detector.autocast_dtype), precision


def rotated_phone_video(path, width=64, height=32, frames=3):
    """An mp4 of ``width`` x ``height`` frames (left half red) whose track header says: display rotated 90 degrees,
    as phones record portrait video (the 3x3 display matrix of the ISO-BMFF ``tkhd`` box)."""
    import struct

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for _ in range(frames):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:, : width // 2] = (0, 0, 255)  # BGR red
        writer.write(frame)
    writer.release()
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd") + 4
    assert data[tkhd] == 0  # version 0: 32-bit times
    matrix = tkhd + 4 + 20 + 8 + 8  # flags, times / id / duration, reserved, layer / group / volume / reserved
    assert struct.unpack(">9i", data[matrix:matrix + 36]) == (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))


def test_a_rotated_phone_video_reports_the_size_of_the_frames_it_gives(tmp_path):
    """Suspect of issue 22: width / height from the capture properties while OpenCV rotates the frames."""
    rotated_phone_video(tmp_path / "phone.mp4")
    frames = list(read_frames(tmp_path / "phone.mp4"))
    assert frames and all(f.shape == (64, 32, 3) for f in frames)  # OpenCV turned them upright
    info = video_info(tmp_path / "phone.mp4")
    assert (info["height"], info["width"]) == frames[0].shape[:2]  # the detections' pixels are these frames'
