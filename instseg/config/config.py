"""Config creation, YAML loading with ``_BASE_`` and ``KEY VALUE`` overrides.

Built on fvcore's :class:`CfgNode` (the class Detectron2's config derives from). Unknown keys in
a YAML file or on the command line raise :class:`KeyError` naming the full key.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, List

from fvcore.common.config import CfgNode as _FvCfgNode

__all__ = ["CfgNode", "get_cfg", "register_config_hook", "setup_cfg"]


class CfgNode(_FvCfgNode):
    """fvcore CfgNode whose unknown keys raise ``KeyError("Non-existent config key: X")``.

    ``merge_from_file`` resolves ``_BASE_`` relative to the including file (fvcore semantics).
    """

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        if not os.path.isfile(cfg_filename):
            raise FileNotFoundError(f"Config file not found: {cfg_filename}")
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        loaded = type(self)(loaded)
        try:
            self.merge_from_other_cfg(loaded)
        except KeyError as e:
            raise KeyError(f"{e.args[0]} (in {cfg_filename})") from None

    def merge_from_list(self, cfg_list: list) -> "CfgNode":
        try:
            return super().merge_from_list(cfg_list)
        except AssertionError as e:  # yacs asserts on unknown keys; make it a KeyError
            msg = str(e)
            if msg.startswith("Non-existent key"):
                raise KeyError(msg.replace("Non-existent key", "Non-existent config key")) from None
            raise


# Model packages register a function that adds their keys; get_cfg() loads every installed model
# package (entry points, instseg/discovery.py) and applies them all, so that a config of any
# installed model can be loaded by the shared tools.
_CONFIG_HOOKS: List[Callable[[CfgNode], None]] = []


def register_config_hook(fn: Callable[[CfgNode], None]) -> Callable[[CfgNode], None]:
    """Register ``fn(cfg)`` (e.g. ``add_sparseinst_config``) to run in every :func:`get_cfg`."""
    if fn not in _CONFIG_HOOKS:
        _CONFIG_HOOKS.append(fn)
    return fn


def get_cfg() -> CfgNode:
    """Return a fresh copy of the defaults plus every installed model's keys.

    The model packages are loaded first (their ``instseg.models`` entry points,
    :func:`instseg.discovery.discover_models`), then every registered hook runs, so the keys do
    not depend on what was imported before.

    Raises:
        instseg.discovery.ModelPackageImportError: a declared model package fails to import.
    """
    from ..discovery import discover_models
    from .defaults import _C

    discover_models()
    cfg = CfgNode(_C.clone())
    for fn in _CONFIG_HOOKS:
        fn(cfg)
    return cfg


def setup_cfg(config_file: str = "", opts: Iterable[str] = (), freeze: bool = True) -> CfgNode:
    """Defaults, then ``config_file``, then ``opts`` (``["KEY", "VALUE", ...]``).

    Raises:
        FileNotFoundError: the config file does not exist.
        KeyError: a key in the file or in ``opts`` is unknown (the message names it).
        ValueError: ``opts`` has an odd number of items.
    """
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    opts = list(opts or [])
    if len(opts) % 2:
        raise ValueError(f"Overrides must be KEY VALUE pairs, got an odd number: {opts}")
    if opts:
        cfg.merge_from_list(opts)
    if not cfg.MODEL.DEVICE:
        import torch

        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if freeze:
        cfg.freeze()
    return cfg
