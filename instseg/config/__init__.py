from .config import CfgNode, get_cfg, register_config_hook, setup_cfg

__all__ = ["CfgNode", "get_cfg", "register_config_hook", "setup_cfg"]
