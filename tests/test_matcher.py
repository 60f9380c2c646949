"""Matcher: hand-made cases (thresholds, ties, empty / padded / crowd gt) and parity with torchvision."""

import torch
from torchvision.models.detection._utils import Matcher as TvMatcher
from torchvision.ops import box_iou

from retinanet.anchors import AnchorGenerator
from retinanet.matcher import BACKGROUND, IGNORE, Matcher

ANCHORS = torch.tensor([
    [0.0, 0.0, 10.0, 10.0],
    [20.0, 0.0, 30.0, 10.0],
    [40.0, 40.0, 50.0, 50.0],
])


def batch(*images):
    """Pad lists of boxes into ``gt_boxes [B, M, 4]`` and ``gt_valid [B, M]``."""
    m = max(len(b) for b in images)
    boxes, valid = torch.zeros(len(images), m, 4), torch.zeros(len(images), m, dtype=torch.bool)
    for i, b in enumerate(images):
        if b:
            boxes[i, : len(b)] = torch.tensor(b, dtype=torch.float32)
            valid[i, : len(b)] = True
    return boxes, valid


def test_thresholds_exactly_at_05_and_04():
    # IoU with anchor 0: 0.5 exactly, 0.4 exactly, 0.39; the other anchors do not overlap
    boxes, valid = batch([[0, 0, 10, 5]], [[0, 0, 10, 4]], [[0, 0, 10, 3.9]])
    matched = Matcher(0.5, 0.4, allow_low_quality=False)(ANCHORS, boxes, valid)
    assert matched[:, 0].tolist() == [0, IGNORE, BACKGROUND]  # >= 0.5 fg, [0.4, 0.5) ignore, < 0.4 bg
    assert (matched[:, 1:] == BACKGROUND).all()
    for i in range(3):  # torchvision agrees
        assert torch.equal(matched[i], TvMatcher(0.5, 0.4)(box_iou(boxes[i], ANCHORS)))


def test_low_quality_match_and_ties_all_kept():
    # one gt straddling anchors 0 and 1 symmetrically: IoU 25 / 275 with both (< 0.4): both become fg
    boxes, valid = batch([[5, 0, 25, 10]])
    matched = Matcher()(ANCHORS, boxes, valid)
    assert matched[0].tolist() == [0, 0, BACKGROUND]
    assert Matcher(allow_low_quality=False)(ANCHORS, boxes, valid)[0].tolist() == [BACKGROUND] * 3


def test_zero_iou_gt_never_matches():
    boxes, valid = batch([[100, 100, 120, 120]])  # overlaps no anchor
    assert Matcher()(ANCHORS, boxes, valid)[0].tolist() == [BACKGROUND] * 3
    boxes, valid = batch([[100, 100, 120, 120], [40, 40, 50, 50]])
    assert Matcher()(ANCHORS, boxes, valid)[0].tolist() == [BACKGROUND, BACKGROUND, 1]


def test_no_ground_truth_and_all_padding():
    empty = torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)
    matched = Matcher()(ANCHORS, *empty)
    assert matched.shape == (2, 3) and matched.dtype == torch.int64 and (matched == BACKGROUND).all()
    boxes, valid = batch([[0, 0, 10, 10]], [])  # image 1 is all padding
    matched = Matcher()(ANCHORS, boxes, valid)
    assert matched.tolist() == [[0, BACKGROUND, BACKGROUND], [BACKGROUND] * 3]


def test_padded_gt_never_matches_even_if_it_overlaps():
    boxes, valid = batch([[0, 0, 10, 10], [40, 40, 50, 50]])
    valid[0, 1] = False  # a padding row that happens to hold a box equal to anchor 2
    assert Matcher()(ANCHORS, boxes, valid)[0].tolist() == [0, BACKGROUND, BACKGROUND]


def test_crowd_boxes_ignore_covered_background_and_are_never_targets():
    # gt 0 (normal) = anchor 0; gt 1 (crowd) covers anchor 1 fully and anchor 2 by 25% of its area
    boxes, valid = batch([[0, 0, 10, 10], [18, 0, 45, 45]])
    crowd = torch.tensor([[False, True]])
    matched = Matcher(crowd_ioa=0.5)(ANCHORS, boxes, valid, crowd)
    assert matched[0].tolist() == [0, IGNORE, BACKGROUND]
    assert Matcher(crowd_ioa=0.2)(ANCHORS, boxes, valid, crowd)[0].tolist() == [0, IGNORE, IGNORE]
    boxes, valid = batch([[20, 0, 30, 10]])  # a crowd box equal to anchor 1: still no fg
    assert Matcher()(ANCHORS, boxes, valid, torch.tensor([[True]]))[0].tolist() == [BACKGROUND, IGNORE, BACKGROUND]


def test_low_quality_anchor_goes_to_the_gt_it_is_best_for():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0]])
    # gt 0 = anchor 1 (IoU 1) and IoU 0.83 with anchor 0; gt 1's best anchor is anchor 0 (0.3 vs 0.25)
    boxes, valid = batch([[0, 0, 10, 10], [0, 0, 10, 40]])
    assert Matcher()(anchors, boxes, valid)[0].tolist() == [1, 0]


def random_scene(gen, n_images, n_gt, size=256):
    """Non-overlapping gt on a 4 x 4 grid of 64-pixel cells (random cells, sizes and positions)."""
    boxes = torch.zeros(n_images, n_gt, 4)
    for i in range(n_images):
        cells = torch.randperm(16, generator=gen)[:n_gt]
        wh = 8 + torch.rand(n_gt, 2, generator=gen) * 52
        xy = torch.stack([cells % 4, cells // 4], 1) * 64 + torch.rand(n_gt, 2, generator=gen) * (62 - wh)
        boxes[i] = torch.cat([xy, xy + wh], 1)
    return boxes


def test_matches_torchvision_on_random_boxes():
    gen = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32), offset=0.5)(
        [(32, 32), (16, 16), (8, 8)], (256, 256))
    boxes = random_scene(gen, n_images=4, n_gt=6)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 4:] = False  # padding at the end of image 1
    matched = Matcher(0.5, 0.4, allow_low_quality=True)(anchors, boxes, valid)
    tv = TvMatcher(0.5, 0.4, allow_low_quality_matches=True)
    for i in range(4):
        iou = box_iou(boxes[i][valid[i]], anchors)
        assert (iou.amax(dim=1) > 0).all()
        expected = tv(iou)  # BELOW_LOW_THRESHOLD = -1 = BACKGROUND, BETWEEN_THRESHOLDS = -2 = IGNORE
        assert torch.equal(matched[i], expected)
    assert (matched >= 0).sum() > 50 and (matched == IGNORE).any()
