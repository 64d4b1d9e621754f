"""QueryInst (ICCV 2021, "Instances as Queries") on the shared instseg core. Importing registers
the meta-architecture ``QueryInst``, the ``MODEL.QUERY_INST`` config keys and the mmdetection
checkpoint key table (``instseg-convert --model queryinst``)."""
from .box_head import DIIHead, QueryMSA, decode_box_deltas, encode_box_deltas
from .config import add_queryinst_config
from .convert import QUERYINST_KEY_TABLE  # registers the official-checkpoint key table
from .criterion import QueryInstCriterion, crop_mask_targets
from .dynamic_conv import DynConv
from .mask_head import DynamicMaskHead
from .pooler import RoIPooler, assign_fpn_levels
from .queryinst import QueryInst
from .roi_head import QueryRoIHead

__all__ = [
    "DIIHead",
    "DynConv",
    "DynamicMaskHead",
    "QUERYINST_KEY_TABLE",
    "QueryInst",
    "QueryInstCriterion",
    "QueryMSA",
    "QueryRoIHead",
    "RoIPooler",
    "add_queryinst_config",
    "assign_fpn_levels",
    "crop_mask_targets",
    "decode_box_deltas",
    "encode_box_deltas",
]
