"""Box formats, clipping, IoU and the delta coder (golden values and torchvision parity)."""

import math
import subprocess
import sys

import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder as TvBoxCoder
from torchvision.ops import box_iou

from retinanet.boxes import BoxCoder, clip_boxes, pairwise_iou, xywh_to_xyxy, xyxy_to_xywh


def random_boxes(n, size=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_format_conversions():
    xyxy = torch.tensor([[1.0, 2.0, 11.0, 22.0]])
    xywh = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    assert torch.equal(xyxy_to_xywh(xyxy), xywh)
    assert torch.equal(xywh_to_xyxy(xywh), xyxy)
    assert torch.equal(xyxy, torch.tensor([[1.0, 2.0, 11.0, 22.0]]))  # the input is left as it was


def test_format_conversions_keep_the_kind_and_dtype():
    xyxy = random_boxes(50, seed=3).double()
    for boxes in (xyxy, xyxy.float(), xyxy.numpy(), xyxy.float().numpy()):
        xywh = xyxy_to_xywh(boxes)
        assert type(xywh) is type(boxes) and xywh.dtype == boxes.dtype and xywh.shape == boxes.shape
        back = xywh_to_xyxy(xywh)
        assert type(back) is type(boxes) and back.dtype == boxes.dtype
        # the same arithmetic as written out by hand, to the bit: x2 - x1, then x + w
        expected = np.concatenate([np.asarray(boxes)[:, :2], np.asarray(boxes)[:, 2:] - np.asarray(boxes)[:, :2]], 1)
        assert np.array_equal(np.asarray(xywh), expected)
        assert np.array_equal(np.asarray(back), np.concatenate([expected[:, :2], expected[:, :2] + expected[:, 2:]], 1))
    assert xywh_to_xyxy([[1, 2, 10, 20]]).tolist() == [[1.0, 2.0, 11.0, 22.0]]  # a list -> a float64 array
    assert xyxy_to_xywh(np.zeros((0, 4), np.float32)).shape == (0, 4)
    assert xyxy_to_xywh(np.array([1.0, 2.0, 11.0, 22.0])).tolist() == [1.0, 2.0, 10.0, 20.0]  # one box


def test_format_conversions_do_not_load_torch():
    """numpy-only code (the shapes generator's workers, the converters) converts boxes without importing torch."""
    code = ("import sys; import retinanet.boxes as b, retinanet.data.shapes, retinanet.data.convert; "
            "assert b.xyxy_to_xywh([[1, 2, 3, 5]]).tolist() == [[1, 2, 2, 3]]; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_clip_boxes_single_and_batched():
    boxes = torch.tensor([[-5.0, -1.0, 50.0, 70.0], [10.0, 10.0, 20.0, 20.0]])
    assert torch.equal(clip_boxes(boxes, (60, 40)), torch.tensor([[0.0, 0.0, 40.0, 60.0], [10.0, 10.0, 20.0, 20.0]]))
    batch = torch.stack([boxes, boxes])  # [2, 2, 4]
    hw = torch.tensor([[60, 40], [15, 100]])  # [2, 2] (h, w)
    out = clip_boxes(batch, hw[:, None, :])
    assert torch.equal(out[1], torch.tensor([[0.0, 0.0, 50.0, 15.0], [10.0, 10.0, 20.0, 15.0]]))


def test_pairwise_iou_matches_torchvision_and_broadcasts():
    a, b = random_boxes(7, seed=1), random_boxes(5, seed=2)
    assert torch.equal(pairwise_iou(a, b), box_iou(a, b))
    batched = pairwise_iou(torch.stack([a, a.flip(0)]), b)  # [2, 7, 4] x [5, 4] -> [2, 7, 5]
    assert batched.shape == (2, 7, 5)
    assert torch.equal(batched[1], box_iou(a.flip(0), b))
    half = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 5.0]])
    assert pairwise_iou(*half).item() == 0.5


def test_encode_golden_values():
    anchor = torch.tensor([0.0, 0.0, 10.0, 10.0])  # centre (5, 5), 10 x 10
    gt = torch.tensor([5.0, 5.0, 15.0, 25.0])  # centre (10, 15), 10 x 20
    expected = torch.tensor([0.5, 1.0, 0.0, math.log(2.0)])
    torch.testing.assert_close(BoxCoder().encode(anchor, gt), expected)
    torch.testing.assert_close(BoxCoder((10, 10, 5, 5)).encode(anchor, gt), expected * torch.tensor([10, 10, 5, 5]))


def test_round_trip():
    anchors, gt = random_boxes(200, seed=3), random_boxes(200, seed=4)
    for coder in (BoxCoder(), BoxCoder((10.0, 10.0, 5.0, 5.0))):
        torch.testing.assert_close(coder.decode(coder.encode(anchors, gt), anchors), gt, atol=1e-4, rtol=0)


def test_broadcasting_encode_decode():
    anchors, gt = random_boxes(6, seed=5), random_boxes(3, seed=6)
    coder = BoxCoder()
    deltas = coder.encode(anchors[None, :, :], gt[:, None, :])  # [1, 6, 4] x [3, 1, 4] -> [3, 6, 4]
    assert deltas.shape == (3, 6, 4)
    torch.testing.assert_close(deltas[2, 4], coder.encode(anchors[4], gt[2]))


def test_matches_torchvision_box_coder():
    anchors, gt = random_boxes(300, seed=7), random_boxes(300, seed=8)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        ours, tv = BoxCoder(weights), TvBoxCoder(weights=weights)
        deltas = ours.encode(anchors, gt)
        torch.testing.assert_close(deltas, tv.encode_single(gt, anchors), rtol=1e-6, atol=1e-6)
        noisy = deltas + torch.randn(deltas.shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours.decode(noisy, anchors), tv.decode_single(noisy, anchors), rtol=1e-6, atol=1e-5)


def test_decode_clamps_width_and_height():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 8.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, 1e4]])  # exp would overflow without the clamp
    box = BoxCoder().decode(deltas, anchor)[0]
    assert torch.isfinite(box).all()
    torch.testing.assert_close(box[2] - box[0], torch.tensor(1000.0))  # 16 * 1000 / 16
    torch.testing.assert_close(box[3] - box[1], torch.tensor(500.0))  # 8 * 1000 / 16
    torch.testing.assert_close((box[0] + box[2]) / 2, torch.tensor(8.0))  # centre unchanged
    small = BoxCoder(clamp=math.log(2.0)).decode(deltas, anchor)[0]
    torch.testing.assert_close(small[2] - small[0], torch.tensor(32.0))
    shrink = BoxCoder().decode(torch.tensor([[0.0, 0.0, -100.0, 0.0]]), anchor)[0]  # no lower clamp
    assert 0 <= shrink[2] - shrink[0] < 1e-6
