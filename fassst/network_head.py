"""FASSST's MobileNetV2 with its "network head" (Sec. 3.1, Eq. 1; Table 5).

"We use several front convolutional layers of the network backbone as 'network head' to extract
raw features E of the whole frame"; Table 5 compares head depths 4, 5 and 6 (5 chosen). The
backbone below is torchvision's MobileNetV2 (:class:`instseg.modeling.backbone.MobileNetV2Backbone`)
returning, besides ``MODEL.MOBILENET.OUT_FEATURES`` (the sources of the pyramid mask layers), the
output of the first ``HEAD_DEPTH`` stages as ``"head"`` (E, read by the IAM).

What a "stage" is, is our reading (``MODEL.FASSST.HEAD_STAGES``; docs/fassst.md):

========================  ========================================================  =====================
``HEAD_STAGES``           stages (torchvision ``features`` indices)                 depth 4 / 5 / 6 -> E
========================  ========================================================  =====================
``"detectron2"``          stem 0-1, res2 2-3, res3 4-6, res4 7-13, res5 14-17,      res4 (96 ch, /16),
(default)                 final 1x1 conv 18                                          res5 (320, /32),
                                                                                     1x1 conv (1280, /32)
``"mobilenetv2_table"``   the rows of the MobileNetV2 paper's table: conv 0, 1,      32 ch /8, 64 ch /16,
                          2-3, 4-6, 7-10, 11-13, 14-16, 17, conv 18                  96 ch /16
========================  ========================================================  =====================
"""
from __future__ import annotations

from typing import Dict, Tuple

from instseg.modeling import BACKBONE_REGISTRY
from instseg.modeling.backbone.mobilenet import MobileNetV2Backbone

__all__ = ["HEAD_STAGE_ENDS", "build_fassst_mobilenet_v2_backbone", "head_feature_index"]

# Last ``features`` index of each stage (1-based depth d -> HEAD_STAGE_ENDS[...][d - 1]).
HEAD_STAGE_ENDS: Dict[str, Tuple[int, ...]] = {
    "detectron2": (1, 3, 6, 13, 17, 18),
    "mobilenetv2_table": (0, 1, 3, 6, 10, 13, 16, 17, 18),
}


def head_feature_index(depth: int, stages: str = "detectron2") -> int:
    """``features`` index whose output is E for a head of ``depth`` stages.

    Raises:
        ValueError: unknown ``stages`` or ``depth`` outside ``1 .. number of stages``.
    """
    if stages not in HEAD_STAGE_ENDS:
        raise ValueError(f"MODEL.FASSST.HEAD_STAGES must be one of {sorted(HEAD_STAGE_ENDS)}, got '{stages}'")
    ends = HEAD_STAGE_ENDS[stages]
    if not 1 <= int(depth) <= len(ends):
        raise ValueError(f"MODEL.FASSST.HEAD_DEPTH must be in 1..{len(ends)} for HEAD_STAGES '{stages}', got {depth}")
    return ends[int(depth) - 1]


@BACKBONE_REGISTRY.register()
def build_fassst_mobilenet_v2_backbone(cfg) -> MobileNetV2Backbone:
    """MobileNetV2 (``MODEL.MOBILENET.*``, ``MODEL.BACKBONE.{FREEZE_AT, PRETRAINED}``) that also
    returns E = the first ``MODEL.FASSST.HEAD_DEPTH`` stages' output as ``"head"``."""
    m = cfg.MODEL.MOBILENET
    return MobileNetV2Backbone(
        width_mult=m.WIDTH_MULT,
        norm=m.NORM,
        out_features=list(m.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        pretrained=cfg.MODEL.BACKBONE.PRETRAINED,
        extra_outputs={"head": head_feature_index(cfg.MODEL.FASSST.HEAD_DEPTH, cfg.MODEL.FASSST.HEAD_STAGES)},
    )
