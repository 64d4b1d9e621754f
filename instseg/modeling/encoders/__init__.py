"""Encoder parts shared by SparseInst and FastInst: the pyramid pooling module.

FastInst's PPM-FPN pixel decoder lives in ``fastinst.ppm_fpn``; ``PPMFPN`` is still importable from
here (lazily, without importing FastInst at core import time) for the callers of the old path.
"""
from .ppm import PyramidPoolingModule

__all__ = ["PyramidPoolingModule"]


def __getattr__(name: str):
    # old import path of the PPM-FPN (moved to fastinst/ppm_fpn.py); fastinst/fastinst.py still uses it
    if name == "PPMFPN":
        from fastinst.ppm_fpn import PPMFPN

        return PPMFPN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
