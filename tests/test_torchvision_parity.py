"""Our RetinaNet with the torchvision presets equals torchvision's RetinaNet (v1 and v2), weights converted.

torchvision models are random-initialised (nothing downloaded), with random batch-norm statistics,
affine and bias terms, so every converted tensor matters; v1 gets the frozen BN (eps 0) that torchvision
builds for its COCO weights. Both models see the same normalised, padded batch; torchvision's resize
is bypassed (identity). Images are small (96 x 160) but not multiples of 128, so the P6 / P7 stride
quirk is exercised.
"""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops.misc import FrozenBatchNorm2d

from retinanet.anchors import AnchorGenerator
from retinanet.model.head import Subnet
from retinanet.torchvision_weights import (
    convert_torchvision_state_dict,
    load_torchvision_weights,
    select_classes,
    torchvision_variant,
)

from conftest import compose_train

K = 20  # classes (kept small: the class predictor dominates the head's cost)
HW = (96, 160)  # P6 / P7 are 2 x 3 and 1 x 2: torchvision's strides become 48 x 53 and 96 x 80
BUILDERS = {"v1": retinanet_resnet50_fpn, "v2": retinanet_resnet50_fpn_v2}


def randomise(tv: nn.Module, variant: str) -> None:
    """Random BN statistics and affine terms, head biases and class priors, so every tensor matters.

    v1: the backbone's BN becomes ``FrozenBatchNorm2d`` with eps 0, as torchvision builds it for its
    COCO weights (v2 keeps ``BatchNorm2d``, as torchvision does).
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.05, generator=g)
        tv.head.classification_head.cls_logits.bias.normal_(-2.5, 0.5, generator=g)  # some scores above 0.05
        tv.head.classification_head.cls_logits.weight.mul_(0.1)  # random features are large: keep scores unsaturated
        tv.head.regression_head.bbox_reg.weight.mul_(0.1)  # and deltas moderate
    if variant == "v1":
        freeze_batch_norm(tv.backbone.body)
        overwrite_eps(tv, 0.0)


def freeze_batch_norm(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` with the same tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


@pytest.fixture(scope="module", params=["v1", "v2"])
def pair(request):
    """torchvision model, our converted model (preset + strides quirk), shared inputs and both outputs."""
    variant = request.param
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, *HW), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    tv = BUILDERS[variant](weights=None, weights_backbone=None, num_classes=K).eval()
    tv.detections_per_img = 300  # torchvision's default, also set explicitly: our preset test overrides ours to it
    randomise(tv, variant)

    cfg = compose_train([f"model=torchvision_{variant}", f"loss=torchvision_{variant}",
                         "model.anchors.strides_from_image=true", "postprocess.detections_per_img=300"])
    ours = instantiate(cfg.model.net, num_classes=K, num_anchors=9).eval()
    assert load_torchvision_weights(ours, tv.state_dict()) == variant
    normalised = ours.normalize(images)  # [B, 3, H, W]: the shared input of torchvision's backbone
    with torch.no_grad():
        features = list(tv.backbone(normalised).values())
        tv_head = tv.head(features)
        out = ours(images)
    tv_anchors = tv.anchor_generator(ImageList(normalised, [HW] * 2), features)
    return dict(variant=variant, tv=tv, ours=ours, cfg=cfg, images=images, tv_head=tv_head, tv_anchors=tv_anchors,
                out=out, anchors=instantiate(cfg.model.anchors))


def test_raw_logits_and_deltas_agree(pair):
    out, tv_head = pair["out"], pair["tv_head"]
    assert out.cls_logits.shape == tv_head["cls_logits"].shape == (2, 9 * (12 * 20 + 6 * 10 + 3 * 5 + 2 * 3 + 1 * 2), K)
    assert out.cls_logits.std() > 0.3 and out.box_deltas.std() > 0.03  # outputs carry signal, not just the prior
    torch.testing.assert_close(out.cls_logits, tv_head["cls_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.box_deltas, tv_head["bbox_regression"], rtol=0, atol=1e-5)


def test_input_normalisation_matches_torchvision(pair):
    """Same ImageNet mean / std; only float rounding differs (a random-weight ResNet-50 amplifies it to
    ~5e-5 in the logits, so the other tests feed both models the same normalised tensor)."""
    tv, images = pair["tv"], pair["images"]
    theirs = torch.stack([tv.transform.normalize(img.float() / 255) for img in images])
    torch.testing.assert_close(pair["ours"].normalize(images), theirs, rtol=0, atol=1e-6)


def test_anchors_agree_exactly(pair):
    anchors = pair["anchors"](pair["out"].feature_shapes, HW, "cpu")
    assert torch.equal(anchors, pair["tv_anchors"][0]) and torch.equal(anchors, pair["tv_anchors"][1])


def test_final_detections_agree(pair):
    tv, images, out = pair["tv"], pair["images"], pair["out"]
    tv.transform.resize = lambda image, target: (image, target)  # sizes already final: no resize
    tv.transform.normalize = lambda image: pair["ours"].normalize(image.to(torch.uint8)[None])[0]  # shared input
    with torch.no_grad():
        expected = tv([img.float() for img in images])  # the full eval forward: transform, heads, postprocess
    anchors = pair["anchors"](out.feature_shapes, HW, "cpu")
    per_level = pair["anchors"].num_anchors_per_level(out.feature_shapes)
    got = instantiate(pair["cfg"].postprocess)(out.cls_logits, out.box_deltas, anchors, per_level,
                                               torch.tensor([HW] * 2), None)
    for g, e in zip(got, expected):
        assert 100 < len(g["scores"]) == len(e["scores"]) <= 300
        order_g, order_e = g["scores"].argsort(descending=True, stable=True), e["scores"].argsort(descending=True,
                                                                                                  stable=True)
        assert torch.equal(g["labels"][order_g], e["labels"][order_e])
        torch.testing.assert_close(g["scores"][order_g], e["scores"][order_e], rtol=0, atol=1e-5)
        torch.testing.assert_close(g["boxes"][order_g], e["boxes"][order_e], rtol=0, atol=1e-3)


def test_losses_agree_with_an_image_without_boxes(pair):
    tv, out, cfg = pair["tv"], pair["out"], pair["cfg"]
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [90.0, 20.0, 150.0, 90.0]])
    labels = torch.tensor([3, 7])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}  # an image without boxes
    targets = [{"boxes": boxes, "labels": labels}, empty]
    expected = tv.compute_loss(targets, pair["tv_head"], pair["tv_anchors"])
    gt_boxes = torch.zeros(2, 2, 4)
    gt_boxes[0] = boxes
    gt_labels = torch.tensor([[3, 7], [-1, -1]])
    criterion = instantiate(cfg.loss, num_classes=K)
    assert criterion.normalization == "torchvision"
    assert criterion.box_loss == {"v1": "l1", "v2": "giou"}[pair["variant"]] == tv.head.regression_head._loss_type
    anchors = pair["anchors"](out.feature_shapes, HW, "cpu")
    got = criterion(out.cls_logits, out.box_deltas, anchors, gt_boxes, gt_labels)
    assert got["num_pos"] > 4
    torch.testing.assert_close(got["loss_cls"], expected["classification"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["loss_box"], expected["bbox_regression"], rtol=1e-5, atol=0)


def test_old_key_spelling_converts_the_same(pair):
    """Old torchvision files (the v1 COCO weights) name head convs ``conv.{2i}`` and FPN convs ``inner_blocks.{i}``.

    v1: both spellings give the same tensors. v2 (GroupNorm heads) never had the old spelling: refused by name.
    """
    new = pair["tv"].state_dict()
    old = {}
    for key, value in new.items():
        for i in range(4):
            key = key.replace(f".conv.{i}.0.", f".conv.{2 * i}.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(3):
                key = key.replace(f"{block}.{i}.0.", f"{block}.{i}.")
        old[key] = value
    assert "head.classification_head.conv.6.weight" in old and "backbone.fpn.inner_blocks.2.weight" in old
    converted_new = convert_torchvision_state_dict(new)
    if pair["variant"] == "v1":
        converted_old = convert_torchvision_state_dict(old)
        assert list(converted_old) == list(converted_new)
        assert all(torch.equal(converted_old[k], converted_new[k]) for k in converted_new)
    else:
        with pytest.raises(ValueError, match=r"torchvision keys have no counterpart.*head\.classification_head\.conv"):
            convert_torchvision_state_dict(old)


def test_wrong_preset_and_unknown_keys_are_named(pair):
    state = pair["tv"].state_dict()
    other = "v2" if pair["variant"] == "v1" else "v1"
    wrong = instantiate(compose_train([f"model=torchvision_{other}"]).model.net, num_classes=K)
    with pytest.raises(ValueError, match=f"torchvision {pair['variant']} weights .*use model=torchvision_"
                                         f"{pair['variant']}.*shape mismatches.*fpn.extra.0.weight"):
        load_torchvision_weights(wrong, state)
    with pytest.raises(ValueError, match=r"1 torchvision keys .*head\.extra_thing\.weight"):
        convert_torchvision_state_dict({**state, "head.extra_thing.weight": torch.zeros(1)})
    assert torchvision_variant(state) == pair["variant"]


def test_coco80_selection_keeps_the_right_outputs():
    """91 torchvision outputs -> 80 COCO categories: our head's logits equal the selected columns."""
    g = torch.Generator().manual_seed(3)
    full = Subnet(16, 9, 91, width=16, depth=1)
    keep = [1, 2, 90, 7, 45]
    small = Subnet(16, 9, len(keep), width=16, depth=1)
    with torch.no_grad():
        full.predictor.bias.normal_(generator=g)
        small.tower.load_state_dict(full.tower.state_dict())
        w, b = select_classes(full.predictor.weight, full.predictor.bias, keep, num_anchors=9)
        small.predictor.weight.copy_(w)
        small.predictor.bias.copy_(b)
        feats = [torch.randn(1, 16, 4, 5, generator=g)]
        torch.testing.assert_close(small(feats), full(feats)[..., keep])
    with pytest.raises(ValueError, match="must index the 91 classes"):
        select_classes(full.predictor.weight, full.predictor.bias, [91], num_anchors=9)


@pytest.mark.parametrize("image_hw", [(800, 1216), (96, 160)])
def test_strides_quirk_and_nominal_strides(image_hw):
    """torchvision's anchors = ours with the quirk; nominal strides differ only on P6 / P7 of such sizes."""
    h, w = image_hw
    shapes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    features = [torch.zeros(1, 1, fh, fw) for fh, fw in shapes]
    tv = _default_anchorgen()(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), features)[0]
    cfg = compose_train(["model=torchvision_v1"]).model.anchors
    quirk = instantiate(cfg, strides_from_image=True)(shapes, (h, w))
    nominal: AnchorGenerator = instantiate(cfg)
    assert torch.equal(quirk, tv)
    split = nominal.num_anchors_per_level(shapes)
    for level, (a, b) in enumerate(zip(nominal(shapes, (h, w)).split(split), tv.split(split))):
        assert torch.equal(a, b) == (level < 3), level  # P3-P5 agree; P6 / P7 strides 64 / 128 vs 61 / 114 ...
    if image_hw == (800, 1216):  # P6 is 13 x 19, P7 7 x 10: torchvision's vertical strides are 61 and 114
        for level, stride in ((3, 61), (4, 114)):
            boxes = tv[sum(split[:level]):sum(split[:level + 1])]
            assert ((boxes[:, 1] + boxes[:, 3]) / 2).unique().diff().eq(stride).all()
