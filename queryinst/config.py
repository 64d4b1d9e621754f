"""Config keys of QueryInst (``MODEL.QUERY_INST``), with the official defaults.

Values come from the official configs (hustvl/QueryInst ``configs/queryinst/queryinst_r50_fpn_1x_coco.py``
and mmdetection's copy; docs/queryinst.md). The number of classes is **not** a QueryInst key: every head
reads ``MODEL.NUM_CLASSES`` (one place; the official configs repeat it in 6 box heads and 6 mask
heads, the classic custom-data bug of hustvl/QueryInst #20). Keys marked "ablation" switch one
part for the poster's Tables 4 and 6.
"""
import math

from instseg.config import CfgNode as CN
from instseg.config import register_config_hook

__all__ = ["add_queryinst_config"]


@register_config_hook
def add_queryinst_config(cfg) -> None:
    """Add ``MODEL.QUERY_INST`` to ``cfg`` (in place). Idempotent."""
    if "QUERY_INST" in cfg.MODEL:
        return
    q = cfg.MODEL.QUERY_INST = CN()

    # Learnable proposals (EmbeddingRPNHead) and stages.
    q.NUM_PROPOSALS = 100  # N: 100, or 300 in the crop configs
    q.HIDDEN_DIM = 256  # C: proposal feature / RoI channels
    q.NUM_STAGES = 6  # S; the poster's Table 1 also has a 5-stage model
    q.IN_FEATURES = ["p2", "p3", "p4", "p5"]  # FPN levels pooled by RoIAlign

    # RoIAlign (mmdetection SingleRoIExtractor: level = floor(log2(sqrt(wh) / 56)), aligned).
    q.BOX_POOLER_RESOLUTION = 7
    q.MASK_POOLER_RESOLUTION = 14  # mask logits and targets are 2x this (28)
    q.POOLER_SAMPLING_RATIO = 2
    q.POOLER_FINEST_SCALE = 56.0

    # Box head (DIIHead): MSA + DynConv^box + FFN + class/box FCs.
    q.NUM_HEADS = 8
    q.DIM_FEEDFORWARD = 2048
    q.DROPOUT = 0.0
    q.DYNAMIC_DIM = 64  # DynConv 256 -> 64 -> 256
    q.NUM_CLS_FCS = 1
    q.NUM_REG_FCS = 3
    q.PRIOR_PROB = 0.01  # class-bias init
    # DeltaXYWHBBoxCoder: means 0, stds (0.5, 0.5, 1, 1), log-ratio clamp |log(16/1000)|.
    q.BOX_DELTA_STDS = [0.5, 0.5, 1.0, 1.0]
    q.BOX_SCALE_CLAMP = math.log(1000.0 / 16)
    # Clip each stage's refined boxes to the image. Official: clip_border=False (boxes may leave the
    # image between stages); the final outputs are always clipped to the image.
    q.CLIP_BOXES = False

    # Dynamic mask head.
    q.MASK_HEAD = CN()
    q.MASK_HEAD.NUM_CONVS = 4
    q.MASK_HEAD.CONV_DIM = 256
    q.MASK_HEAD.NORM = "BN"
    q.MASK_HEAD.DYNAMIC_CONV = True  # ablation, Table 4 "DynConv^mask" (False: vanilla mask head, Fig. 2(b))
    q.MASK_HEAD.MASK_FLOW = False  # ablation, Table 4 "HTC Mask Flow" (not in the official code)

    # Query / MSA sharing between the box and mask branches (Table 6, Fig. 5; default (d)).
    q.SHARED_QUERY = True  # ablation
    q.SHARED_MSA = True  # ablation

    # Losses (all stages supervised, weight 1 each).
    q.LOSS = CN()
    q.LOSS.CLASS_WEIGHT = 2.0  # sigmoid focal
    q.LOSS.L1_WEIGHT = 5.0  # on boxes normalized by the image size
    q.LOSS.GIOU_WEIGHT = 2.0
    q.LOSS.MASK_WEIGHT = 8.0  # dice on the GT-class channel, 28x28
    q.LOSS.FOCAL_ALPHA = 0.25
    q.LOSS.FOCAL_GAMMA = 2.0
    q.LOSS.DICE_EPS = 1e-5  # mmdetection DiceLoss eps: added to sum(p^2) and to sum(t^2)
    q.LOSS.STAGE_WEIGHTS = []  # empty = 1.0 for every stage

    # Hungarian matching costs (mmdetection HungarianAssigner).
    q.MATCHER = CN()
    q.MATCHER.COST_CLASS = 2.0
    q.MATCHER.COST_L1 = 5.0
    q.MATCHER.COST_GIOU = 2.0

    # Inference: top TEST.DETECTIONS_PER_IMAGE (query, class) sigmoid scores (the official
    # max_per_img = NUM_PROPOSALS: the 300-proposal configs set 300); no NMS, no score threshold.
    q.MASK_THRESHOLD = 0.5
