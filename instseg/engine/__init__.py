"""Training/evaluation engine on Lightning."""
from .launch import build_trainer, default_setup, evaluate, last_checkpoint, setup_logging, train
from .module import InstSegDataModule, InstSegModule
from .optim import build_lr_lambda, build_optimizer, get_param_groups
from .predictor import Predictor

__all__ = [
    "InstSegDataModule",
    "InstSegModule",
    "Predictor",
    "build_lr_lambda",
    "build_optimizer",
    "build_trainer",
    "default_setup",
    "evaluate",
    "get_param_groups",
    "last_checkpoint",
    "setup_logging",
    "train",
]
