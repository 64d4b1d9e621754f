"""SparseInst (CVPR 2022) on the shared instseg core. Importing registers the meta-architecture
``SparseInst``, the ``MODEL.SPARSE_INST`` config keys and the official-checkpoint key table
(``instseg-convert --model sparseinst``)."""
from .config import add_sparseinst_config
from .convert import SPARSEINST_KEY_TABLE  # registers the official-checkpoint key table
from .decoder import IAMDecoder, InstanceBranch, MaskBranch
from .encoder import InstanceContextEncoder
from .loss import SparseInstCriterion
from .sparseinst import SparseInst

__all__ = [
    "IAMDecoder",
    "InstanceBranch",
    "InstanceContextEncoder",
    "MaskBranch",
    "SPARSEINST_KEY_TABLE",
    "SparseInst",
    "SparseInstCriterion",
    "add_sparseinst_config",
]
