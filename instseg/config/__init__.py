from .config import CfgNode, get_cfg, register_config_hook, setup_cfg
from .configurable import configurable

__all__ = ["CfgNode", "configurable", "get_cfg", "register_config_hook", "setup_cfg"]
