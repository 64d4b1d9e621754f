"""Encoders shared by SparseInst and FastInst (pyramid pooling, PPM-FPN)."""
from .ppm import PyramidPoolingModule

__all__ = ["PyramidPoolingModule"]
