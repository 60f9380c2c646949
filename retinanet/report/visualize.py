"""Draw labelled boxes on an image with PIL (detections from inference, ground truth from inspection)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retinanet.data.coco import DatasetError
from retinanet.data.image_io import ImageReadError

log = logging.getLogger(__name__)

# well-separated colours, one per class (cycled)
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
CROWD_COLOR = (160, 160, 160)


def class_color(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def _text_color(rgb) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def draw_boxes(image, boxes, captions: Sequence[str], colors: Sequence[tuple], line_width: int | None = None
               ) -> Image.Image:
    """A copy of ``image`` (RGB array [H, W, 3] or PIL image) with ``boxes`` [N, 4] xyxy drawn, each with its caption
    on a filled tag above the box (inside the image when the box touches the top)."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8)) if not isinstance(image, Image.Image) else image.copy()
    im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    width = line_width or max(1, round(max(im.size) / 300))
    font = ImageFont.load_default()
    for box, caption, color in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), captions, colors):
        x1, y1, x2, y2 = box.tolist()
        draw.rectangle((x1, y1, x2, y2), outline=tuple(color), width=width)
        if not caption:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y1 - th if y1 - th >= 0 else y1
        draw.rectangle((x1, ty, x1 + tw, ty + th), fill=tuple(color))
        draw.text((x1 + 2 - left, ty + 2 - top), caption, fill=_text_color(color), font=font)
    return im


def draw_detections(image, detections: dict, class_names: Sequence[str], score_thresh: float = 0.3) -> Image.Image:
    """Detections ``{boxes [N, 4], scores [N], labels [N]}`` (original image pixels) above ``score_thresh``,
    captioned ``"<class> 0.87"``."""
    scores = np.asarray(detections["scores"], dtype=np.float64).reshape(-1)
    keep = scores >= score_thresh
    labels = np.asarray(detections["labels"]).reshape(-1)[keep]
    captions = [f"{class_names[k]} {s:.2f}" for k, s in zip(labels.tolist(), scores[keep].tolist())]
    return draw_boxes(image, np.asarray(detections["boxes"]).reshape(-1, 4)[keep], captions,
                      [class_color(k) for k in labels.tolist()])


def draw_ground_truth(image, boxes, labels, crowd, class_names: Sequence[str]) -> Image.Image:
    """Ground-truth boxes captioned with their class; crowd (ignore) regions in grey, captioned ``crowd``."""
    crowd = np.asarray(crowd, dtype=bool).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    captions = [f"{class_names[k]} (crowd)" if c else class_names[k] for k, c in zip(labels.tolist(), crowd.tolist())]
    colors = [CROWD_COLOR if c else class_color(k) for k, c in zip(labels.tolist(), crowd.tolist())]
    return draw_boxes(image, boxes, captions, colors)


def render_samples(dataset, out_dir: str | Path, num: int = 8) -> list[Path]:
    """The ground truth of ``num`` images (evenly spaced) drawn on them, saved as JPEG under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    written = []
    for i in sorted({int(round(v)) for v in np.linspace(0, n - 1, min(num, n))}) if n and num > 0 else []:
        try:
            image = dataset.load_image(i)
        except (ImageReadError, DatasetError) as err:
            log.warning("sample not rendered: %s", err)
            continue
        boxes, labels, crowd = dataset.annotations(i)
        path = out_dir / f"{i:05d}_{Path(dataset.image_path(i)).stem}.jpg"
        draw_ground_truth(image, boxes, labels, crowd, dataset.class_names).save(path, quality=90)
        written.append(path)
    return written
