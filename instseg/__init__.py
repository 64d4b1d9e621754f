"""instseg: the shared core of the real-time instance segmentation framework.

Nothing model-specific lives here; the model packages (``sparseinst``, ...) import from it and
register their meta-architectures in :data:`instseg.modeling.META_ARCH_REGISTRY`.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # ``instseg.Predictor`` (instseg/engine/predictor.py), imported on first use so that
    # ``import instseg`` stays free of torch and Lightning
    if name == "Predictor":
        from .engine.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'instseg' has no attribute {name!r}")
