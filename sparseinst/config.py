"""Config keys of SparseInst (``MODEL.SPARSE_INST``), with the official code's defaults.

Where the official code differs from the paper's text (Sec. 4, "Implementation Details"), the
code's value is the default and the comment says so. Key names follow hustvl/SparseInst's
``sparseinst/config.py`` where it has the key; keys it lacks are ours (marked "ablation"), each
switching one part for the paper's Tables 2-7.
"""
from instseg.config import CfgNode as CN
from instseg.config import register_config_hook

__all__ = ["add_sparseinst_config"]


@register_config_hook
def add_sparseinst_config(cfg) -> None:
    """Add ``MODEL.SPARSE_INST`` to ``cfg`` (in place). Idempotent."""
    if "SPARSE_INST" in cfg.MODEL:
        return
    si = cfg.MODEL.SPARSE_INST = CN()

    # Instance context encoder (Sec. 3.2, Fig. 3; Table 2).
    si.ENCODER = CN()
    si.ENCODER.IN_FEATURES = ["res3", "res4", "res5"]
    si.ENCODER.NUM_CHANNELS = 256
    si.ENCODER.USE_PPM = True  # ablation, Table 2 "w/ PPM"
    si.ENCODER.USE_FUSION = True  # ablation, Table 2 "w/ fusion" (P3-P5 fused at 1/8)
    si.ENCODER.PPM_CHANNELS = 64  # NUM_CHANNELS // 4 in the official code
    si.ENCODER.PPM_SIZES = [1, 2, 3, 6]

    # IAM-based decoder (Sec. 3.3-3.4; Tables 3, 4, 7).
    si.DECODER = CN()
    si.DECODER.NUM_MASKS = 100  # N (Sec. 4)
    si.DECODER.KERNEL_DIM = 128  # dimension of mask kernels / mask features (official)
    si.DECODER.SCALE_FACTOR = 2.0  # masks upsampled from 1/8 to 1/4 (official)
    si.DECODER.OUTPUT_IAM = False
    si.DECODER.USE_COORD = True  # ablation, Table 3 "coord."
    si.DECODER.DEFORM_LAST_CONV = False  # ablation, Table 3 "dconv." (last conv of both branches)
    # F_iam (Table 4, Table 7): "conv3x3" | "conv1x1" | "two_conv3x3" | "group" | "cross_attention"
    si.DECODER.IAM = CN()
    si.DECODER.IAM.TYPE = "conv3x3"
    si.DECODER.IAM.ACTIVATION = "sigmoid"  # "sigmoid" | "softmax" (Table 4 "act.")
    si.DECODER.GROUPS = 4  # G of Group-IAM (used when IAM.TYPE == "group")
    si.DECODER.CROSS_ATTN_HEADS = 4  # Table 7, 4-head cross attention with NUM_MASKS queries
    si.DECODER.INST = CN()
    si.DECODER.INST.DIM = 256  # Table 3 width
    si.DECODER.INST.CONVS = 4  # Table 3 depth
    si.DECODER.MASK = CN()
    si.DECODER.MASK.DIM = 256
    si.DECODER.MASK.CONVS = 4

    # Losses (Eq. 3-4; Tables 5, 6). Paper text: lambda_c 2.0, lambda_dice 2.0, lambda_pix 2.0,
    # lambda_s 1.0; the official code (and the paper's remark "e.g. 5.0 brings improvements")
    # uses a pixel weight of 5.0.
    si.LOSS = CN()
    si.LOSS.CLASS_WEIGHT = 2.0
    si.LOSS.MASK_PIXEL_WEIGHT = 5.0  # official code; paper text 2.0
    si.LOSS.MASK_DICE_WEIGHT = 2.0
    si.LOSS.OBJECTNESS_WEIGHT = 1.0
    si.LOSS.FOCAL_ALPHA = 0.25
    si.LOSS.FOCAL_GAMMA = 2.0
    si.LOSS.USE_DICE = True  # ablation, Table 5 "Dice"
    si.LOSS.MASK_PIXEL_LOSS = "bce"  # ablation, Table 5: "bce" | "focal" | "none"
    si.LOSS.OBJECTNESS_LOSS = "bce"  # ablation, Table 6: "bce" | "l1" | "none" (no objectness)
    si.LOSS.OBJECTNESS_PRED_THRESHOLD = 0.4  # binarization of the prediction for the IoU target

    # Matching score (Eq. 1): dice^ALPHA * p^BETA; the paper writes beta = 1 - alpha.
    si.MATCHER = CN()
    si.MATCHER.ALPHA = 0.8
    si.MATCHER.BETA = 0.2

    # Inference (Sec. 3.6; official sparseinst.py): no NMS. At most TEST.DETECTIONS_PER_IMAGE
    # instances per image (the shared key of every model).
    si.CLS_THRESHOLD = 0.005
    si.MASK_THRESHOLD = 0.45
    si.RESCORE_WITH_OBJECTNESS = True  # ablation, Table 6 "rescore?": p~ = sqrt(p * s)
    si.RESCORE_WITH_MASK = True  # multiply by the mean mask probability inside the mask
