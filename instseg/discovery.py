"""Model discovery: the core finds the model packages through the ``instseg.models`` entry points.

The core never names a model. Each model package is declared by the distribution that installs
it, one line per package in the entry-point group :data:`ENTRY_POINT_GROUP`::

    # setup.py
    entry_points={"instseg.models": ["mymodel = mymodel"]}

    # or, in an installed distribution's *.dist-info/entry_points.txt
    [instseg.models]
    mymodel = mymodel

Loading an entry point imports its module; on import the package registers its
meta-architecture (``META_ARCH_REGISTRY``), its config keys (``register_config_hook``) and, if it
has official weights to convert, its key table (``instseg.convert.register_key_table``).

:func:`discover_models` loads every entry point of the group, each once per process (later calls
return at once). :func:`instseg.config.get_cfg` and :func:`instseg.modeling.build_model` call it,
so the keys of a config and the registered meta-architectures do not depend on what the caller
imported before.

A declared package that fails to import raises :class:`ModelPackageImportError` naming the entry
point and its distribution: a broken install (a missing dependency, a syntax error, stale
metadata whose module is gone) must not look like a model that is not installed. Uninstalling a
model removes its entry point, so it is then simply not discovered.

This module imports nothing of instseg, so any part of the core can call it without import cycles.
"""
from __future__ import annotations

import logging
import threading
from importlib import metadata
from typing import Dict, List

__all__ = ["ENTRY_POINT_GROUP", "ModelPackageImportError", "discover_models", "discovered_models", "model_entry_points"]

logger = logging.getLogger(__name__)

#: The entry-point group that model packages declare themselves in.
ENTRY_POINT_GROUP = "instseg.models"

_lock = threading.RLock()
_loaded: Dict[str, object] = {}  # entry point name -> what loading it returned (the module)
_done = False  # every entry point of the group has been loaded once
_in_progress = False  # a model package is being imported (it may itself call get_cfg())


class ModelPackageImportError(ImportError):
    """A model package declared in ``instseg.models`` is installed but does not import."""

    def __init__(self, message: str, model: str = ""):
        super().__init__(message, name=model or None)
        self.model = model


def model_entry_points() -> List[metadata.EntryPoint]:
    """The entry points of :data:`ENTRY_POINT_GROUP`, one per name (the first one found on
    ``sys.path`` wins; a second one with another value is logged and ignored)."""
    found: Dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        first = found.get(ep.name)
        if first is None:
            found[ep.name] = ep
        elif first.value != ep.value:
            logger.warning(
                "entry point %s '%s' is declared twice ('%s' and '%s'); using '%s'",
                ENTRY_POINT_GROUP, ep.name, first.value, ep.value, first.value,
            )
    return list(found.values())


def _distribution_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or "an unknown distribution"


def discover_models(refresh: bool = False) -> List[str]:
    """Load every ``instseg.models`` entry point not loaded yet; return the names loaded so far.

    Args:
        refresh: look for entry points again even if all were loaded before (a distribution
            installed or put on ``sys.path`` since); already loaded ones are not loaded twice.

    Raises:
        ModelPackageImportError: a declared package failed to import (the message names the entry
            point and its distribution; the original exception is its ``__cause__``).
    """
    global _done, _in_progress
    with _lock:
        if (_done and not refresh) or _in_progress:  # _in_progress: called while a package imports
            return list(_loaded)
        _in_progress = True
        try:
            for ep in model_entry_points():
                if ep.name in _loaded:
                    continue
                try:
                    _loaded[ep.name] = ep.load()
                except Exception as e:  # noqa: BLE001  (re-raised with the model's name)
                    raise ModelPackageImportError(
                        f"model package '{ep.name}' (entry point '{ep.name} = {ep.value}' in group "
                        f"'{ENTRY_POINT_GROUP}', from {_distribution_name(ep)}) failed to import: "
                        f"{type(e).__name__}: {e}. It is installed, so this is a broken install, not a "
                        "missing model: fix the error, or uninstall the distribution that declares it.",
                        model=ep.name,
                    ) from e
                logger.debug("loaded model package %s (%s)", ep.name, ep.value)
            _done = True
        finally:
            _in_progress = False
        return list(_loaded)


def discovered_models() -> Dict[str, object]:
    """Entry point name -> loaded module, for the packages loaded so far (no loading)."""
    with _lock:
        return dict(_loaded)
