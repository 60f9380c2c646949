"""Augmentation keeps boxes valid and attached to their objects; exact eval resize; batch collation."""

import pickle

import numpy as np
import pytest
import torch

from retinanet.data import Batch, Collate, build_transforms
from retinanet.data.transforms import resized_shape

COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)], np.uint8)


def random_scene(rng, with_boxes=True):
    """A black image with up to 5 non-overlapping filled rectangles; box i is painted COLOURS[i]."""
    h, w = (int(v) for v in rng.integers(40, 300, 2))
    image = np.zeros((h, w, 3), np.uint8)
    boxes = []
    for _ in range(int(rng.integers(1, 6)) if with_boxes else 0):
        bw, bh = rng.uniform(6, w / 2), rng.uniform(6, h / 2)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = np.array([x, y, x + bw, y + bh])
        if all(box[0] >= b[2] + 2 or box[2] <= b[0] - 2 or box[1] >= b[3] + 2 or box[3] <= b[1] - 2 for b in boxes):
            boxes.append(box)
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
        image[y0:y1, x0:x1] = COLOURS[i]
    boxes = np.round(boxes)  # painted pixels and boxes agree exactly
    labels = np.arange(len(boxes), dtype=np.int64)
    return image, boxes, labels, labels % 2 == 1


def test_train_transform_keeps_boxes_valid_and_attached():
    t = build_transforms(True, 128, color_jitter=0.0, scale_range=(0.6, 1.5), translate=0.3)
    rng = np.random.default_rng(0)
    n_boxes = n_dropped = 0
    for k in range(300):
        image, boxes, labels, crowd = random_scene(rng, with_boxes=k % 7 != 0)
        out_img, out_boxes, out_labels, out_crowd = t(image, boxes, labels, crowd)
        h, w = out_img.shape[:2]
        assert max(h, w) == 128 and out_img.dtype == np.uint8 and out_img.flags.c_contiguous
        assert out_boxes.dtype == np.float32 and out_labels.dtype == np.int64 and out_crowd.dtype == bool
        assert out_boxes.shape == (len(out_labels), 4) and out_crowd.shape == out_labels.shape
        assert (out_boxes >= 0).all() and (out_boxes[:, [0, 2]] <= w).all() and (out_boxes[:, [1, 3]] <= h).all()
        assert (out_boxes[:, 2:] - out_boxes[:, :2] >= 1.0).all()
        assert set(out_labels.tolist()) <= set(labels.tolist())
        np.testing.assert_array_equal(out_crowd, out_labels % 2 == 1)  # crowd flags follow their boxes
        for box, label in zip(out_boxes, out_labels):
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            assert np.abs(out_img[cy, cx].astype(int) - COLOURS[label]).max() < 60, "box lost its object"
        n_boxes += len(boxes)
        n_dropped += len(boxes) - len(out_boxes)
    assert 0 < n_dropped < 0.3 * n_boxes  # crops do remove some boxes, not most


def test_augmentations_really_happen():
    t = build_transforms(True, 100, hflip_prob=0.5, scale_range=(0.8, 1.2), translate=0.1, color_jitter=0.2)
    image = np.zeros((100, 100, 3), np.uint8)
    image[20:40, 10:30] = 200
    boxes = np.array([[10, 20, 30, 40]], np.float32)
    outs = [t(image, boxes, [0], [False]) for _ in range(40)]
    lefts = np.array([o[1][0, 0] for o in outs if len(o[1])])
    assert (lefts > 50).any() and (lefts < 50).any()  # flipped and not flipped
    assert len({round(float(o[1][0, 2] - o[1][0, 0]), 2) for o in outs if len(o[1])}) > 10  # zoom varies
    assert len({int(o[0][30, 20].sum()) for o in outs}) > 5  # colours vary


def test_eval_transform_is_an_exact_resize():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (100, 200, 3), dtype=np.uint8)
    boxes = np.array([[10, 20, 30, 40], [0, 0, 200, 100]], np.float32)
    t = build_transforms(False, 160)
    for _ in range(3):  # deterministic
        out, out_boxes, labels, crowd = t(image, boxes, [3, 4], [False, True])
        assert out.shape == (80, 160, 3)
        np.testing.assert_allclose(out_boxes, boxes * 0.8, rtol=1e-6)
        assert labels.tolist() == [3, 4] and crowd.tolist() == [False, True]
    small = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)  # smaller images are enlarged
    out, out_boxes, _, _ = t(small, np.array([[2, 3, 10, 30]]), [0], [False])
    assert out.shape == (160, 107, 3)
    np.testing.assert_allclose(out_boxes, [[2 * 107 / 20, 3 * 160 / 30, 10 * 107 / 20, 160]], rtol=1e-6)
    # detectron rule: shorter side -> min_size unless the longer side would exceed max_size
    coco = build_transforms(False, min_size=800, max_size=1333)
    out, out_boxes, _, _ = coco(np.zeros((480, 640, 3), np.uint8), np.array([[64, 48, 640, 480]]), [0], [False])
    assert out.shape == (800, 1067, 3)
    np.testing.assert_allclose(out_boxes, [[64 * 1067 / 640, 48 * 800 / 480, 1067, 800]], rtol=1e-6)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)
    assert resized_shape(50, 60, None, None) == (50, 60)


def test_empty_images_and_pickling():
    for train in (True, False):
        t = pickle.loads(pickle.dumps(build_transforms(train, 64)))
        image = np.full((50, 70, 3), 9, np.uint8)
        out, boxes, labels, crowd = t(image, np.zeros((0, 4)), [], [])
        assert out.shape == (46, 64, 3) and boxes.shape == (0, 4) and labels.shape == (0,) and crowd.shape == (0,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="either size or min_size"):
        build_transforms(False, 100, min_size=100)
    with pytest.raises(ValueError, match="scale_range"):
        build_transforms(True, 100, scale_range=(1.2, 0.8))


class _SameScene(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, i):
        image = np.zeros((64, 64, 3), np.uint8)
        return self.transform(image, np.array([[8, 8, 40, 40]], np.float32), [0], [False])[1]


def test_random_state_per_worker_and_reproducible():
    def draws(num_workers, seed):
        t = build_transforms(True, 64, hflip_prob=0.5, scale_range=(0.5, 1.5), translate=0.2)
        loader = torch.utils.data.DataLoader(_SameScene(t), batch_size=None, num_workers=num_workers,
                                             generator=torch.Generator().manual_seed(seed))
        return [b.tolist() for b in loader]

    first = draws(2, 0)
    assert first[0] != first[1]  # workers 0 and 1 do not repeat each other's draws
    assert draws(2, 0) == first  # a seeded loader repeats
    torch.manual_seed(3)
    a = draws(0, 0)
    torch.manual_seed(3)
    assert draws(0, 0) == a and a[0] != a[1]


def sample(h, w, n, image_id, fill):
    return {"image": np.full((h, w, 3), fill, np.uint8), "boxes": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
            "labels": np.arange(n, dtype=np.int64), "crowd": np.arange(n) == 0, "image_id": image_id,
            "orig_size": (2 * h, 2 * w), "scale": (0.5, 0.5)}


def test_collate_shapes_padding_and_metadata():
    batch = Collate(size_divisible=128)([sample(100, 130, 2, 7, 5), sample(129, 60, 0, 8, 6), sample(20, 20, 3, 9, 7)])
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.images.shape == (3, 3, 256, 256) and batch.images.dtype == torch.uint8
    assert (batch.images[0, :, :100, :130] == 5).all() and batch.images[0, :, 100:].sum() == 0
    assert batch.images[0, :, :, 130:].sum() == 0 and (batch.images[1, :, :129, :60] == 6).all()
    assert batch.images[1].sum() == 6 * 3 * 129 * 60
    assert batch.gt_boxes.shape == (3, 3, 4) and batch.gt_boxes.dtype == torch.float32
    assert batch.gt_labels.tolist() == [[0, 1, -1], [-1, -1, -1], [0, 1, 2]]
    assert batch.gt_crowd.tolist() == [[True, False, False], [False] * 3, [True, False, False]]
    assert batch.gt_boxes[0, 1].tolist() == [4, 5, 6, 7] and batch.gt_boxes[0, 2].abs().sum() == 0
    assert batch.gt_boxes[1].abs().sum() == 0
    assert batch.image_ids.tolist() == [7, 8, 9] and batch.image_ids.dtype == torch.int64
    assert batch.image_sizes.tolist() == [[100, 130], [129, 60], [20, 20]]
    assert batch.orig_sizes.tolist() == [[200, 260], [258, 120], [40, 40]]
    assert batch.scales.dtype == torch.float32 and batch.scales.tolist() == [[0.5, 0.5]] * 3
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.images, batch.images)


def test_collate_divisibility_and_all_empty():
    batch = Collate(size_divisible=32)([sample(33, 64, 0, 1, 1), sample(10, 65, 0, 2, 1)])
    assert batch.images.shape == (2, 3, 64, 96)
    assert batch.gt_boxes.shape == (2, 1, 4) and batch.gt_labels.tolist() == [[-1], [-1]]  # M >= 1
    exact = Collate(size_divisible=1)([sample(33, 61, 1, 1, 1)])
    assert exact.images.shape == (1, 3, 33, 61)
    with pytest.raises(ValueError, match="size_divisible=0"):
        Collate(0)
