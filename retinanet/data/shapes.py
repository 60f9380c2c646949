"""The embedded synthetic detection dataset ("shapes"): real PNG files plus COCO JSON.

``ensure_shapes_dataset(root)`` writes ``root/{train,val}/*.png``,
``root/annotations/instances_{train,val}.json`` and ``root/manifest.json``. It is
deterministic (image ``i`` of a split is drawn from a numpy Generator seeded with
``(seed, split, i)``, so a worker pool gives the same bytes as one process) and
atomic (built in a temporary folder beside ``root``, then renamed into place).
A later call whose manifest matches does nothing.

Six classes with deliberately non-contiguous COCO ids (to exercise the label map).
Objects vary in size (16-80 px), aspect and rotation, may overlap (box IoU <= 0.3,
at most half of an object hidden) and may be cut by the image border; backgrounds are
gradients, low-frequency textures or faint stripes/checks with thin lines and dots
that are not objects, and pixel noise on top.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from retinanet.boxes import xyxy_to_xywh
from retinanet.errors import UserError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump whenever the bytes for the same parameters change
CATEGORIES = ((1, "ellipse"), (2, "rectangle"), (4, "triangle"), (5, "star"), (7, "cross"), (9, "ring"))
SPLITS = ("train", "val")
MAX_IOU = 0.3          # largest box IoU allowed between two objects of one image
MIN_VISIBLE = 0.5      # an object keeps at least this fraction of its pixels unhidden
MIN_INSIDE = 0.6       # at least this fraction of an object lies inside the image
MIN_CONTRAST = 100.0   # RGB distance between an object's colour and its local background
PLACEMENT_TRIES = 20   # positions tried per object before it is left out


def _unit_ellipse(n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _outline(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons [P, 2] (x, y) of one shape around the origin: the outline, then an optional hole."""
    mild = (1.0, np.exp(rng.uniform(np.log(0.8), np.log(1.25))))  # y stretch for the symmetric shapes
    wide = (1.0, np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    if name == "ellipse":
        return [_unit_ellipse() * wide]
    if name == "rectangle":
        return [np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * wide]
    if name == "triangle":
        angles = np.deg2rad(-90.0 + np.array([0.0, 120.0, 240.0]) + rng.uniform(-15.0, 15.0, 3))
        return [np.stack([np.cos(angles), np.sin(angles)], axis=1) * mild]
    if name == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        return [np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1) * mild]
    if name == "cross":
        t = rng.uniform(0.28, 0.42)  # half the arm thickness
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
               (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        return [np.array(pts, dtype=np.float64) * mild]
    if name == "ring":
        outer = _unit_ellipse() * mild
        return [outer, outer * rng.uniform(0.45, 0.7)]
    raise ValueError(f"unknown shape {name!r}")


def _shape_polygons(name: str, size: float, rng: np.random.Generator) -> tuple[list[np.ndarray], float, float]:
    """Rotated, scaled polygons in local pixels [0, w] x [0, h]; the longer box side is ``size``."""
    polys = _outline(name, rng)
    a = np.deg2rad(rng.uniform(-20.0, 20.0))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    polys = [p @ rot.T for p in polys]
    lo, hi = polys[0].min(axis=0), polys[0].max(axis=0)
    k = size / float((hi - lo).max())
    polys = [(p - lo) * k for p in polys]
    w, h = (hi - lo) * k
    return polys, float(w), float(h)


def _rasterise(polys: list[np.ndarray], x0: float, y0: float, w: float, h: float):
    """Mask of the shape placed with its box corner at (x0, y0): (mask [mh, mw] bool, ix, iy)."""
    ix, iy = int(np.floor(x0)), int(np.floor(y0))
    canvas = Image.new("L", (int(np.ceil(w)) + 2, int(np.ceil(h)) + 2), 0)
    draw = ImageDraw.Draw(canvas)
    for j, p in enumerate(polys):  # the first polygon fills, a second one cuts the hole
        draw.polygon([tuple(q) for q in (p + (x0 - ix, y0 - iy)).tolist()], fill=0 if j else 1)
    return np.asarray(canvas, dtype=bool), ix, iy


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] with boxes [N, 4]."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _lerp_upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a coarse grid [gh, gw, C] to [height, width, C]."""
    def axis_weights(n_in, n_out):
        pos = np.linspace(0.0, n_in - 1, n_out)
        i0 = np.minimum(pos.astype(int), n_in - 2)
        return i0, (pos - i0).astype(np.float32)

    iy, fy = axis_weights(grid.shape[0], height)
    ix, fx = axis_weights(grid.shape[1], width)
    rows = grid[iy] * (1 - fy)[:, None, None] + grid[iy + 1] * fy[:, None, None]  # [H, gw, C]
    return rows[:, ix] * (1 - fx)[None, :, None] + rows[:, ix + 1] * fx[None, :, None]  # [H, W, C]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A varied, object-free background [H, W, 3] uint8 (gradient, texture or faint pattern + clutter)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(30.0, 225.0, 3).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # smooth gradient between two colours
        a = rng.uniform(0.0, 2.0 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + t[..., None] * (rng.uniform(0.0, 255.0, 3).astype(np.float32) - base)
    elif kind == 1:  # low-frequency noise texture
        grid = rng.uniform(-1.0, 1.0, (*rng.integers(2, 7, 2), 3)).astype(np.float32)
        img = base + rng.uniform(20.0, 70.0) * _lerp_upsample(grid, height, width)
    else:  # low-contrast stripes or checks
        a, period = rng.uniform(0.0, np.pi), rng.uniform(6.0, 28.0)
        u = np.sign(np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period))
        if rng.random() < 0.5:
            u = u * np.sign(np.sin(2 * np.pi * (yy * np.cos(a) - xx * np.sin(a)) / period))
        img = base + rng.uniform(8.0, 25.0) * u[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 4)):  # thin lines (not objects)
        pts = rng.uniform(0, (width, height), (2, 2))
        draw.line([tuple(p) for p in pts.tolist()], fill=tuple(rng.integers(0, 256, 3).tolist()),
                  width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(0, 7)):  # small dots (not objects)
        (x, y), r = rng.uniform(0, (width, height)), rng.uniform(1.0, 2.5)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return np.array(pil)


def render_image(rng: np.random.Generator, image_size=(160, 224), object_size=(16, 80), max_objects=6,
                 empty_fraction=0.05) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image [H, W, 3] uint8 and its objects as (category_id, [x, y, w, h]) in drawing order."""
    height, width = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, 2))
    canvas = _background(rng, height, width)
    n_objects = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the object drawn on top of each pixel
    boxes, cats, drawn, visible = [], [], [], []
    for _ in range(n_objects):
        cat = int(rng.integers(len(CATEGORIES)))
        polys, w, h = _shape_polygons(CATEGORIES[cat][1], rng.uniform(*object_size), rng)
        for _ in range(PLACEMENT_TRIES):
            mask, ix, iy = _rasterise(polys, rng.uniform(-0.2 * w, width - 0.8 * w),
                                      rng.uniform(-0.2 * h, height - 0.8 * h), w, h)
            gx0, gy0 = max(ix, 0), max(iy, 0)
            gx1, gy1 = min(ix + mask.shape[1], width), min(iy + mask.shape[0], height)
            inside = mask[gy0 - iy:gy1 - iy, gx0 - ix:gx1 - ix]
            n_inside = int(inside.sum()) if inside.size else 0
            if n_inside == 0 or n_inside < MIN_INSIDE * mask.sum():
                continue
            cols, rows = np.flatnonzero(inside.any(axis=0)), np.flatnonzero(inside.any(axis=1))
            box = np.array([gx0 + cols[0], gy0 + rows[0], gx0 + cols[-1] + 1, gy0 + rows[-1] + 1], dtype=np.float64)
            if boxes and _box_iou(box, np.array(boxes)).max() > MAX_IOU:
                continue
            under = owner[gy0:gy1, gx0:gx1][inside]
            hidden = np.bincount(under[under >= 0], minlength=len(boxes))
            if any(v - c < MIN_VISIBLE * d for v, c, d in zip(visible, hidden, drawn)):
                continue
            local = canvas[gy0:gy1, gx0:gx1]
            candidates = rng.integers(0, 256, (8, 3))
            contrast = np.linalg.norm(candidates - local[inside].mean(axis=0), axis=1)
            ok = contrast >= MIN_CONTRAST
            pick = int(np.argmax(ok)) if ok.any() else int(contrast.argmax())  # first good one, else the best
            local[inside] = candidates[pick]
            owner[gy0:gy1, gx0:gx1][inside] = len(boxes)
            visible = [v - c for v, c in zip(visible, hidden)] + [n_inside]
            drawn.append(n_inside)
            boxes.append(box)
            cats.append(CATEGORIES[cat][0])
            break
    sigma = rng.uniform(2.0, 8.0)
    noisy = canvas + sigma * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    objects = list(zip(cats, xyxy_to_xywh(np.array(boxes).reshape(-1, 4)).tolist()))
    return image, objects


def _worker_signals() -> None:
    """Pool initializer: the default SIGTERM (the pool's own ``terminate`` must end a worker), SIGINT ignored
    (Ctrl-C is the parent's). A forked worker would otherwise inherit the trainer's stop handler, and the
    pool's shutdown would read as "SIGTERM received: stopping after the current step" in the run's log."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(workers: int):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    return ctx.Pool(workers, initializer=_worker_signals)


def _render_job(job: tuple) -> tuple[int, int, list]:
    """Draw image ``index`` of ``split`` and write it as PNG (module level: runs in pool workers)."""
    seed, split, index, out_dir, params = job
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image, objects = render_image(rng, **params)
    # Huffman-only deflate: pixel noise defeats LZ matching, so this is both the fastest and the smallest
    Image.fromarray(image).save(os.path.join(out_dir, f"{index:06d}.png"), format="PNG", compress_level=6,
                                compress_type=zlib.Z_HUFFMAN_ONLY)
    return image.shape[0], image.shape[1], objects


def _coco_json(split: str, results: list, seed: int) -> dict:
    images, annotations = [], []
    for index, (height, width, objects) in enumerate(results):
        images.append({"id": index + 1, "file_name": f"{index:06d}.png", "width": width, "height": height})
        for cat, bbox in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": cat,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {
        "info": {"description": f"synthetic shapes ({split}), retinanet.data.shapes v{GENERATOR_VERSION}, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in CATEGORIES],
    }


def _paths(root: Path) -> dict:
    return {"root": str(root), "manifest": str(root / "manifest.json"),
            **{f"{s}_images": str(root / s) for s in SPLITS},
            **{f"{s}_ann": str(root / "annotations" / f"instances_{s}.json") for s in SPLITS}}


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _generate(tmp: Path, manifest: dict, workers: int) -> None:
    params = {k: manifest["params"][k] for k in ("image_size", "object_size", "max_objects", "empty_fraction")}
    seed = manifest["params"]["seed"]
    counts = {"train": manifest["params"]["num_train"], "val": manifest["params"]["num_val"]}
    (tmp / "annotations").mkdir(parents=True)
    jobs = []
    for split in SPLITS:
        (tmp / split).mkdir()
        jobs += [(seed, split, i, str(tmp / split), params) for i in range(counts[split])]
    results = []
    with tqdm(total=len(jobs), desc="generating shapes dataset", unit="img", dynamic_ncols=True) as bar:
        if workers > 1:
            with _pool(workers) as pool:
                for result in pool.imap(_render_job, jobs, chunksize=8):  # imap keeps the job order
                    results.append(result)
                    bar.update()
        else:
            for job in jobs:
                results.append(_render_job(job))
                bar.update()
    start = 0
    for split in SPLITS:
        coco = _coco_json(split, results[start:start + counts[split]], seed)
        start += counts[split]
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # written last: marks a complete dataset


def _remove_stale_temps(root: Path) -> None:
    """Delete temporary folders left by killed generations (their process no longer exists)."""
    for path in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            os.kill(int(path.name.split("-")[-2]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def ensure_shapes_dataset(root, num_train: int = 2400, num_val: int = 400, seed: int = 0,
                          image_size=(160, 224), object_size=(16, 80), max_objects: int = 6,
                          empty_fraction: float = 0.05, workers: int = 2) -> dict:
    """Generate the shapes dataset under ``root`` unless an identical one is already there.

    Returns the paths: ``root``, ``manifest``, ``train_images``, ``val_images``, ``train_ann``, ``val_ann``.
    ``image_size`` and ``object_size`` are (min, max) pixel ranges (image height and width are drawn
    independently; object size is the longer box side).
    """
    image_size, object_size = [int(v) for v in image_size], [float(v) for v in object_size]
    if len(image_size) != 2 or not 0 < image_size[0] <= image_size[1]:
        raise UserError(f"shapes image_size={image_size} must be (min, max) with 0 < min <= max")
    if len(object_size) != 2 or not 2 <= object_size[0] <= object_size[1] <= image_size[0]:
        raise UserError(f"shapes object_size={object_size} must be (min, max) with 2 <= min <= max <= "
                        f"the smallest image side {image_size[0]}")
    if min(num_train, num_val) < 0 or max_objects < 0 or not 0 <= empty_fraction <= 1 or workers < 1:
        raise UserError(f"shapes: num_train={num_train}, num_val={num_val}, max_objects={max_objects} must be >= 0, "
                        f"empty_fraction={empty_fraction} in [0, 1], workers={workers} >= 1")
    root = Path(root).expanduser().absolute()
    paths = _paths(root)
    manifest = {"generator": "retinanet.data.shapes", "version": GENERATOR_VERSION, "params": {
        "num_train": int(num_train), "num_val": int(num_val), "seed": int(seed), "image_size": image_size,
        "object_size": object_size, "max_objects": int(max_objects), "empty_fraction": float(empty_fraction)}}
    current = _read_manifest(root)
    if current == manifest and all(os.path.exists(paths[k]) for k in ("train_ann", "val_ann")):
        return paths
    if root.exists() and any(root.iterdir()) and (current or {}).get("generator") != manifest["generator"]:
        raise UserError(f"{root} exists and is not a generated shapes dataset (no valid manifest.json); "
                        "refusing to overwrite it: point data.root at an empty or new folder")
    log.info("generating the shapes dataset in %s (%s)", root, "parameters changed" if current else "missing")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp, manifest, workers)
        if root.exists():  # a directory cannot be replaced in one step: move the old one aside first
            old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, root)
            except OSError:  # another process finished the same dataset first: keep it
                if _read_manifest(root) != manifest:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
