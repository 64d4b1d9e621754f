"""Config keys of FASSST (``MODEL.FASSST``), with the paper's defaults.

FASSST (Cheng et al., WACV 2022) has no public code. Every value the paper states is the default
here with its source; every value it leaves open is our reading, marked "reading" (docs/fassst.md,
"FASSST: reading of the paper", explains each one), and is a key so that the other reading can be
tried.
"""
from instseg.config import CfgNode as CN
from instseg.config import register_config_hook

__all__ = ["add_fassst_config"]


@register_config_hook
def add_fassst_config(cfg) -> None:
    """Add ``MODEL.FASSST`` to ``cfg`` (in place). Idempotent."""
    if "FASSST" in cfg.MODEL:
        return
    fa = cfg.MODEL.FASSST = CN()

    # Network head (Sec. 3.1, Eq. 1; Table 5): the first HEAD_DEPTH stages of MobileNetV2 produce
    # the raw features E that the IAM reads. Used by build_fassst_mobilenet_v2_backbone.
    fa.HEAD_DEPTH = 5  # Table 5 (bold): 5
    # reading: what a "stage" is. "detectron2": stem, res2, res3, res4, res5, final 1x1 conv
    # (depth 5 -> E = res5, stride 32, 320 ch); "mobilenetv2_table": the rows of the MobileNetV2
    # paper's architecture table (depth 5 -> E after the 64-channel sequence, stride 16).
    fa.HEAD_STAGES = "detectron2"

    # Instance attention module (Sec. 3.2, Eq. 2, Fig. 4).
    fa.IAM = CN()
    # Backbone output the IAM reads: "head" (E of build_fassst_mobilenet_v2_backbone) or any other
    # backbone output, e.g. "p5" for ResNet-50-FPN (Table 6).
    fa.IAM.IN_FEATURE = "head"
    fa.NUM_SLOTS = 36  # n (Sec. 3.2: 36 on COCO, 49 on Cityscapes; Table 7 sweeps 16..81)
    fa.IAM.NUM_CONVS = 9  # Sec. 4.3.1: 9 conv layers (the last one is the 1x1 slot predictor)
    fa.IAM.POOL_AFTER = 4  # reading: convs at E's resolution before pooling to the sqrt(n) grid
    fa.IAM.DIM = 256  # reading (Fig. 4 sizes are not in the text)
    fa.IAM.NORM = "BN"  # reading
    fa.IAM.USE_COORD = False  # reading: CoordConv channels on E (not in the paper)
    # reading: s = number of classes (False) or classes + one confidence channel (True).
    fa.IAM.CONFIDENCE = False
    # reading: "cell_reference" (sigmoid(raw + logit(reference box of the slot's grid cell))) or
    # "absolute" (sigmoid(raw)); both give t, l, b, r as fractions of the padded input size.
    fa.IAM.BOX_PARAM = "cell_reference"
    fa.IAM.PRIOR_PROB = 0.01  # focal-loss class prior (RetinaNet), reading

    # Pyramid mask layers (Sec. 3.3).
    fa.PYRAMID = CN()
    # R1, R2, R3 sources, strides doubling (reading: stride 8/16/32).
    fa.PYRAMID.IN_FEATURES = ["res3", "res4", "res5"]
    fa.PYRAMID.DIM = 256  # reading
    fa.PYRAMID.NUM_CONVS = 1  # reading: one 3x3 conv (+ norm, no activation: Eq. 4 applies the ReLU)
    fa.PYRAMID.NORM = "BN"  # reading

    # ROI feature fusion (Sec. 3.3, Eq. 3-4; Table 9).
    fa.RFF = CN()
    fa.RFF.ENABLED = True  # Table 9 "with"; False feeds R1 alone
    fa.RFF.ROI_SIZE = 16  # reading: side of R1; R2 = ROI_SIZE / 2, R3 = ROI_SIZE / 4 (Sec. 3.3)
    fa.RFF.UPSAMPLE = "bilinear"  # Eq. 3: bilinear, rate 2 ("nearest" to try)
    fa.RFF.SAMPLING_RATIO = 0  # RoIAlign sampling (Detectron2's default, adaptive)
    fa.RFF.ALIGNED = True  # RoIAlign half-pixel alignment (Detectron2 ROIAlignV2)

    # Mask tail (Sec. 3.4, Fig. 6): 5 convs + 1 deconvolution.
    fa.TAIL = CN()
    fa.TAIL.DIM = 256  # reading
    # reading: "mask_rcnn" = 4 x conv3x3, deconv x2, 1x1 predictor; "deconv_last" = 5 x conv3x3,
    # deconv x2 to the mask logits.
    fa.TAIL.LAYOUT = "mask_rcnn"
    fa.TAIL.NORM = ""  # reading (Mask R-CNN's head has none)

    # Losses (Sec. 3.5, Eq. 5-6).
    fa.LOSS = CN()
    fa.LOSS.MASK_WEIGHT = 5.75  # lambda_m (Eq. 5)
    fa.LOSS.LOC_WEIGHT = 3.0  # lambda_l
    fa.LOSS.CLASS_WEIGHT = 1.25  # lambda_c
    # L_l "based on Focal Loss": "focal" = focal loss on the 4 normalized coordinates as soft
    # targets, |y - p|^gamma * BCE (equals the focal loss for 0/1 targets); "l1"; "giou".
    fa.LOSS.LOC_LOSS = "focal"
    fa.LOSS.LOC_FOCAL_GAMMA = 2.0
    fa.LOSS.FOCAL_ALPHA = 0.25  # L_c: sigmoid focal loss (RetinaNet defaults)
    fa.LOSS.FOCAL_GAMMA = 2.0
    fa.LOSS.DICE_SQUARED = False  # Eq. 6 Dice: sum p + sum g in the denominator
    fa.LOSS.DICE_EPS = 1.0  # smoothing on numerator and denominator
    # Boxes whose ROI features train the mask tail: "predicted" (Algorithm 1: ROIs from I),
    # "gt", or "predicted+gt" (both, Mask R-CNN adds GT boxes to its proposals).
    fa.LOSS.TRAIN_BOXES = "predicted"

    # Hungarian assignment of ground truth to the n slots (reading: the paper names no matcher).
    # cost = CLASS_WEIGHT * focal class cost + LOC_WEIGHT * location cost + GIOU_WEIGHT * (-GIoU)
    # (class and location weights = lambda_c and lambda_l of Eq. 5).
    fa.MATCHER = CN()
    fa.MATCHER.CLASS_WEIGHT = 1.25
    fa.MATCHER.LOC_WEIGHT = 3.0
    # "l1": L1 distance of the normalized (t, l, b, r) (DETR / Sparse R-CNN); "focal": L_l itself
    # (its values are small, so the class cost then decides most assignments).
    fa.MATCHER.LOC_COST = "l1"
    fa.MATCHER.GIOU_WEIGHT = 0.0

    # Inference.
    fa.SCORE_THRESHOLD = 0.05
    fa.MASK_THRESHOLD = 0.5
    fa.NMS_THRESHOLD = 0.0  # 0 = no NMS (set prediction); > 0: class-wise box NMS (torchvision)
