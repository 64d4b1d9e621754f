"""SparseInst (CVPR 2022) on the shared instseg core. Importing registers the meta-architecture
``SparseInst`` and the ``MODEL.SPARSE_INST`` config keys."""
from .config import add_sparseinst_config
from .decoder import IAMDecoder, InstanceBranch, MaskBranch
from .encoder import InstanceContextEncoder
from .loss import SparseInstCriterion
from .sparseinst import SparseInst

__all__ = [
    "IAMDecoder",
    "InstanceBranch",
    "InstanceContextEncoder",
    "MaskBranch",
    "SparseInst",
    "SparseInstCriterion",
    "add_sparseinst_config",
]
