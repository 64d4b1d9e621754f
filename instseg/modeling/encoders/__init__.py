"""Encoders shared by SparseInst and FastInst (pyramid pooling, PPM-FPN)."""
from .ppm import PyramidPoolingModule
from .ppm_fpn import PPMFPN

__all__ = ["PPMFPN", "PyramidPoolingModule"]
