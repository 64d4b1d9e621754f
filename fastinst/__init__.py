"""FastInst (CVPR 2023) on the shared instseg core. Importing registers the meta-architecture
``FastInst`` and the ``MODEL.FASTINST`` config keys."""
from .config import add_fastinst_config
from .criterion import FastInstCriterion
from .fastinst import FastInst, FastInstHead
from .query_proposal import QueryProposal, select_query_pixels
from .transformer_decoder import FastInstDecoder, Mask2FormerLightDecoder

__all__ = [
    "FastInst",
    "FastInstCriterion",
    "FastInstDecoder",
    "FastInstHead",
    "Mask2FormerLightDecoder",
    "QueryProposal",
    "add_fastinst_config",
    "select_query_pixels",
]
