"""Checkpoint loading and the official-weights converter (key layouts from tests/refs, see its README.md)."""
import glob
import logging
import os
import pickle
import re
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from instseg.checkpoint import load_backbone_weights, load_checkpoint, read_checkpoint
from instseg.convert import (
    convert_backbone_key,
    convert_official_state_dict,
    official_keys_from_ref,
    state_dict_from_shapes,
)
from instseg.modeling.backbone import FPN, MobileNetV2Backbone, ResNetBackbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "refs")
REF_FILES = sorted(glob.glob(os.path.join(REFS, "sparseinst_*.json")) + glob.glob(os.path.join(REFS, "fastinst_*.json")))
ALL = ["res2", "res3", "res4", "res5"]


@lru_cache(maxsize=None)
def our_backbone_shapes(depth: int, vd: bool):
    """State-dict shapes of our backbone as the official configs build it (FrozenBN)."""
    b = ResNetBackbone(
        depth=depth,
        norm="FrozenBN",
        out_features=ALL,
        deform_on_per_stage=[False, False, vd, vd],
        deform_modulated=False,
        variant="vd" if vd else "torchvision",
    )
    return {"backbone." + k: tuple(v.shape) for k, v in b.state_dict().items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------- converter
def test_official_ref_files_are_in_the_repository():
    """The parametrization below must never be empty (it would skip silently)."""
    assert len(REF_FILES) == 8, REF_FILES


@pytest.mark.parametrize("ref", REF_FILES, ids=[os.path.basename(f) for f in REF_FILES])
def test_official_backbone_keys_convert_onto_ours(ref):
    name = os.path.basename(ref)
    model = "sparseinst" if name.startswith("sparseinst") else "fastinst"
    depth = 101 if "R101" in name else 50
    vd = "vd" in name
    shapes = official_keys_from_ref(ref)
    converted = convert_official_state_dict(state_dict_from_shapes(shapes), model)
    ours = our_backbone_shapes(depth, vd)
    conv_backbone = {k: tuple(v.shape) for k, v in converted.items() if k.startswith("backbone.")}
    # (a) every converted backbone key exists in our backbone with the same shape
    assert set(conv_backbone) <= set(ours), sorted(set(conv_backbone) - set(ours))[:10]
    assert all(conv_backbone[k] == ours[k] for k in conv_backbone)
    # (b) every parameter and buffer of ours is filled
    assert set(ours) <= set(conv_backbone), sorted(set(ours) - set(conv_backbone))[:10]
    # the rest keeps its official names (FastInst's criterion.empty_weight included: our model
    # registers the criterion under both official names, so a strict load needs both)
    rest = {k for k in converted if not k.startswith("backbone.")}
    official_rest = {k for k in shapes if not k.startswith("backbone.")}
    assert rest == official_rest
    assert sum(v.numel() for k, v in converted.items() if k.startswith("backbone.body.")) >= 23_454_912


def test_backbone_key_rules():
    assert convert_backbone_key("stem.conv1.weight") == "conv1.weight"
    assert convert_backbone_key("stem.conv1.norm.running_var") == "bn1.running_var"
    assert convert_backbone_key("res4.22.conv3.norm.bias") == "layer3.22.bn3.bias"
    assert convert_backbone_key("res2.0.shortcut.weight") == "layer1.0.downsample.0.weight"
    assert convert_backbone_key("res5.0.shortcut.norm.weight") == "layer4.0.downsample.1.weight"
    assert convert_backbone_key("res5.1.conv2_offset.bias") == "layer4.1.conv2.offset.bias"
    assert convert_backbone_key("res5.1.conv2.offset.weight") == "layer4.1.conv2.offset.weight"
    assert convert_backbone_key("layer3.0.conv2_offset.weight") == "layer3.0.conv2.offset.weight"
    assert convert_backbone_key("conv1.6.weight") == "conv1.6.weight"
    assert convert_backbone_key("layer1.0.downsample.2.running_mean") == "layer1.0.downsample.2.running_mean"
    assert convert_backbone_key("res2.0.conv1.norm.num_batches_tracked") is None
    assert convert_backbone_key("stem.fc.weight") is None
    with pytest.raises(ValueError, match="Caffe2"):
        convert_backbone_key("res2_0_branch2a_w")
    with pytest.raises(KeyError):
        convert_backbone_key("something.else")


def test_convert_numpy_drops_and_unknown_model():
    sd = {
        "backbone.stem.conv1.weight": np.ones((64, 3, 7, 7), dtype=np.float32),
        "backbone.res2.0.conv1.norm.num_batches_tracked": np.array(3),
        "criterion.empty_weight": np.ones(81, dtype=np.float32),
        "sem_seg_head.predictor.class_embed.weight": np.ones((81, 256), dtype=np.float32),
        "pixel_mean": np.zeros((3, 1, 1), dtype=np.float32),
    }
    out = convert_official_state_dict(sd, "fastinst")
    assert set(out) == {"backbone.body.conv1.weight", "criterion.empty_weight",
                        "sem_seg_head.predictor.class_embed.weight", "pixel_mean"}
    assert isinstance(out["backbone.body.conv1.weight"], torch.Tensor)
    assert out["backbone.body.conv1.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="Unknown model"):
        convert_official_state_dict(sd, "maskrcnn")


def _torchvision_to_d2(sd):
    """Detectron2's tools/convert-torchvision-to-d2.py mapping (an independent re-statement)."""
    out = {}
    for k, v in sd.items():
        old = k
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = sd[old].detach().numpy()
    return out


def test_cli_converts_detectron2_checkpoint(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().state_dict()
    d2 = {"backbone." + k: v for k, v in _torchvision_to_d2(tv).items() if not k.startswith("fc.")}
    d2 = {k: torch.from_numpy(v) for k, v in d2.items()}
    d2["encoder.fpn_laterals.0.weight"] = torch.randn(256, 2048, 1, 1)
    src = tmp_path / "official.pth"
    torch.save({"model": d2, "iteration": 270000}, src)
    dst = tmp_path / "ours.pth"
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_official_weights.py"), "--model", "sparseinst", str(src), str(dst)],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert re.search(r"\d+ keys -> \d+ written", res.stdout)
    obj = torch.load(dst, weights_only=True)
    assert obj["__converted_from__"] == "official-sparseinst"
    assert "encoder.fpn_laterals.0.weight" in obj["model"]
    # the backbone part loads into ours and reproduces torchvision's ResNet-50 exactly
    model = nn.Module()
    model.backbone = ResNetBackbone(norm="BN", out_features=ALL)
    report = load_checkpoint(model, str(dst))
    assert report["missing"] == [] and report["skipped_shape"] == []
    assert report["unexpected"] == ["encoder.fpn_laterals.0.weight"]
    for k, v in tv.items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(model.backbone.body.state_dict()[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------- load_checkpoint
class Tiny(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.cls = nn.Linear(4, num_classes)


def _randomized(m):
    torch.manual_seed(1)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return m


def test_load_checkpoint_formats(tmp_path):
    src = _randomized(Tiny())
    sd = src.state_dict()
    files = {
        "plain.pth": sd,
        "d2.pth": {"model": sd, "iteration": 10},
        "lightning.ckpt": {
            "state_dict": {"model." + k: v for k, v in sd.items()},
            "epoch": 3,
            "pytorch-lightning_version": "2.4.0",
            "hyper_parameters": {"cfg": {"SOLVER": {"BASE_LR": 1e-4}}},
        },
        "ddp.pth": {"module." + k: v for k, v in sd.items()},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        dst = Tiny()
        report = load_checkpoint(dst, str(tmp_path / name))
        assert report["missing"] == [] and report["unexpected"] == [] and report["skipped_shape"] == [], name
        assert set(report["loaded"]) == set(sd)
        for k, v in sd.items():
            torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
    # a Detectron2 .pkl of numpy arrays
    with open(tmp_path / "d2.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"}, f)
    dst = Tiny()
    load_checkpoint(dst, str(tmp_path / "d2.pkl"))
    torch.testing.assert_close(dst.conv.weight, sd["conv.weight"], rtol=0, atol=0)


def test_load_checkpoint_lightning_with_objects(tmp_path):
    """A Lightning checkpoint holding non-tensor objects (e.g. a CfgNode) still loads."""
    from fvcore.common.config import CfgNode

    sd = _randomized(Tiny()).state_dict()
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "hyper_parameters": {"cfg": CfgNode({"A": 1})}},
               tmp_path / "x.ckpt")
    assert set(read_checkpoint(str(tmp_path / "x.ckpt"))) == set(sd)


def test_load_checkpoint_shape_mismatch_missing_unexpected(tmp_path, caplog):
    sd = _randomized(Tiny(num_classes=80)).state_dict()
    del sd["bn.running_var"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "ft.pth")
    dst = Tiny(num_classes=3)
    before = dst.cls.weight.clone()
    with caplog.at_level(logging.WARNING, logger="instseg.checkpoint"):
        report = load_checkpoint(dst, str(tmp_path / "ft.pth"))
    assert report["skipped_shape"] == ["cls.weight", "cls.bias"]
    assert report["shapes"]["cls.weight"] == ((80, 4), (3, 4))
    assert report["missing"] == ["bn.running_var"]
    assert report["unexpected"] == ["extra.weight"]
    assert "conv.weight" in report["loaded"]
    torch.testing.assert_close(dst.cls.weight, before, rtol=0, atol=0)  # untouched
    torch.testing.assert_close(dst.conv.weight, sd["conv.weight"], rtol=0, atol=0)
    text = caplog.text
    assert "cls.weight: (80, 4)" in text and "(3, 4) in the model" in text
    assert "bn.running_var" in text and "extra.weight" in text
    with pytest.raises(ValueError, match="cls.weight"):
        load_checkpoint(Tiny(num_classes=3), str(tmp_path / "ft.pth"), strict_shapes=True)


def test_load_checkpoint_missing_file(tmp_path):
    path = str(tmp_path / "nope" / "model_final.pth")
    with pytest.raises(FileNotFoundError, match="model_final.pth"):
        load_checkpoint(Tiny(), path)


def test_unconverted_official_checkpoint_hint(tmp_path, caplog):
    model = nn.Module()
    model.backbone = ResNetBackbone(out_features=["res2"])
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7), "encoder.fpn_laterals.0.bias": torch.zeros(256)}},
               tmp_path / "off.pth")
    with caplog.at_level(logging.WARNING, logger="instseg.checkpoint"):
        load_checkpoint(model, str(tmp_path / "off.pth"))
    assert "convert_official_weights.py" in caplog.text


# ------------------------------------------------------------------------------- ImageNet files
def test_load_backbone_weights_torchvision(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    with torch.no_grad():  # non-trivial BN statistics
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    sd = tv.state_dict()
    torch.save(sd, tmp_path / "r50.pth")
    b = ResNetBackbone(depth=50, norm="FrozenBN", out_features=ALL)
    report = load_backbone_weights(b, str(tmp_path / "r50.pth"))
    assert report["missing"] == [] and report["unexpected"] == [] and report["skipped_shape"] == []
    ours = b.body.state_dict()
    for k, v in sd.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0)
    # and the features equal torchvision's own forward up to layer4
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        # FrozenBN folds the statistics into scale/shift: equal up to float rounding
        torch.testing.assert_close(b(x)["res5"], y, rtol=1e-3, atol=1e-4 * float(y.abs().max()))


def test_load_backbone_weights_detectron2_pkl_and_fpn(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.resnet50().state_dict()
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": _torchvision_to_d2(sd), "__author__": "torchvision", "matching_heuristics": True}, f)
    fpn = FPN(ResNetBackbone(norm="FrozenBN", out_features=ALL), ALL)
    report = load_backbone_weights(fpn, str(tmp_path / "R-50.pkl"))
    assert report["missing"] == [] and report["unexpected"] == []
    torch.testing.assert_close(fpn.bottom_up.body.layer3[5].bn2.running_var, sd["layer3.5.bn2.running_var"])


def test_load_backbone_weights_timm_vd_dcn(tmp_path):
    torch.manual_seed(0)
    sd = timm.create_model("resnet50d", pretrained=False).state_dict()
    torch.save({"state_dict": sd}, tmp_path / "resnet50d.pth")
    b = ResNetBackbone(norm="FrozenBN", out_features=ALL, variant="vd",
                       deform_on_per_stage=[False, False, True, True], deform_modulated=False)
    report = load_backbone_weights(b, str(tmp_path / "resnet50d.pth"))
    assert report["unexpected"] == [] and report["skipped_shape"] == []
    assert report["missing"] and all(".conv2.offset." in k for k in report["missing"])  # stay zero
    torch.testing.assert_close(b.body.layer3[2].conv2.weight, sd["layer3.2.conv2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(b.body.conv1[3].weight, sd["conv1.3.weight"], rtol=0, atol=0)
    assert b.body.layer4[0].conv2.offset.weight.abs().sum() == 0


def test_load_backbone_weights_mobilenet(tmp_path):
    torch.manual_seed(0)
    sd = torchvision.models.mobilenet_v2().state_dict()
    torch.save(sd, tmp_path / "mnv2.pth")
    b = MobileNetV2Backbone(norm="FrozenBN", out_features=ALL)
    report = load_backbone_weights(b, str(tmp_path / "mnv2.pth"))
    assert report["missing"] == [] and report["skipped_shape"] == []
    assert all(k.startswith("features.18.") for k in report["unexpected"])  # the dropped 1x1 conv
    torch.testing.assert_close(b.features[17].conv[0][0].weight, sd["features.17.conv.0.0.weight"], rtol=0, atol=0)


def test_model_weights_may_name_an_imagenet_file(tmp_path):
    """MODEL.WEIGHTS = a Detectron2 ImageNet .pkl (as in the official configs) fills model.backbone."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet50().state_dict()
    with open(tmp_path / "R-50.pkl", "wb") as f:
        pickle.dump({"model": _torchvision_to_d2(sd), "__author__": "torchvision", "matching_heuristics": True}, f)
    model = nn.Module()
    model.backbone = ResNetBackbone(norm="FrozenBN", out_features=["res3", "res4", "res5"])
    model.head = nn.Conv2d(2048, 4, 1)
    report = load_checkpoint(model, str(tmp_path / "R-50.pkl"))
    assert report["missing"] == ["head.weight", "head.bias"]
    assert "backbone.body.layer4.2.conv3.weight" in report["loaded"]
    torch.testing.assert_close(model.backbone.body.layer2[0].conv2.weight, sd["layer2.0.conv2.weight"], rtol=0, atol=0)
    # an unconverted official full checkpoint is not mistaken for an ImageNet file
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                          "sem_seg_head.predictor.x": torch.zeros(1)}}, tmp_path / "official.pth")
    report = load_checkpoint(model, str(tmp_path / "official.pth"))
    assert "backbone.stem.conv1.weight" in report["unexpected"]
