"""Model: shapes, prior initialisation, frozen stages, weight loading, FPN variants."""

import pytest
import torch
import torchvision

from retinanet.model import RetinaNet
from retinanet.model.backbone import ResNetBackbone


def tiny(**kw):
    args = dict(num_classes=3, backbone="resnet18", norm="bn", frozen_stages=0, fpn_channels=32,
                head_width=32, head_depth=2)
    args.update(kw)
    return RetinaNet(**args)


def test_output_shapes_cover_p3_to_p7():
    model = tiny().eval()
    out = model(torch.zeros(2, 3, 128, 256, dtype=torch.uint8))
    assert out.feature_shapes == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    a_total = 9 * sum(h * w for h, w in out.feature_shapes)
    assert out.cls_logits.shape == (2, a_total, 3)
    assert out.box_deltas.shape == (2, a_total, 4)


def test_prior_probability_initialisation():
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8))
    p = out.cls_logits.sigmoid()
    # the weights start with std 0.01, so every probability is close to the prior
    assert abs(p.mean().item() - 0.01) < 2e-3


def test_uint8_and_float_inputs_agree():
    model = tiny().eval()
    x = torch.randint(0, 255, (1, 3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        a = model(x).cls_logits
        b = model(x.float() / 255).cls_logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_stages_have_no_gradients():
    bb = ResNetBackbone("resnet18", norm="frozen_bn", frozen_stages=2)
    assert not any(p.requires_grad for p in bb.conv1.parameters())
    assert not any(p.requires_grad for p in bb.layer1.parameters())
    assert all(p.requires_grad for p in bb.layer2.parameters())


def test_backbone_weights_from_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    bb = ResNetBackbone("resnet18", weights=str(path), norm="bn", frozen_stages=0)
    torch.testing.assert_close(bb.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_backbone_weights_errors_name_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.pth"):
        ResNetBackbone("resnet18", weights=str(tmp_path / "no_such_file.pth"))
    with pytest.raises(ValueError, match="ResNet18_Weights.NOPE"):
        ResNetBackbone("resnet18", weights="ResNet18_Weights.NOPE")
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        ResNetBackbone("resnet18", weights=str(path))
    with pytest.raises(ValueError, match="resnet19"):
        ResNetBackbone("resnet19")


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_narrow_backbone_has_torchvisions_layers_at_a_fraction_of_the_width(depth):
    full = ResNetBackbone(depth, norm="bn", frozen_stages=0)
    narrow = ResNetBackbone(depth, norm="bn", frozen_stages=0, width=32)
    assert narrow.out_channels == tuple(c // 2 for c in full.out_channels)
    shapes_full, shapes_narrow = ({k: v.shape for k, v in bb.state_dict().items()} for bb in (full, narrow))
    assert shapes_narrow.keys() == shapes_full.keys()  # the same modules: torchvision's names
    for key, shape in shapes_narrow.items():  # every channel count halved, the 3 input colours and kernels kept
        expected = list(shapes_full[key])
        for dim in range(min(2, len(expected))):
            if not (dim == 1 and key == "conv1.weight"):
                expected[dim] //= 2
        assert list(shape) == expected, key
    x = torch.rand(2, 3, 64, 96)
    feats = narrow(x)
    assert [f.shape for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(narrow.out_channels, (8, 16, 32))]
    # from scratch every residual branch starts at zero (its last norm's scale), as in torchvision's ResNets
    last_norms = [b.bn2 if depth == "resnet18" else b.bn3 for layer in (narrow.layer1, narrow.layer4) for b in layer]
    assert all(float(n.weight.detach().abs().max()) == 0 for n in last_norms)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters()) / 3.5


def test_narrow_backbone_in_the_detector_and_its_errors(tmp_path):
    model = tiny(backbone_width=16).eval()
    out = model(torch.zeros(1, 3, 128, 128, dtype=torch.uint8))
    assert out.cls_logits.shape == (1, 9 * sum(h * w for h, w in out.feature_shapes), 3)
    assert model.fpn.lateral[0].in_channels == 32 and model.fpn.extra[0].in_channels == 128  # C3 and C5
    with pytest.raises(ValueError, match="backbone_width=0"):
        tiny(backbone_width=0)
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="backbone_width=32"):  # pretrained weights fit the width 64 only
        ResNetBackbone("resnet18", weights=str(path), norm="bn", width=32)


def test_p6_source_changes_extra_level_input():
    c5 = tiny(p6_from="c5")
    p5 = tiny(p6_from="p5")
    assert c5.fpn.extra[0].in_channels == 512
    assert p5.fpn.extra[0].in_channels == 32


def test_gn_heads_handle_a_single_image_with_1x1_p7():
    from retinanet.model.head import group_count

    assert group_count(256) == 32 and group_count(64) == 32 and group_count(32) == 16 and group_count(3) == 1
    model = tiny(head_norm="gn").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert out.feature_shapes[-1] == (1, 1) and torch.isfinite(out.cls_logits).all()


def test_fpn_extra_levels_give_finite_gradients_under_cpu_bf16_on_one_pixel_maps():
    """torch's CPU bf16 stride-2 conv writes NaNs into the weight gradient of a 1-pixel-wide input
    (retinanet.model.fpn.strided_conv); P6 of a 32 px image is such a case, and must train."""
    from retinanet.model.fpn import strided_conv

    for trial in range(20):  # the upstream bug struck about half of the trials where the CPU has bf16
        torch.manual_seed(trial)
        conv = torch.nn.Conv2d(64, 16, 3, stride=2, padding=1)
        junk = torch.full((1 << 20,), float("nan"))  # stale NaNs in freed memory, which the bug would read
        del junk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = strided_conv(conv, torch.randn(4, 64, 1, 3))
        out.float().sum().backward()
        assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(conv.bias.grad).all(), trial
    with torch.autocast("cpu", dtype=torch.bfloat16):  # maps of 2 px and more stay in bf16
        assert strided_conv(conv, torch.randn(1, 64, 2, 3)).dtype == torch.bfloat16
        assert strided_conv(conv, torch.randn(1, 64, 1, 3)).dtype == torch.float32
