"""Config keys of FastInst (``MODEL.FASTINST``), with the official code's defaults.

Key names follow junjiehe96/FastInst's ``fastinst/config.py`` and ``Fast-COCO-InstanceSegmentation.yaml``
where it has the key (``DEC_LAYERS``, ``NUM_OBJECT_QUERIES``, ``NUM_AUX_QUERIES``, ``CLASS_WEIGHT``,
``LOCATION_WEIGHT``, ``PROPOSAL_WEIGHT``, ``TRAIN_NUM_POINTS``, ...). The official pixel-decoder keys
``MODEL.SEM_SEG_HEAD.{IN_FEATURES, CONVS_DIM, MASK_DIM, NORM}`` live here under
``MODEL.FASTINST.PIXEL_DECODER`` / ``MODEL.FASTINST.MASK_DIM`` (the class count is ``MODEL.NUM_CLASSES``).
Keys the official code lacks are ours (marked "ablation"): each switches one part for the
supplement's Tables I-III.
"""
from instseg.config import CfgNode as CN
from instseg.config import register_config_hook

__all__ = ["add_fastinst_config"]


@register_config_hook
def add_fastinst_config(cfg) -> None:
    """Add ``MODEL.FASTINST`` to ``cfg`` (in place). Idempotent."""
    if "FASTINST" in cfg.MODEL:
        return
    fi = cfg.MODEL.FASTINST = CN()

    # PPM-FPN pixel decoder (main paper, "lightweight pixel decoder"; official MODEL.SEM_SEG_HEAD.*).
    fi.PIXEL_DECODER = CN()
    fi.PIXEL_DECODER.IN_FEATURES = ["res3", "res4", "res5"]
    fi.PIXEL_DECODER.CONVS_DIM = 256
    fi.PIXEL_DECODER.NORM = "GN"
    fi.PIXEL_DECODER.USE_PPM = True
    fi.PIXEL_DECODER.PPM_CHANNELS = 64  # CONVS_DIM // 4 in the official code
    fi.PIXEL_DECODER.PPM_SIZES = [1, 2, 3, 6]
    fi.MASK_DIM = 256

    # Dual-path Transformer decoder (main paper; docs/fastinst.md, official code).
    fi.HIDDEN_DIM = 256
    fi.NHEADS = 8
    fi.DIM_FEEDFORWARD = 1024
    fi.DROPOUT = 0.0
    fi.PRE_NORM = False
    fi.DEC_LAYERS = 1  # D1; 3 for D3 (official Base yaml: 1)
    fi.NUM_OBJECT_QUERIES = 100  # N_a (IA-guided queries, or learnable queries when B is off)
    fi.NUM_AUX_QUERIES = 8  # N_b (supplement A.4); 0 without E (Table I)
    # Learnable positional-embedding map, bilinearly resized to E4 and E3 (official
    # "meta_pos_embed"); 0 = round(sqrt(NUM_OBJECT_QUERIES)) as in the official code (10 for 100).
    fi.META_POS_EMBED_SIZE = 0

    # Table I switches (supplement A.1). Defaults = FastInst (A, B, C and E all on).
    fi.DUAL_PATH = True  # ablation "A": dual-path decoder; False = Mask2Former's masked-attention layers
    fi.IA_GUIDED_QUERIES = True  # ablation "B": instance activation-guided queries; False = learnable queries
    fi.GT_MASK_GUIDED = True  # ablation "C": ground-truth mask-guided learning (training only)
    fi.POS_EMBED = "learnable"  # ablation "E" (with NUM_AUX_QUERIES): "learnable" | "sine"
    fi.LOCAL_MAXIMUM_FIRST = True  # ablation, supplement Table III

    # Losses and matching (official Base yaml; docs/fastinst.md, official code).
    fi.DEEP_SUPERVISION = True
    fi.NO_OBJECT_WEIGHT = 0.1
    fi.CLASS_WEIGHT = 2.0
    fi.MASK_WEIGHT = 5.0
    fi.DICE_WEIGHT = 5.0
    fi.LOCATION_WEIGHT = 1000.0  # matching only; 0 = "w/o location cost" (supplement Table II)
    fi.PROPOSAL_WEIGHT = 20.0
    fi.TRAIN_NUM_POINTS = 112 * 112
    fi.OVERSAMPLE_RATIO = 3.0
    fi.IMPORTANCE_SAMPLE_RATIO = 0.75

    # Inference (official fastinst.py instance_inference): top TEST.DETECTIONS_PER_IMAGE
    # (query, class) pairs by softmax score; masks = sigmoid > MASK_THRESHOLD; no NMS.
    # (MODEL.<NAME>.MASK_THRESHOLD in every model; the official key is TEST.MASK_THRESHOLD.)
    fi.MASK_THRESHOLD = 0.5

    # Tasks at inference (official MODEL.FASTINST.TEST, Mask2Former's MODEL.MASK_FORMER.TEST keys
    # and defaults; supplement App. C, Table V): instance (default), semantic and panoptic, any
    # combination; docs/panoptic_semantic.md. Panoptic: queries kept whose top class is not "no
    # object" and whose score is > OBJECT_MASK_THRESHOLD; a segment is dropped when the share of its
    # mask (probability >= 0.5) that it wins is < OVERLAP_THRESHOLD. Semantic is computed at the
    # padded input size and then resized, unless SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE (implied
    # by INSTANCE_ON or PANOPTIC_ON, as in the official code).
    fi.TEST = CN()
    fi.TEST.SEMANTIC_ON = False
    fi.TEST.INSTANCE_ON = True
    fi.TEST.PANOPTIC_ON = False
    fi.TEST.OBJECT_MASK_THRESHOLD = 0.8
    fi.TEST.OVERLAP_THRESHOLD = 0.8
    fi.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
