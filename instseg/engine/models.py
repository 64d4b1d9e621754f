"""Import every model package that is installed, so that its config keys and meta-architecture
are registered before a config is read (docs/architecture.md, Tools: the tools import all four)."""
from __future__ import annotations

import importlib
import logging

__all__ = ["MODEL_PACKAGES", "import_model_packages"]

MODEL_PACKAGES = ("sparseinst", "fastinst", "fassst", "queryinst")


def import_model_packages() -> list:
    """Import the model packages that exist; returns the names imported. A package that exists
    but fails to import raises (a broken install should not look like a missing model)."""
    done = []
    for name in MODEL_PACKAGES:
        if importlib.util.find_spec(name) is None:
            logging.getLogger(__name__).debug("model package %s not installed", name)
            continue
        importlib.import_module(name)
        done.append(name)
    return done
