"""Shared utilities: distributed helpers (:mod:`.comm`), command-line helpers (:mod:`.cli`), ...

Submodules are imported on use (``from instseg.utils import comm``) so that importing
``instseg.utils`` stays cheap and free of optional dependencies.
"""
