"""pycocotools against faster-coco-eval on one synthetic evaluation: seconds of ``coco_evaluate`` and the numbers.

A validation set of ``--images`` images (640 x 480, 1-15 objects of ``--classes`` classes each) and
``--dets`` detections per image: jittered copies of the objects (some with the wrong class) and
low-scored random boxes, like a detector's top-100 output. Each backend evaluates the same results
``--repeat`` times (the best time is reported); the 12 numbers must agree to 1e-6.

Example:
    python benchmarks/coco_eval_backends.py                      # 500 images x 100 detections
    python benchmarks/coco_eval_backends.py --images 5000 --repeat 1
"""

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pycocotools.coco import COCO  # noqa: E402

from retinanet.evaluation import STAT_NAMES, coco_evaluate  # noqa: E402


def synthetic(images: int, dets: int, classes: int, seed: int = 0) -> tuple[COCO, list[dict]]:
    """(ground truth, COCO results) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    w, h = 640, 480
    data = {"images": [{"id": i + 1, "width": w, "height": h, "file_name": f"{i}.png"} for i in range(images)],
            "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(classes)], "annotations": []}
    results = []
    for img in data["images"]:
        n = int(rng.integers(1, 16))
        xy = rng.uniform(0, [w - 20, h - 20], (n, 2))
        wh = np.minimum(rng.uniform(8, 250, (n, 2)), [w, h] - xy)
        cats = rng.integers(1, classes + 1, n)
        for box, cat in zip(np.concatenate([xy, wh], 1).tolist(), cats.tolist()):
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": img["id"], "category_id": cat,
                                        "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        copies = rng.integers(0, n, min(dets // 2, 3 * n))  # near the objects ...
        jitter = rng.normal(0, 0.1, (len(copies), 4)) * np.concatenate([wh[copies], wh[copies]], 1)
        near = np.concatenate([xy[copies], wh[copies]], 1) + jitter
        near_cats = np.where(rng.random(len(copies)) < 0.85, cats[copies], rng.integers(1, classes + 1, len(copies)))
        far_n = dets - len(copies)  # ... and anywhere, scored low
        far = np.concatenate([rng.uniform(0, [w - 20, h - 20], (far_n, 2)), rng.uniform(8, 200, (far_n, 2))], 1)
        boxes = np.concatenate([near, far]).round(2)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        scores = np.concatenate([rng.uniform(0.2, 1.0, len(copies)), rng.uniform(0.05, 0.4, far_n)]).round(5)
        labels = np.concatenate([near_cats, rng.integers(1, classes + 1, far_n)])
        for box, score, cat in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": img["id"], "category_id": int(cat), "bbox": box, "score": float(score)})
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500, help="validation images (default: %(default)s)")
    p.add_argument("--dets", type=int, default=100, help="detections per image (default: %(default)s)")
    p.add_argument("--classes", type=int, default=10, help="classes (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="evaluations per backend; the best is shown (%(default)s)")
    args = p.parse_args(argv)
    gt, results = synthetic(args.images, args.dets, args.classes)
    print(f"{args.images} images, {len(gt.dataset['annotations'])} objects, {len(results)} detections, "
          f"{args.classes} classes")
    seconds, stats = {}, {}
    for backend in ("pycocotools", "faster_coco_eval"):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            stats[backend] = coco_evaluate(gt, results, backend=backend)["stats"]
            times.append(time.perf_counter() - t0)
        seconds[backend] = min(times)
        print(f"{backend:<17} {seconds[backend]:7.2f} s  (AP {stats[backend]['AP']:.4f}, AP50 {stats[backend]['AP50']:.4f})")
    worst = max(abs(stats["pycocotools"][k] - stats["faster_coco_eval"][k]) for k in STAT_NAMES)
    print(f"speed-up {seconds['pycocotools'] / seconds['faster_coco_eval']:.1f}x; largest difference of the 12 "
          f"numbers {worst:.1e}")
    if worst > 1e-6:
        raise SystemExit("the backends disagree")


if __name__ == "__main__":
    main()
