"""SparseInst modules: shapes of every F_iam variant, hand-checked aggregation, parameter and
state-dict parity with the official code (tests/refs), inference contract."""
import json
from pathlib import Path

import pytest
from init_checks import assert_pytorch_default_conv_init
import torch

import sparseinst  # noqa: F401  (registers the meta-architecture and config keys)
from instseg.config import setup_cfg
from instseg.modeling import build_model
from sparseinst.decoder import IAM_TYPES, IAMDecoder, InstanceBranch
from sparseinst.encoder import InstanceContextEncoder

REPO = Path(__file__).resolve().parents[1]
REFS = Path(__file__).resolve().parent / "refs"


def _n(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "iam_type,activation",
    [(t, "sigmoid") for t in IAM_TYPES] + [(t, "softmax") for t in IAM_TYPES if t != "cross_attention"],
)
def test_every_f_iam_variant_shapes(iam_type, activation):
    dec = IAMDecoder(64, num_classes=7, num_masks=10, kernel_dim=16, inst_dim=32, mask_dim=32, inst_convs=2,
                     mask_convs=2, iam_type=iam_type, activation=activation, groups=4, num_heads=4, output_iam=True)
    out = dec(torch.randn(2, 64, 12, 16))
    assert out["pred_logits"].shape == (2, 10, 7)
    assert out["pred_masks"].shape == (2, 10, 24, 32)  # 1/8 -> 1/4
    assert out["pred_scores"].shape == (2, 10, 1)
    g = 4 if iam_type == "group" else 1
    assert out["pred_iam"].shape == (2, 10 * g, 12, 16)


def test_iam_aggregation_is_normalized_weighted_mean():
    """With a constant activation map the instance feature is the spatial mean (z = A_bar X^T)."""
    br = InstanceBranch(in_channels=8, num_classes=3, num_masks=2, dim=8, num_convs=1, kernel_dim=4)
    torch.nn.init.zeros_(br.iam_conv.weight)
    torch.nn.init.zeros_(br.iam_conv.bias)
    feats = {}
    br.inst_convs.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    br.cls_score.register_forward_hook(lambda m, i, o: feats.__setitem__("z", i[0]))
    br(torch.randn(1, 8, 5, 6))
    mean = feats["x"].mean(dim=(2, 3))  # (1, 8)
    assert torch.allclose(feats["z"], mean[:, None].expand(1, 2, 8), atol=1e-6)


def test_group_iam_concatenates_group_features():
    br = InstanceBranch(in_channels=8, num_classes=3, num_masks=2, dim=8, num_convs=1, kernel_dim=4, iam_type="group", groups=4)
    assert br.fc.in_features == 32 and br.iam_conv.out_channels == 8 and br.iam_conv.groups == 4


def test_encoder_switches_table2():
    x = {"res3": torch.randn(1, 32, 16, 16), "res4": torch.randn(1, 64, 8, 8), "res5": torch.randn(1, 128, 4, 4)}
    for ppm in (True, False):
        for fusion in (True, False):
            enc = InstanceContextEncoder([32, 64, 128], channels=16, use_ppm=ppm, use_fusion=fusion, ppm_channels=4)
            assert enc(x).shape == (1, 16, 16, 16)
            assert (enc.ppm is not None) == ppm and (enc.fusion is not None) == fusion


def test_encoder_init_follows_the_official_code():
    """Official ``sparseinst/encoder.py``: the FPN laterals/outputs are ``c2_xavier_fill``-ed, the
    fusion conv ``c2_msra_fill``-ed, and the PPM's convs keep PyTorch's default init
    (kaiming-uniform a=sqrt(5): std 1/sqrt(3 fan_in), biases uniform in +-1/sqrt(fan_in))."""
    torch.manual_seed(0)
    enc = InstanceContextEncoder([512, 1024, 2048], channels=256, ppm_channels=64)
    ppm_convs = [s[1] for s in enc.ppm.stages] + [enc.ppm.bottleneck]
    assert [c.in_channels for c in ppm_convs] == [256] * 4 + [512]
    assert_pytorch_default_conv_init(ppm_convs)
    # c2_msra_fill would give std sqrt(2 / fan_out): 0.18 on the branches, 0.09 on the bottleneck
    assert float(ppm_convs[0].weight.detach().std()) < 0.05 and float(enc.ppm.bottleneck.weight.detach().std()) < 0.03
    for conv in list(enc.fpn_laterals) + list(enc.fpn_outputs):  # c2_xavier_fill: kaiming-uniform a=1
        fan_in = conv.weight[0].numel()
        assert float(conv.weight.detach().std()) == pytest.approx(fan_in ** -0.5, rel=0.05)
        assert float(conv.weight.detach().abs().max()) <= (3 / fan_in) ** 0.5
        assert bool((conv.bias.detach() == 0).all())
    fan_out = enc.fusion.out_channels  # c2_msra_fill: kaiming-normal, fan_out, ReLU gain
    assert float(enc.fusion.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert bool((enc.fusion.bias.detach() == 0).all())


def _ref(name):
    return json.loads((REFS / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "config,ref,opts",
    [
        ("R50_base.yaml", "sparseinst_r50_base", []),
        ("R50_giam.yaml", "sparseinst_r50_giam", []),
        ("R50_giam_soft.yaml", "sparseinst_r50_giam_soft", []),
        ("R50vd_dcn_giam_aug.yaml", "sparseinst_r50vd_dcn_giam", []),
    ],
)
def test_parameter_count_and_keys_match_official(config, ref, opts):
    r = _ref(ref)
    cfg = setup_cfg(str(REPO / "configs" / "sparseinst" / config), ["MODEL.NUM_CLASSES", "80", "MODEL.DEVICE", "cpu"] + opts)
    model = build_model(cfg)
    assert _n(model) == r["params"]
    assert _n(model.backbone) == r["per_module"]["backbone"]
    assert _n(model.encoder) == r["per_module"]["encoder"]
    assert _n(model.decoder) == r["per_module"]["decoder"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone")}
    theirs = {k: v for k, v in r["state_dict"].items() if not k.startswith("backbone")}
    assert ours == theirs


def _tiny_cfg(extra=()):
    return setup_cfg(str(REPO / "configs" / "sparseinst" / "R50_giam.yaml"), [
        "MODEL.NUM_CLASSES", "5", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
        "MODEL.SPARSE_INST.DECODER.NUM_MASKS", "8", *extra])


def test_inference_contract_original_size():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.0"])).eval()
    batch = [{"image": torch.randint(0, 255, (3, 96, 130), dtype=torch.uint8), "height": 200, "width": 270, "image_id": 1}]
    with torch.no_grad():
        (out,) = model(batch)
    k = out["scores"].shape[0]
    assert 0 < k <= 8
    assert out["labels"].dtype == torch.int64 and out["labels"].max() < 5
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (k, 200, 270)
    assert out["boxes"].shape == (k, 4)
    for m, b in zip(out["masks"], out["boxes"]):  # boxes are the masks' tight boxes
        if m.any():
            ys, xs = m.nonzero(as_tuple=True)
            assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_training_losses_and_objectness_switch():
    torch.manual_seed(0)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 5:30, 10:40] = True
    masks[1, 30:60, 50:90] = True
    batch = [{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 64, "width": 96, "image_id": 1,
              "instances": {"labels": torch.tensor([0, 3]), "masks": masks, "boxes": torch.zeros(2, 4)}}]
    losses = build_model(_tiny_cfg()).train()(batch)
    assert set(losses) == {"loss_cls", "loss_dice", "loss_mask", "loss_objectness"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses = build_model(_tiny_cfg(["MODEL.SPARSE_INST.LOSS.OBJECTNESS_LOSS", "none",
                                    "MODEL.SPARSE_INST.LOSS.MASK_PIXEL_LOSS", "focal"])).train()(batch)
    assert set(losses) == {"loss_cls", "loss_dice", "loss_mask"}
    # an image without instances still gives finite (zero mask) losses
    batch[0]["instances"] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 96, dtype=torch.bool),
                             "boxes": torch.zeros(0, 4)}
    losses = build_model(_tiny_cfg()).train()(batch)
    assert losses["loss_dice"].item() == 0 and torch.isfinite(losses["loss_cls"])


@pytest.mark.parametrize(
    "config,ref",
    [
        ("R50_base.yaml", "sparseinst_r50_base"),
        ("R50_giam.yaml", "sparseinst_r50_giam"),
        ("R50_giam_soft.yaml", "sparseinst_r50_giam_soft"),
        ("R50vd_dcn_giam_aug.yaml", "sparseinst_r50vd_dcn_giam"),
    ],
)
def test_official_checkpoint_converts_onto_every_tensor(config, ref):
    """A state dict with exactly the official keys and shapes (distinct values per tensor) is
    converted; every key lands in our model, and every parameter and buffer of ours is filled
    with the value of the official tensor it came from."""
    from instseg.checkpoint import load_state_dict_with_report
    from instseg.convert import convert_with_report, official_keys_from_ref

    shapes = official_keys_from_ref(str(REFS / f"{ref}.json"))
    official = {k: torch.full(s, float(i % 1000) + 0.5) for i, (k, s) in enumerate(shapes.items())}
    sd, conv_report = convert_with_report(official, "sparseinst")
    assert not conv_report.dropped  # every official tensor is used (no num_batches_tracked in refs)
    cfg = setup_cfg(str(REPO / "configs" / "sparseinst" / config), ["MODEL.NUM_CLASSES", "80", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    ours = model.state_dict()
    assert set(sd) == set(ours), (sorted(set(sd) - set(ours))[:5], sorted(set(ours) - set(sd))[:5])
    report = load_state_dict_with_report(model, sd, strict_shapes=True, source="fake official")
    assert not report["missing"] and not report["unexpected"] and not report["skipped_shape"]
    after = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(after[k], v.to(after[k].dtype)), k
