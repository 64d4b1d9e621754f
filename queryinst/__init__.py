"""QueryInst (ICCV 2021, "Instances as Queries") on the shared instseg core. Importing registers
the meta-architecture ``QueryInst`` and the ``MODEL.QUERY_INST`` config keys."""
from .box_head import DIIHead, QueryMSA, decode_box_deltas, encode_box_deltas
from .config import add_queryinst_config
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
