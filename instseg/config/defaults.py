"""Detectron2-style default configuration shared by every model.

Key names follow Detectron2 where Detectron2 has the key, so that a researcher's configs and
command-line overrides carry over. Model packages add their own sub-trees (``MODEL.SPARSE_INST``,
...) through ``add_<name>_config(cfg)``.
"""
from fvcore.common.config import CfgNode as CN

_C = CN()

# ---------------------------------------------------------------------------- #
# Model
# ---------------------------------------------------------------------------- #
_C.MODEL = CN()
_C.MODEL.META_ARCHITECTURE = "SparseInst"
# "" = "cuda" when a GPU is visible, else "cpu".
_C.MODEL.DEVICE = ""
# Checkpoint loaded before training / evaluation: ours (.ckpt/.pth) or a converted official one.
_C.MODEL.WEIGHTS = ""
# RGB, 0-255 scale (ImageNet statistics, as torchvision/timm backbones expect).
_C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
_C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
# Images of a batch are padded so that height and width are multiples of this.
_C.MODEL.SIZE_DIVISIBILITY = 32
# Number of object classes. -1 = taken from the categories of DATASETS.TRAIN (or DATASETS.TEST
# when evaluating). A value that differs from the dataset's is an error naming both numbers.
_C.MODEL.NUM_CLASSES = -1

_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
# Stages to freeze: 0 = none, 1 = stem, 2 = stem + res2, ... (Detectron2 semantics).
_C.MODEL.BACKBONE.FREEZE_AT = 2
# Load ImageNet weights through the library's own loader (torchvision / timm) when
# MODEL.WEIGHTS does not already provide the backbone. Needs network access on first use.
_C.MODEL.BACKBONE.PRETRAINED = False

_C.MODEL.RESNETS = CN()
_C.MODEL.RESNETS.DEPTH = 50
# "FrozenBN" (default, for pretrained weights), "BN", "SyncBN" or "GN" (for training from scratch).
_C.MODEL.RESNETS.NORM = "FrozenBN"
_C.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
# Deformable 3x3 convs per stage [res2, res3, res4, res5] (Detectron2 key names).
_C.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]
# True: DCNv2 (offsets + modulation mask, 27 channels); False: offsets only (18 channels).
_C.MODEL.RESNETS.DEFORM_MODULATED = True
_C.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1
# From random weights, start the scale of every bottleneck's last norm (bn3) at 0, so each residual
# branch starts as the identity: mmdetection's ResNet default (QueryInst). BN / SyncBN / GN only
# (FrozenBN keeps 1); no effect with pretrained weights. False = Detectron2 (SparseInst, FastInst).
_C.MODEL.RESNETS.ZERO_INIT_RESIDUAL = False

# MobileNetV2 backbone (FASSST).
_C.MODEL.MOBILENET = CN()
_C.MODEL.MOBILENET.WIDTH_MULT = 1.0
_C.MODEL.MOBILENET.NORM = "FrozenBN"
# Stride-4/8/16/32 maps returned by build_mobilenet_v2_backbone (channels 24/32/96/320 at width 1).
_C.MODEL.MOBILENET.OUT_FEATURES = ["res3", "res4", "res5"]

# FPN (QueryInst, FASSST's ResNet alternative).
_C.MODEL.FPN = CN()
_C.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
_C.MODEL.FPN.OUT_CHANNELS = 256
_C.MODEL.FPN.NORM = ""
# "" (outputs p2..p5 for res2..res5) or "maxpool" (adds p6 = stride-2 subsampling of p5,
# Detectron2's LastLevelMaxPool).
_C.MODEL.FPN.TOP_BLOCK = ""

# ---------------------------------------------------------------------------- #
# Input
# ---------------------------------------------------------------------------- #
_C.INPUT = CN()
# Shortest-edge sizes sampled in training (choice), Detectron2 semantics.
_C.INPUT.MIN_SIZE_TRAIN = (800,)
_C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
_C.INPUT.MAX_SIZE_TRAIN = 1333
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
_C.INPUT.FORMAT = "RGB"
# Only "bitmask": the mapper rasterizes polygons to bitmasks when a dataset dict is loaded, at the
# augmented size from the transformed polygons (Detectron2's "bitmask" path); any other value is
# an error.
_C.INPUT.MASK_FORMAT = "bitmask"
# "horizontal", "vertical" or "none".
_C.INPUT.RANDOM_FLIP = "horizontal"
# Random crop as in the official SparseInst/FastInst "aug" configs: with probability PROB the
# short side is first resized to one of RESIZE_SHORT (before the crop), then a crop whose
# height/width are drawn from SIZE (TYPE "absolute_range": [min, max] pixels).
_C.INPUT.CROP = CN({"ENABLED": False})
_C.INPUT.CROP.TYPE = "absolute_range"
_C.INPUT.CROP.SIZE = [384, 600]
_C.INPUT.CROP.PROB = 0.5
_C.INPUT.CROP.RESIZE_SHORT = [400, 500, 600]
# Semantic / panoptic mappers only (Detectron2's RandomCrop_CategoryAreaConstraint): a crop is
# redrawn (up to 10 times) until no class other than the ignore label covers this fraction of it
# or more; 1.0 = plain crop. The instance mapper ignores it.
_C.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
# The mapper of the loaders (instseg.data.build_mapper): "instance" (DatasetMapper),
# "mask_former_semantic" (SemanticDatasetMapper), "mask_former_panoptic" (PanopticDatasetMapper).
_C.INPUT.DATASET_MAPPER_NAME = "instance"

# ---------------------------------------------------------------------------- #
# Datasets and loader
# ---------------------------------------------------------------------------- #
_C.DATASETS = CN()
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 4
_C.DATALOADER.ASPECT_RATIO_GROUPING = True
# Drop training images without any (non-crowd) instance.
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
# Before training/evaluation, open every image of the datasets in use and report every missing,
# corrupt or mis-sized file at once ("auto": only for datasets of at most
# DATALOADER.CHECK_FILES_MAX_IMAGES images; True: always; False: never).
_C.DATALOADER.CHECK_FILES = "auto"
_C.DATALOADER.CHECK_FILES_MAX_IMAGES = 10000

# ---------------------------------------------------------------------------- #
# Solver (iteration based)
# ---------------------------------------------------------------------------- #
_C.SOLVER = CN()
# "ADAMW" or "SGD".
_C.SOLVER.OPTIMIZER = "ADAMW"
_C.SOLVER.BASE_LR = 0.001
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.AMSGRAD = False
_C.SOLVER.WEIGHT_DECAY = 0.0001
# Weight decay for normalization parameters and embeddings (Detectron2 / Mask2Former keys).
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
_C.SOLVER.WEIGHT_DECAY_EMBED = 0.0
_C.SOLVER.WEIGHT_DECAY_BIAS = None
# Learning-rate multiplier for backbone parameters.
_C.SOLVER.BACKBONE_MULTIPLIER = 1.0
_C.SOLVER.IMS_PER_BATCH = 16
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.STEPS = (30000,)
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Keep only the newest N periodic checkpoints (model_XXXXXXX.ckpt; Detectron2's
# PeriodicCheckpointer max_to_keep). 0 keeps all. last.ckpt and model_final.ckpt are never removed.
_C.SOLVER.CHECKPOINT_KEEP_LAST = 0
_C.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
# "norm" (total norm over all parameters, e.g. QueryInst's max-norm 1.0) or "value".
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
_C.SOLVER.AMP = CN({"ENABLED": False})
# "fp16" or "bf16" when AMP is enabled.
_C.SOLVER.AMP.PRECISION = "fp16"

# ---------------------------------------------------------------------------- #
# Test
# ---------------------------------------------------------------------------- #
_C.TEST = CN()
# Evaluate on DATASETS.TEST every EVAL_PERIOD iterations (0 = only at the end).
_C.TEST.EVAL_PERIOD = 0
_C.TEST.DETECTIONS_PER_IMAGE = 100
# COCOeval implementation of the COCO evaluator (instseg.evaluation.COCO_EVAL_BACKENDS):
# "hotcoco" (pycocotools-compatible, in Rust: the same numbers, ~1/18 of the time for segm),
# "pycocotools" (the reference) or "faster_coco_eval" (pip install instseg[fast-eval]). Another
# value is an error naming this key; a backend that does not import falls back to pycocotools
# with a warning. docs/architecture.md, "COCO evaluation backend".
_C.TEST.COCO_EVAL_BACKEND = "hotcoco"

# ---------------------------------------------------------------------------- #
# Misc
# ---------------------------------------------------------------------------- #
_C.OUTPUT_DIR = "./output"
# < 0: a random seed is drawn (and logged).
_C.SEED = -1
_C.CUDNN_BENCHMARK = False
# Log training scalars every N iterations.
_C.LOG_PERIOD = 20
