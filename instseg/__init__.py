"""instseg: the shared core of the real-time instance segmentation framework.

Nothing model-specific lives here; the model packages (``sparseinst``, ...) import from it and
register their meta-architectures in :data:`instseg.modeling.META_ARCH_REGISTRY`.
"""

__version__ = "0.1.0"
