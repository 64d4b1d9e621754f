"""Encoder parts shared by SparseInst and FastInst: the pyramid pooling module (FastInst's PPM-FPN
pixel decoder is ``fastinst.ppm_fpn.PPMFPN``)."""
from .ppm import PyramidPoolingModule

__all__ = ["PyramidPoolingModule"]
