"""Backbones: output shapes/strides, exact parameter counts (tests/refs/README.md), FREEZE_AT, norms,
deformable convs, and the no-network error of pretrained loading."""
import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from instseg.config import get_cfg
from instseg.modeling.backbone import (
    FPN,
    DeformConv,
    MobileNetV2Backbone,
    ResNetBackbone,
    ShapeSpec,
    build_backbone,
)
from instseg.modeling.norm import FrozenBatchNorm2d, convert_norm, get_norm

ALL = ["res2", "res3", "res4", "res5"]
H, W = 64, 96


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def check_outputs(backbone, outputs):
    shapes = backbone.output_shape()
    assert list(outputs) == list(shapes)
    for name, t in outputs.items():
        spec = shapes[name]
        assert t.shape == (1, spec.channels, math.ceil(H / spec.stride), math.ceil(W / spec.stride)), name


@pytest.fixture(scope="module")
def r50():
    return ResNetBackbone(depth=50, norm="FrozenBN", out_features=ALL)


@pytest.fixture(scope="module")
def r50vd_dcn():
    return ResNetBackbone(
        depth=50,
        norm="FrozenBN",
        out_features=ALL,
        deform_on_per_stage=[False, False, True, True],
        deform_modulated=False,
        variant="vd",
    )


# ------------------------------------------------------------------------------- shapes
def test_resnet_outputs(r50):
    assert r50.output_shape() == {
        "res2": ShapeSpec(256, 4),
        "res3": ShapeSpec(512, 8),
        "res4": ShapeSpec(1024, 16),
        "res5": ShapeSpec(2048, 32),
    }
    with torch.no_grad():
        check_outputs(r50, r50(torch.randn(1, 3, H, W)))
    assert "body.conv1.weight" in r50.state_dict()
    assert "body.layer1.0.conv1.weight" in r50.state_dict()


def test_resnet_vd_dcn_outputs(r50vd_dcn):
    with torch.no_grad():
        check_outputs(r50vd_dcn, r50vd_dcn(torch.randn(1, 3, H, W)))
    sd = r50vd_dcn.state_dict()
    assert "body.conv1.0.weight" in sd and "body.layer1.0.downsample.1.weight" in sd
    assert sd["body.layer3.0.conv2.offset.weight"].shape == (18, 256, 3, 3)
    assert sd["body.layer3.0.conv2.offset.bias"].shape == (18,)
    assert "body.layer2.0.conv2.offset.weight" not in sd


def test_out_features_subset_drops_later_stages():
    b = ResNetBackbone(out_features=["res3", "res4"])
    assert list(b.output_shape()) == ["res3", "res4"]
    assert not hasattr(b.body, "layer4")
    with torch.no_grad():
        check_outputs(b, b(torch.randn(1, 3, H, W)))


def test_mobilenet_outputs():
    b = MobileNetV2Backbone(out_features=ALL)
    assert b.output_shape() == {
        "res2": ShapeSpec(24, 4),
        "res3": ShapeSpec(32, 8),
        "res4": ShapeSpec(96, 16),
        "res5": ShapeSpec(320, 32),
    }
    with torch.no_grad():
        check_outputs(b, b(torch.randn(1, 3, H, W)))
    assert "features.0.0.weight" in b.state_dict()
    assert len(b.features) == 18  # the 1x1 conv to 1280 is not kept
    b3 = MobileNetV2Backbone(out_features=["res3", "res4", "res5"], width_mult=0.5)
    assert [s.channels for s in b3.output_shape().values()] == [16, 48, 160]


def test_fpn_outputs(r50):
    fpn = FPN(r50, ALL, out_channels=256, top_block="maxpool")
    assert fpn.output_shape() == {f"p{k}": ShapeSpec(256, 2**k) for k in range(2, 7)}
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, H, W))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    check_outputs(fpn, out)
    plain = FPN(r50, ["res3", "res4", "res5"], norm="GN")
    assert list(plain.output_shape()) == ["p3", "p4", "p5"]
    assert any(isinstance(m, nn.GroupNorm) for m in plain.fpn.modules())


def test_build_backbone_from_config():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ALL
    cfg.MODEL.MOBILENET.OUT_FEATURES = ALL
    cfg.MODEL.FPN.TOP_BLOCK = "maxpool"
    expected = {
        "build_resnet_backbone": ALL,
        "build_resnet_vd_backbone": ALL,
        "build_mobilenet_v2_backbone": ALL,
        "build_resnet_fpn_backbone": ["p2", "p3", "p4", "p5", "p6"],
    }
    x = torch.randn(1, 3, H, W)
    for name, feats in expected.items():
        cfg.MODEL.BACKBONE.NAME = name
        b = build_backbone(cfg)
        assert list(b.output_shape()) == feats
        with torch.no_grad():
            check_outputs(b, b(x))
    cfg.MODEL.BACKBONE.NAME = "build_nothing"
    with pytest.raises(KeyError, match="build_resnet_backbone"):
        build_backbone(cfg)


# ------------------------------------------------------------------------------- counts
def test_param_counts(r50, r50vd_dcn):
    # tests/refs/README.md: backbone parameters of the official configs (FrozenBN: BN are buffers)
    assert n_params(r50) == 23_454_912
    assert n_params(r50vd_dcn) == 23_971_842
    assert n_params(ResNetBackbone(depth=101, norm="FrozenBN", out_features=ALL)) == 42_394_816
    # README breakdown: ResNet-D stem 28,512; offset convs +248,940 (res4) / +248,886 (res5)
    assert n_params(r50vd_dcn.body.conv1) == 28_512
    assert sum(n_params(b.conv2.offset) for b in r50vd_dcn.body.layer3) == 248_940
    assert sum(n_params(b.conv2.offset) for b in r50vd_dcn.body.layer4) == 248_886
    # torchvision ResNet-50 without fc, BN trainable: 23,508,032 (tests/refs/README.md)
    assert n_params(ResNetBackbone(norm="BN", out_features=ALL)) == 23_508_032


# ------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    b = ResNetBackbone(norm="BN", out_features=ALL, freeze_at=freeze_at)
    stages = b.stage_modules()  # [stem, res2, res3, res4, res5]
    for idx, mods in enumerate(stages):
        frozen = idx < freeze_at
        params = [p for m in mods for p in m.parameters()]
        assert params, idx
        assert all(p.requires_grad != frozen for p in params), (freeze_at, idx)
        bns = [m for mod in mods for m in mod.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert bns
        # Detectron2: batch norms of frozen stages become FrozenBN; the others stay BN
        assert all(isinstance(m, FrozenBatchNorm2d) == frozen for m in bns), (freeze_at, idx)


def test_freeze_at_vd_and_mobilenet():
    b = ResNetBackbone(norm="FrozenBN", out_features=ALL, freeze_at=2, variant="vd",
                       deform_on_per_stage=[False, False, True, True], deform_modulated=False)
    assert not any(p.requires_grad for p in b.body.conv1.parameters())
    assert not any(p.requires_grad for p in b.body.layer1.parameters())
    assert all(p.requires_grad for p in b.body.layer2.parameters())
    assert all(p.requires_grad for p in b.body.layer3.parameters())  # offsets included
    m = MobileNetV2Backbone(norm="BN", out_features=ALL, freeze_at=3)
    assert not any(p.requires_grad for p in m.features[:7].parameters())
    assert all(p.requires_grad for p in m.features[7:].parameters())
    assert isinstance(m.features[6].conv[1][1], FrozenBatchNorm2d)
    assert isinstance(m.features[7].conv[1][1], nn.BatchNorm2d)
    with pytest.raises(ValueError):
        ResNetBackbone(freeze_at=6)


# ------------------------------------------------------------------------------- norms
@pytest.mark.parametrize(
    "norm,cls", [("BN", nn.BatchNorm2d), ("SyncBN", nn.SyncBatchNorm), ("GN", nn.GroupNorm), ("FrozenBN", FrozenBatchNorm2d)]
)
def test_resnet_norms(norm, cls):
    b = ResNetBackbone(norm=norm, out_features=["res2"])
    norms = [m for m in b.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, FrozenBatchNorm2d))]
    assert norms and all(type(m) is cls for m in norms)
    if norm == "GN":
        assert all(m.num_groups == 32 for m in norms)
    b.train()
    out = b(torch.randn(2, 3, 32, 32))["res2"]
    out.mean().backward()
    assert b.body.conv1.weight.grad is not None


def test_get_norm_and_convert_norm():
    assert get_norm("", 64) is None
    assert isinstance(get_norm("FrozenBN", 64), FrozenBatchNorm2d)
    assert get_norm("GN", 64).num_groups == 32
    with pytest.raises(ValueError, match="Unknown norm"):
        get_norm("LN", 64)
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        bn.running_mean.uniform_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 64, 5, 5)
    frozen = convert_norm(nn.Sequential(bn), "FrozenBN")[0]
    assert isinstance(frozen, FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), bn(x))
    # AMP: the output keeps the input dtype (no promotion by the float32 buffers)
    assert frozen(x.half()).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen(nn.functional.conv2d(x, torch.randn(64, 64, 1, 1))).dtype == torch.bfloat16


def test_frozen_bn_fused_path_without_grad_equals_the_scale_shift_path_with_grad():
    # Without gradients the layer is one F.batch_norm call (Detectron2's inference path); with
    # them, x * scale + bias. Both must give the BatchNorm-eval values, and gradients must flow.
    frozen = FrozenBatchNorm2d(16)
    frozen.weight.uniform_(0.5, 2)
    frozen.bias.uniform_(-1, 1)
    frozen.running_mean.uniform_(-1, 1)
    frozen.running_var.uniform_(0.1, 3)
    x = torch.randn(2, 16, 7, 9)
    by_hand = ((x - frozen.running_mean.view(1, -1, 1, 1)) / (frozen.running_var.view(1, -1, 1, 1) + frozen.eps).sqrt()
               * frozen.weight.view(1, -1, 1, 1) + frozen.bias.view(1, -1, 1, 1))
    calls = []
    orig = nn.functional.batch_norm

    def spy(*a, **k):
        calls.append(k.get("training"))
        return orig(*a, **k)

    import instseg.modeling.norm as norm_mod

    norm_mod.F.batch_norm = spy
    try:
        fused = frozen(x)
        xg = x.clone().requires_grad_(True)
        unfused = frozen(xg)
    finally:
        norm_mod.F.batch_norm = orig
    assert calls == [False]  # the fused op once, in eval mode, and only for the no-grad input
    torch.testing.assert_close(fused, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unfused, by_hand, rtol=1e-6, atol=1e-6)
    unfused.sum().backward()
    torch.testing.assert_close(xg.grad, (frozen.weight / (frozen.running_var + frozen.eps).sqrt()).view(1, -1, 1, 1)
                               .expand_as(x))


# ------------------------------------------------------------------------------- DCN
def test_dcn_offset_channels():
    m = ResNetBackbone(out_features=ALL, deform_on_per_stage=[True, False, False, True], deform_modulated=True)
    assert m.body.layer1[0].conv2.offset.out_channels == 27
    assert m.body.layer4[2].conv2.offset.out_channels == 27
    assert isinstance(m.body.layer2[0].conv2, nn.Conv2d)
    u = ResNetBackbone(out_features=ALL, deform_on_per_stage=[False, False, True, False], deform_modulated=False,
                       deform_num_groups=2)
    assert u.body.layer3[0].conv2.offset.out_channels == 36
    assert u.body.layer3[0].conv2.offset.stride == (2, 2)  # stride on the 3x3 conv (STRIDE_IN_1X1 False)
    assert u.body.layer3[0].conv2.stride == (2, 2)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_deform_conv_zero_offset_matches_conv(stride, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
    x = torch.randn(2, 8, 9, 11)
    ref = conv(x)
    plain = DeformConv.from_conv(conv, modulated=False)
    torch.testing.assert_close(plain(x), ref, rtol=1e-4, atol=1e-5)
    # modulated, zero-initialized offset conv: mask = sigmoid(0) = 0.5 everywhere -> 0.5 x conv
    modulated = DeformConv.from_conv(conv, modulated=True)
    torch.testing.assert_close(modulated(x), 0.5 * ref, rtol=1e-4, atol=1e-5)
    # a mask of 1 (large bias on the last third of the channels) gives the plain conv back
    with torch.no_grad():
        modulated.offset.bias[18:] = 30.0
    torch.testing.assert_close(modulated(x), ref, rtol=1e-4, atol=1e-5)


def test_deform_conv_offset_layout():
    """Offsets are (dy, dx) per kernel point (Detectron2 / torchvision layout): a constant dx = +1
    samples one pixel to the right, i.e. equals the conv of the input shifted left by one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    dcn = DeformConv.from_conv(conv, modulated=False)
    with torch.no_grad():
        dcn.offset.bias[1::2] = 1.0  # dx
    x = torch.randn(1, 4, 8, 10)
    shifted = torch.zeros_like(x)
    shifted[..., :-1] = x[..., 1:]
    # column 0 differs by construction: the conv sees zero padding left of it, the DCN sees x[..., 0]
    torch.testing.assert_close(dcn(x)[..., 1:], conv(shifted)[..., 1:], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # dy = +1 instead: one row down
        dcn.offset.bias.zero_()
        dcn.offset.bias[0::2] = 1.0
    shifted = torch.zeros_like(x)
    shifted[..., :-1, :] = x[..., 1:, :]
    torch.testing.assert_close(dcn(x)[..., 1:, :], conv(shifted)[..., 1:, :], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- pretrained
def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_pretrained_without_network_torchvision(monkeypatch):
    monkeypatch.setattr(torchvision.models, "resnet50", _no_network)
    with pytest.raises(RuntimeError, match="network.*MODEL.WEIGHTS"):
        ResNetBackbone(depth=50, pretrained=True)


def test_pretrained_without_network_timm(monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", _no_network)
    with pytest.raises(RuntimeError, match="resnet50d.*network.*MODEL.WEIGHTS"):
        ResNetBackbone(depth=50, pretrained=True, variant="vd")


def test_pretrained_without_network_mobilenet(monkeypatch):
    monkeypatch.setattr(torchvision.models, "mobilenet_v2", _no_network)
    with pytest.raises(RuntimeError, match="network.*MODEL.WEIGHTS"):
        MobileNetV2Backbone(pretrained=True)


def test_pretrained_uses_library_weights(monkeypatch):
    """PRETRAINED True asks torchvision for the IMAGENET1K_V1 weights (no download here)."""
    seen = {}
    real = torchvision.models.resnet50

    def fake(weights=None, **kw):
        seen["weights"] = weights
        return real(weights=None, **kw)

    monkeypatch.setattr(torchvision.models, "resnet50", fake)
    ResNetBackbone(depth=50, pretrained=True)
    assert seen["weights"] == "IMAGENET1K_V1"


# ------------------------------------------------------------------------------- zero-init residual
def _last_norm_scales(b):
    return [blk.bn3.weight for layer in ("layer1", "layer2", "layer3", "layer4") for blk in getattr(b.body, layer)]


@pytest.mark.parametrize("variant", ["torchvision", "vd"])
def test_zero_init_residual_default_off_is_detectron2(variant):
    """Default (Detectron2, SparseInst / FastInst official): every norm scale starts at 1, for timm's
    ResNet-D too (its own zero_init_last is turned off)."""
    b = ResNetBackbone(norm="BN", out_features=ALL, variant=variant)
    scales = _last_norm_scales(b)
    assert len(scales) == 16 and all(torch.equal(w, torch.ones_like(w)) for w in scales)


@pytest.mark.parametrize("variant", ["torchvision", "vd"])
@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_zero_init_residual_zeroes_every_bottleneck_last_norm(variant, norm):
    """mmdetection's ResNet(zero_init_residual=True): Constant(val=0) on norm3 of every Bottleneck,
    so from random weights each block starts as ReLU(shortcut)."""
    b = ResNetBackbone(norm=norm, out_features=ALL, variant=variant, zero_init_residual=True)
    scales = _last_norm_scales(b)
    assert len(scales) == 16 and all(torch.equal(w, torch.zeros_like(w)) for w in scales)
    others = [m.weight for m in b.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert sum(bool((w == 1).all()) for w in others) == len(others) - 16  # bn1, bn2, shortcuts, stem
    b.eval()
    blk = b.body.layer2[0]  # a block with a projection shortcut
    x = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), torch.relu(blk.downsample(x)))


def test_zero_init_residual_leaves_frozenbn_and_pretrained_weights_alone(monkeypatch):
    b = ResNetBackbone(norm="FrozenBN", out_features=ALL, zero_init_residual=True)
    assert all(torch.equal(w, torch.ones_like(w)) for w in _last_norm_scales(b))
    # pretrained: the library's weights are kept as they are
    real = torchvision.models.resnet50

    def fake(weights=None, **kw):
        m = real(weights=None, **kw)
        with torch.no_grad():
            for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
                for blk in layer:
                    blk.bn3.weight.fill_(0.5)
        return m

    monkeypatch.setattr(torchvision.models, "resnet50", fake)
    b = ResNetBackbone(norm="BN", out_features=ALL, pretrained=True, zero_init_residual=True)
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in _last_norm_scales(b))


def test_zero_init_residual_config_key_and_frozen_stages():
    cfg = get_cfg()
    assert cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL is False
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ALL
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL = True
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    b = build_backbone(cfg)
    assert b.zero_init_residual
    # as in mmdetection (zeroed, then frozen_stages frozen): the frozen res2 keeps its zero scales
    assert isinstance(b.body.layer1[0].bn3, FrozenBatchNorm2d)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in _last_norm_scales(b))


# ------------------------------------------------------------------------------- ResNet-18 / 34
@pytest.mark.parametrize("depth", [18, 34])
def test_basic_block_resnets_channels_params_and_library_keys(depth):
    """ResNet-18/34 (basic blocks): res2..res5 with 64/128/256/512 channels (Detectron2's
    RES2_OUT_CHANNELS 64); the body is torchvision's own model, so its parameters (fc removed)
    and keys are torchvision's."""
    bb = ResNetBackbone(depth=depth, norm="BN", out_features=ALL)
    assert bb.output_shape() == {"res2": ShapeSpec(64, 4), "res3": ShapeSpec(128, 8),
                                 "res4": ShapeSpec(256, 16), "res5": ShapeSpec(512, 32)}
    ref = getattr(torchvision.models, f"resnet{depth}")()
    ref_keys = {k for k in ref.state_dict() if not k.startswith("fc.")}
    assert {k[len("body."):] for k in bb.state_dict()} == ref_keys
    assert n_params(bb) == n_params(ref) - n_params(ref.fc)
    bb.eval()
    with torch.no_grad():
        check_outputs(bb, bb(torch.randn(1, 3, H, W)))


def test_basic_block_resnet_refusals_and_zero_init():
    with pytest.raises(ValueError, match="bottleneck ResNet"):
        ResNetBackbone(depth=18, deform_on_per_stage=[False, False, True, True])
    with pytest.raises(ValueError, match="ResNet-D"):
        ResNetBackbone(depth=18, variant="vd")
    bb = ResNetBackbone(depth=18, norm="BN", out_features=ALL, zero_init_residual=True)
    last = [blk.bn2.weight for layer in (bb.body.layer1, bb.body.layer2, bb.body.layer3, bb.body.layer4) for blk in layer]
    assert len(last) == 8 and all(bool((w == 0).all()) for w in last)
    assert bool((bb.body.layer1[0].bn1.weight == 1).all())  # only the last norm of each block
