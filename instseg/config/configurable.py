"""``@configurable``: a module is built from plain keyword arguments or from a config.

Detectron2's pattern (``detectron2.config.configurable``), rebuilt here because we do not import
Detectron2 (docs/architecture.md): the class's ``__init__`` takes its parts and values as keyword
arguments, and a ``from_config(cls, cfg, ...)`` classmethod maps a config to those arguments.
``Cls(cfg, ...)`` then equals ``Cls(**Cls.from_config(cfg, ...))``, and ``Cls(backbone=...,
...)`` builds it without any YAML.
"""
from __future__ import annotations

import functools
import inspect

__all__ = ["configurable"]


def _is_cfg(obj) -> bool:
    from fvcore.common.config import CfgNode

    return isinstance(obj, CfgNode)


def configurable(init_func):
    """Decorate ``__init__`` so that ``cls(cfg, *args, **kwargs)`` calls
    ``cls.from_config(cfg, *args, **kwargs)`` and passes the returned dict to ``__init__``.

    Raises:
        TypeError: the class has no ``from_config`` classmethod, or ``from_config`` did not
            return a dict.
    """
    if init_func.__name__ != "__init__":
        raise TypeError("@configurable decorates __init__ only")

    @functools.wraps(init_func)
    def wrapped(self, *args, **kwargs):
        cfg = args[0] if args else kwargs.get("cfg")
        if cfg is not None and _is_cfg(cfg):
            from_config = getattr(type(self), "from_config", None)
            if from_config is None or not inspect.ismethod(from_config):
                raise TypeError(f"{type(self).__name__} has no from_config classmethod")
            explicit = from_config(*args, **kwargs)
            if not isinstance(explicit, dict):
                raise TypeError(f"{type(self).__name__}.from_config must return a dict of __init__ arguments")
            init_func(self, **explicit)
        else:
            init_func(self, *args, **kwargs)

    return wrapped
