"""Anchors: hand-computed golden boxes, ordering, caching and parity with torchvision."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TvAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retinanet.anchors import AnchorGenerator

R2 = 2**0.5  # ratio 0.5: w = 32 * sqrt(2), h = 32 / sqrt(2); ratio 2: the transpose


def one_level(**kw):
    return AnchorGenerator(sizes=(32,), strides=(32,), scales=(1.0,), aspect_ratios=(0.5, 1.0, 2.0), **kw)


def test_golden_tiny_image_offset_zero():
    anchors = one_level(offset=0.0)([(2, 2)], (64, 64))
    assert anchors.shape == (2 * 2 * 3, 4) and anchors.dtype == torch.float32
    expected = {
        0: [-16 * R2, -8 * R2, 16 * R2, 8 * R2],  # cell (y=0, x=0), ratio 0.5 (wide)
        1: [-16, -16, 16, 16],  # cell (0, 0), ratio 1
        2: [-8 * R2, -16 * R2, 8 * R2, 16 * R2],  # cell (0, 0), ratio 2 (tall)
        4: [16, -16, 48, 16],  # cell (0, 1): centre (32, 0), ratio 1
        7: [-16, 16, 16, 48],  # cell (1, 0): centre (0, 32), ratio 1
        11: [32 - 8 * R2, 32 - 16 * R2, 32 + 8 * R2, 32 + 16 * R2],  # cell (1, 1): centre (32, 32), ratio 2
    }
    for i, box in expected.items():
        torch.testing.assert_close(anchors[i], torch.tensor(box, dtype=torch.float32))


def test_golden_tiny_image_centred_and_rounded():
    centred = one_level(offset=0.5)([(2, 2)], (64, 64))
    torch.testing.assert_close(centred[1], torch.tensor([0.0, 0.0, 32.0, 32.0]))  # centre (16, 16)
    torch.testing.assert_close(centred[10], torch.tensor([32.0, 32.0, 64.0, 64.0]))  # cell (1, 1), centre (48, 48)
    areas = (centred[:, 2] - centred[:, 0]) * (centred[:, 3] - centred[:, 1])
    torch.testing.assert_close(areas, torch.full((12,), 1024.0))
    rounded = one_level(round_cell_anchors=True)([(2, 2)], (64, 64))
    torch.testing.assert_close(rounded[0], torch.tensor([-23.0, -11.0, 23.0, 11.0]))  # 22.63 -> 23, 11.31 -> 11
    torch.testing.assert_close(rounded[5], torch.tensor([32.0 - 11, -23.0, 32.0 + 11, 23.0]))


def test_order_ratio_major_scale_minor_row_major_level_major():
    gen = AnchorGenerator(sizes=(8, 16), strides=(4, 8), scales=(1.0, 2.0), aspect_ratios=(1.0, 4.0))
    anchors = gen([(2, 3), (1, 2)], (8, 12))
    assert gen.num_anchors_per_location == 4
    assert gen.num_anchors_per_level([(2, 3), (1, 2)]) == [24, 8]
    assert anchors.shape == (32, 4)
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    # a = r * n_scales + s: (r=1, s=1), (r=1, s=2), (r=4, s=1), (r=4, s=2); h/w = r, area = (size*s)^2
    torch.testing.assert_close(w[:4], torch.tensor([8.0, 16.0, 4.0, 8.0]))
    torch.testing.assert_close(h[:4], torch.tensor([8.0, 16.0, 16.0, 32.0]))
    torch.testing.assert_close(w[24:28], 2 * w[:4])  # level 2 starts at 2*3*4 with size 16
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    # locations row-major: (y, x) = (0,0), (0,1), (0,2), (1,0), ... each repeated for the 4 anchors
    torch.testing.assert_close(cx[:24:4], torch.tensor([0.0, 4, 8, 0, 4, 8]))
    torch.testing.assert_close(cy[:24:4], torch.tensor([0.0, 0, 0, 4, 4, 4]))
    torch.testing.assert_close(cx[24::4], torch.tensor([0.0, 8.0]))


@pytest.mark.parametrize("image_hw", [(256, 384), (200, 300)])
def test_matches_torchvision_anchor_generator(image_hw):
    sizes, scales, ratios = (32, 64, 128, 256, 512), (1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.5, 1.0, 2.0)
    ours = AnchorGenerator(sizes=sizes, scales=scales, aspect_ratios=ratios, offset=0.0,
                           round_cell_anchors=True, strides_from_image=True)
    tv = TvAnchorGenerator(tuple(tuple(s * k for k in scales) for s in sizes), (ratios,) * len(sizes))
    h, w = image_hw
    shapes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]  # ceil: 200 x 300 gives strides 8 x 7 ...
    images = ImageList(torch.zeros(2, 3, h, w), [(h, w), (h - 10, w - 20)])
    features = [torch.zeros(2, 4, fh, fw) for fh, fw in shapes]
    expected = tv(images, features)
    got = ours(shapes, (h, w), "cpu")
    assert torch.equal(got, expected[0]) and torch.equal(got, expected[1])


def test_cache_returns_same_tensor_and_is_bounded():
    gen = AnchorGenerator(sizes=(32,), strides=(32,), cache_size=2)
    first = gen([(2, 2)], (64, 64), "cpu")
    assert gen([(2, 2)], (64, 64), torch.device("cpu")) is first
    assert gen([(2, 2)], (64, 64), "cpu", torch.float64).dtype == torch.float64
    gen([(3, 3)], (96, 96), "cpu")
    assert len(gen._cache) == 2
    assert gen([(2, 2)], (64, 64), "cpu") is not first  # evicted (least recently used), rebuilt
    assert torch.equal(gen([(2, 2)], (64, 64), "cpu"), first)


def test_wrong_number_of_levels_is_a_clear_error():
    with pytest.raises(ValueError, match="5 levels"):
        AnchorGenerator()([(8, 8), (4, 4)], (64, 64))
