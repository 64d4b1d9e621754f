"""The template: each of the four meta-architectures is built from modules and plain values,
without a config (Detectron2's ``from_config`` pattern, issue 9 item 2), trains one step and
returns the data contract in evaluation."""
import pytest
import torch
from torch import nn

from instseg.modeling.backbone import Backbone, ShapeSpec
from instseg.modeling.backbone.fpn import FPN

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
K = 3  # classes


class TinyBackbone(Backbone):
    """Four strided convs: res2..res5 at strides 4..32 with 8/16/24/32 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.res3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.res4 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.res5 = nn.Conv2d(24, 32, 3, stride=2, padding=1)

    def forward(self, x):
        r2 = torch.relu(self.stem(x))
        r3 = torch.relu(self.res3(r2))
        r4 = torch.relu(self.res4(r3))
        return {"res2": r2, "res3": r3, "res4": r4, "res5": torch.relu(self.res5(r4))}

    def output_shape(self):
        return {n: ShapeSpec(c, s) for n, c, s in (("res2", 8, 4), ("res3", 16, 8), ("res4", 24, 16), ("res5", 32, 32))}


def _sparseinst():
    from sparseinst import IAMDecoder, InstanceContextEncoder, SparseInst, SparseInstCriterion
    from sparseinst.matcher import DiceScoreMatcher

    return SparseInst(
        backbone=TinyBackbone(),
        encoder=InstanceContextEncoder([16, 24, 32], channels=32, ppm_channels=8),
        decoder=IAMDecoder(32, num_classes=K, num_masks=6, kernel_dim=8, inst_dim=16, inst_convs=1, mask_dim=16, mask_convs=1),
        criterion=SparseInstCriterion(K, DiceScoreMatcher()),
        pixel_mean=MEAN, pixel_std=STD, detections_per_image=5, cls_threshold=0.0,
    )


def _fastinst():
    from fastinst import FastInst, FastInstDecoder
    from fastinst.criterion import FastInstCriterion
    from fastinst.fastinst import FastInstHead
    from fastinst.matcher import MaskLocationMatcher
    from fastinst.ppm_fpn import PPMFPN

    criterion = FastInstCriterion(K, MaskLocationMatcher(num_points=64), num_points=64)
    decoder = FastInstDecoder(num_classes=K, hidden_dim=32, num_queries=4, num_aux_queries=2, nheads=4, dim_feedforward=64,
                              dec_layers=1, mask_dim=32, criterion=criterion)
    head = FastInstHead(PPMFPN([16, 24, 32], channels=32, ppm_channels=8), decoder, K)
    return FastInst(backbone=TinyBackbone(), sem_seg_head=head, criterion=criterion, pixel_mean=MEAN, pixel_std=STD,
                    detections_per_image=5)


def _queryinst():
    from queryinst import QueryInst, QueryInstCriterion, QueryRoIHead
    from queryinst.matcher import BoxSetMatcher

    roi_head = QueryRoIHead(K, strides=(4, 8, 16, 32), num_proposals=5, dim=32, num_stages=2, num_heads=4,
                            dim_feedforward=64, dynamic_dim=8, mask_num_convs=1, mask_conv_dim=16)
    return QueryInst(backbone=FPN(TinyBackbone(), out_channels=32), roi_head=roi_head,
                     criterion=QueryInstCriterion(K, BoxSetMatcher()), pixel_mean=MEAN, pixel_std=STD, detections_per_image=5)


def _fassst():
    from fassst import FASSST, MaskTail
    from fassst.criterion import FASSSTCriterion
    from fassst.instance_attention import InstanceAttentionModule
    from fassst.rff import PyramidMaskLayers, RoIFeatureFusion

    return FASSST(
        backbone=TinyBackbone(),
        iam=InstanceAttentionModule(32, K, num_slots=4, dim=16, num_convs=3, pool_after=1, norm=""),
        mask_layers=PyramidMaskLayers([16, 24, 32], dim=16, norm=""),
        rff=RoIFeatureFusion([8, 16, 32], roi_size=8),
        mask_tail=MaskTail(16, 16),
        criterion=FASSSTCriterion(K),
        iam_feature="res5", pyramid_features=["res3", "res4", "res5"],
        pixel_mean=MEAN, pixel_std=STD, detections_per_image=5, score_threshold=0.0,
    )


def _batch():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8, generator=g)
    masks = torch.zeros(2, 128, 160, dtype=torch.bool)
    masks[0, 20:70, 30:90] = True
    masks[1, 60:120, 100:150] = True
    boxes = torch.tensor([[30.0, 20.0, 90.0, 70.0], [100.0, 60.0, 150.0, 120.0]])
    inst = {"labels": torch.tensor([0, 2]), "masks": masks, "boxes": boxes}
    return [{"image": image, "height": 64, "width": 80, "instances": inst}]


@pytest.mark.parametrize("build", [_sparseinst, _fastinst, _queryinst, _fassst], ids=lambda f: f.__name__[1:])
def test_built_from_modules_without_a_config(build):
    torch.manual_seed(0)
    model = build().train()
    losses = model(_batch())
    assert losses and all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        (res,) = model(_batch())
    n = res["scores"].shape[0]
    assert 0 < n <= 5 and res["labels"].shape == (n,) and res["labels"].dtype == torch.int64
    assert res["masks"].shape == (n, 64, 80) and res["masks"].dtype == torch.bool and res["boxes"].shape == (n, 4)
    assert int(res["labels"].max()) < K


def test_configurable_builds_the_same_model_from_a_config():
    """``Cls(cfg)`` equals ``Cls(**Cls.from_config(cfg))``: same parameter names and shapes."""
    from pathlib import Path

    from instseg.config import setup_cfg
    from instseg.engine.models import import_model_packages
    from sparseinst import SparseInst

    import_model_packages()
    cfg = setup_cfg(str(Path(__file__).resolve().parents[1] / "configs/sparseinst/R50_giam.yaml"),
                    ["MODEL.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "9"])
    a = SparseInst(cfg)
    b = SparseInst(**SparseInst.from_config(cfg))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.detections_per_image == 9 and a.mask_threshold == 0.45 and a.cls_threshold == 0.005
    with pytest.raises(TypeError):
        SparseInst(backbone=TinyBackbone())  # missing required parts
