"""Load every installed model package, so that its config keys and meta-architecture are
registered before a config is read (docs/architecture.md, "Adding a model").

The packages are found through the ``instseg.models`` entry points (:mod:`instseg.discovery`);
the core names none of them. :func:`instseg.config.get_cfg` and
:func:`instseg.modeling.build_model` load them too, so calling this is only needed to get the
names, or to load the packages before anything else happens."""
from __future__ import annotations

from typing import List

from ..discovery import ENTRY_POINT_GROUP, ModelPackageImportError, discover_models

__all__ = ["ENTRY_POINT_GROUP", "ModelPackageImportError", "import_model_packages"]


def import_model_packages() -> List[str]:
    """Load every ``instseg.models`` entry point (each once); returns their names.

    Raises:
        ModelPackageImportError: a declared package is installed but fails to import (a broken
            install should not look like a missing model).
    """
    return discover_models()
