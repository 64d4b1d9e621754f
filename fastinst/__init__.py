"""FastInst (CVPR 2023) on the shared instseg core. Importing registers the meta-architecture
``FastInst``, the ``MODEL.FASTINST`` config keys and the official-checkpoint key table
(``instseg-convert --model fastinst``)."""
from .config import add_fastinst_config
from .convert import FASTINST_KEY_TABLE  # registers the official-checkpoint key table
from .criterion import FastInstCriterion
from .fastinst import FastInst, FastInstHead
from .query_proposal import QueryProposal, select_query_pixels
from .transformer_decoder import FastInstDecoder, Mask2FormerLightDecoder

__all__ = [
    "FASTINST_KEY_TABLE",
    "FastInst",
    "FastInstCriterion",
    "FastInstDecoder",
    "FastInstHead",
    "Mask2FormerLightDecoder",
    "QueryProposal",
    "add_fastinst_config",
    "select_query_pixels",
]
