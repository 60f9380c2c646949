"""PostProcessor: empty output, top-100, class-wise NMS, rescaling, parity with torchvision RetinaNet."""

import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet

from retinanet.anchors import AnchorGenerator
from retinanet.postprocess import PostProcessor


def outputs(logits, deltas=None):
    """``logits [A, K]`` for one image -> ``cls_logits [1, A, K]``, zero ``box_deltas [1, A, 4]``."""
    deltas = torch.zeros(logits.shape[0], 4) if deltas is None else deltas
    return logits[None], deltas[None]


def test_no_detections_gives_typed_empty_tensors():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    cls, box = outputs(torch.full((2, 3), -20.0))
    dets = PostProcessor()(cls.expand(2, -1, -1), box.expand(2, -1, -1), anchors, [2], torch.tensor([[32, 32]] * 2),
                           torch.ones(2, 2))
    assert len(dets) == 2
    for det in dets:
        assert det["boxes"].shape == (0, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (0,) and det["scores"].dtype == torch.float32
        assert det["labels"].shape == (0,) and det["labels"].dtype == torch.int64


def test_keeps_exactly_100_best_sorted_by_score():
    gen = AnchorGenerator(sizes=(8,), strides=(16,), scales=(1.0,), aspect_ratios=(1.0,), offset=0.5)
    anchors = gen([(16, 16)], (256, 256))  # 256 disjoint 8 x 8 boxes
    logits = torch.rand(256, 2, generator=torch.Generator().manual_seed(0)) * 4  # 512 candidates, all > 0.5
    det = PostProcessor()(*outputs(logits), anchors, [256], torch.tensor([[256, 256]]))[0]
    assert len(det["scores"]) == 100
    assert (det["scores"][:-1] >= det["scores"][1:]).all()
    torch.testing.assert_close(det["scores"], torch.sigmoid(logits).flatten().topk(100).values)


def test_nms_is_class_wise():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [40.0, 40.0, 50.0, 50.0]])  # IoU(0, 1) = 0.82
    logits = torch.tensor([[3.0, -9.0], [-9.0, 2.0], [-9.0, -9.0]])  # anchor 0 class 0, anchor 1 class 1
    det = PostProcessor()(*outputs(logits), anchors, [3], torch.tensor([[64, 64]]))[0]
    assert det["labels"].tolist() == [0, 1]
    torch.testing.assert_close(det["boxes"], anchors[:2])
    logits[1] = torch.tensor([2.0, -9.0])  # same class now: the weaker box is suppressed
    det = PostProcessor()(*outputs(logits), anchors, [3], torch.tensor([[64, 64]]))[0]
    assert det["labels"].tolist() == [0] and torch.equal(det["boxes"], anchors[:1])


def test_clip_and_map_back_to_original_coordinates():
    anchors = torch.tensor([[10.0, 20.0, 30.0, 60.0], [-4.0, 50.0, 20.0, 90.0]])
    logits = torch.tensor([[5.0], [4.0]])
    cls, box = outputs(logits)
    sizes = torch.tensor([[80, 100]])  # resized (h, w); anchor 1 sticks out at the left and bottom
    det = PostProcessor()(cls, box, anchors, [2], sizes, torch.tensor([[0.5, 2.0]]))[0]  # (sy, sx)
    # x / sx, y / sy; original image is 80 / 0.5 = 160 high and 100 / 2 = 50 wide
    expected = torch.tensor([[5.0, 40.0, 15.0, 120.0], [0.0, 100.0, 10.0, 160.0]])
    torch.testing.assert_close(det["boxes"], expected)
    same_scale = PostProcessor()(cls, box, anchors, [2], sizes, torch.tensor([2.0]))[0]  # [B] form
    torch.testing.assert_close(same_scale["boxes"], torch.tensor([[5.0, 10.0, 15.0, 30.0], [0.0, 25.0, 10.0, 40.0]]))
    resized = PostProcessor()(cls, box, anchors, [2], sizes)[0]  # no scales: resized coordinates
    torch.testing.assert_close(resized["boxes"], torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 50.0, 20.0, 80.0]]))


class _Backbone(nn.Module):
    out_channels = 8


def test_matches_torchvision_postprocess_detections():
    k, shapes, image = 5, [(16, 16), (8, 8), (4, 4)], (128, 128)
    gen = AnchorGenerator(sizes=(16, 32, 64), strides=(8, 16, 32), round_cell_anchors=True, strides_from_image=True)
    anchors = gen(shapes, image)
    per_level = gen.num_anchors_per_level(shapes)
    g = torch.Generator().manual_seed(0)
    cls_logits = torch.randn(2, len(anchors), k, generator=g) * 2 - 2
    box_deltas = torch.randn(2, len(anchors), 4, generator=g) * 0.2
    sizes = [(120, 128), (128, 100)]
    ours = PostProcessor(score_thresh=0.05, topk_candidates=300, nms_thresh=0.5, detections_per_img=50)(
        cls_logits, box_deltas, anchors, per_level, torch.tensor(sizes))

    tv = RetinaNet(_Backbone(), num_classes=k, score_thresh=0.05, nms_thresh=0.5, detections_per_img=50,
                   topk_candidates=300)
    head = {"cls_logits": list(cls_logits.split(per_level, dim=1)),
            "bbox_regression": list(box_deltas.split(per_level, dim=1))}
    expected = tv.postprocess_detections(head, [list(anchors.split(per_level))] * 2, sizes)
    for got, exp in zip(ours, expected):
        assert len(got["scores"]) == len(exp["scores"]) == 50
        order_got, order_exp = got["scores"].argsort(descending=True), exp["scores"].argsort(descending=True)
        torch.testing.assert_close(got["scores"][order_got], exp["scores"][order_exp], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["boxes"][order_got], exp["boxes"][order_exp], rtol=0, atol=1e-4)
        assert torch.equal(got["labels"][order_got], exp["labels"][order_exp])


def test_an_image_gives_the_same_detections_in_any_batch_and_equal_scores_keep_index_order():
    """bf16 logits take few values: many candidates score exactly the same. An image's detections are the same
    tensors alone or beside another image (NMS runs per image), and equal scores come in (anchor, class) order, also
    where NMS must pick one of two overlapping boxes of equal score (the lower index wins)."""
    gen = AnchorGenerator(sizes=(8,), strides=(4,), scales=(1.0,), aspect_ratios=(1.0,), offset=0.5)
    anchors = gen([(16, 16)], (64, 64))  # 256 boxes 8 x 8, 4 px apart: neighbours overlap at IoU 1/3, ...
    rand = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 4, (256, 3), generator=rand) * 0.5 - 1).bfloat16().float()  # 4 values only
    other = torch.randn(256, 3, generator=rand) * 4
    deltas = torch.zeros(256, 4)  # each box is its anchor: the index of a detection can be read from its box
    post = PostProcessor(score_thresh=0.05, nms_thresh=0.3, detections_per_img=60)
    alone = post(logits[None], deltas[None], anchors, [256], torch.tensor([[64, 64]]))[0]
    for batch in ((logits, other), (other, logits, other)):
        index = [i for i, x in enumerate(batch) if x is logits][0]
        dets = post(torch.stack(batch), torch.stack([deltas] * len(batch)), anchors, [256],
                    torch.tensor([[64, 64]] * len(batch)))
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(dets[index][key], alone[key])
    assert len(alone["scores"]) == 60 and len(set(alone["scores"].tolist())) < 5  # cut among equal scores
    # among equal scores, the (anchor, class) index increases; the boxes are those of the candidates so ordered
    centers = ((alone["boxes"][:, :2] + alone["boxes"][:, 2:]) / 2 / 4 - 0.5).round().long()  # anchor cell (x, y)
    keys = (centers[:, 1] * 16 + centers[:, 0]) * 3 + alone["labels"]
    for s in set(alone["scores"].tolist()):
        same = keys[alone["scores"] == s].tolist()
        assert same == sorted(same)
