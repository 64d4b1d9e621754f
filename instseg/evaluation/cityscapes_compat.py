"""Make cityscapesscripts 2.3.0's instance evaluation run on current NumPy, without pinning NumPy and
without editing site-packages.

Two problems of ``cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling`` (2.3.0, the last
release) on NumPy >= 2.4:

1. ``assignGt2Preds`` calls ``np.in1d``, which NumPy 2.4 removed (deprecated since 2.0 in favour
   of ``np.isin``): every evaluation fails with ``AttributeError``.
2. ``writeDict2JSON`` (``helpers/csHelpers.py``) serializes with ``default=lambda o: o.__dict__``;
   NumPy integers have no ``__dict__``, and on NumPy 2.x ``np.count_nonzero`` returns one, so
   writing ``matches.json`` (the per-image matches, ``pixelCount`` / ``intersection`` /
   ``voidIntersection``) fails with ``AttributeError: 'numpy.int64' object has no attribute
   '__dict__'``. It also writes ``matches.json`` into the current working directory.

:func:`patched_instance_evaluation` fixes both for the duration of a ``with`` block, only in that
module's namespace: the module's ``np`` name points to a proxy of NumPy that adds ``in1d`` (only
when NumPy lacks it) and its ``writeDict2JSON`` name to :func:`write_dict_to_json`, which converts
NumPy scalars and arrays and writes relative paths under a given folder. ``numpy`` itself and
every other module are untouched, and the old names are restored on exit.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import types
from typing import Any, Iterator, Optional

import numpy as np

__all__ = ["in1d", "json_default", "write_dict_to_json", "numpy_proxy", "patched_instance_evaluation",
           "patched_pixel_evaluation"]

_LOCK = threading.RLock()


def in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
    """``np.in1d`` as NumPy < 2.4 had it: ``np.isin`` on the flattened ``ar1`` (returns a 1-D bool
    array of ``ar1.size`` elements)."""
    return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert)


def json_default(o: Any) -> Any:
    """``json.dumps`` ``default=`` that accepts what cityscapesscripts stores: NumPy integers,
    floats and bools (as Python numbers), arrays (as lists), and other objects by their
    ``__dict__`` (cityscapesscripts' own rule).

    Raises:
        TypeError: an object that is none of these (as ``json`` does).
    """
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__dict__"):
        return o.__dict__
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_dict_to_json(data: Any, file_name: str, base_dir: Optional[str] = None) -> None:
    """cityscapesscripts' ``writeDict2JSON`` (sorted keys, indent 4) with :func:`json_default`; a
    relative ``file_name`` is written under ``base_dir`` (when given) instead of the working
    directory."""
    if base_dir is not None and not os.path.isabs(file_name):
        file_name = os.path.join(base_dir, file_name)
    text = json.dumps(data, default=json_default, sort_keys=True, indent=4)
    with open(file_name, "w") as f:
        f.write(text)


def numpy_proxy() -> types.ModuleType:
    """A module object that forwards every attribute to ``numpy`` and adds :func:`in1d` when
    ``numpy`` has no ``in1d`` (NumPy >= 2.4); on older NumPy it forwards ``in1d`` too."""
    proxy = types.ModuleType("numpy")

    def __getattr__(name: str) -> Any:
        return getattr(np, name)

    proxy.__getattr__ = __getattr__  # type: ignore[attr-defined]  # PEP 562 module __getattr__
    if not hasattr(np, "in1d"):
        proxy.in1d = in1d  # type: ignore[attr-defined]
    return proxy


@contextlib.contextmanager
def _patched(cs_eval: types.ModuleType, work_dir: Optional[str]) -> Iterator[types.ModuleType]:
    """Apply the two fixes of the module docstring to a cityscapesscripts evaluation module's
    namespace for the ``with`` block (lock held; the old names restored on exit)."""
    with _LOCK:
        saved = {k: cs_eval.__dict__[k] for k in ("np", "writeDict2JSON")}
        cs_eval.np = numpy_proxy()
        cs_eval.writeDict2JSON = lambda d, f: write_dict_to_json(d, f, base_dir=work_dir)
        try:
            yield cs_eval
        finally:
            cs_eval.__dict__.update(saved)


@contextlib.contextmanager
def patched_instance_evaluation(work_dir: Optional[str] = None) -> Iterator[types.ModuleType]:
    """``with patched_instance_evaluation(work_dir) as cs_eval:`` gives cityscapesscripts'
    ``evalInstanceLevelSemanticLabeling`` module with the two fixes of the module docstring applied
    to its namespace (``matches.json`` goes to ``work_dir`` when given). Re-entrant and
    thread-safe (a lock is held inside the block); the module's names are restored on exit.
    """
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    with _patched(cs_eval, work_dir) as m:
        yield m


@contextlib.contextmanager
def patched_pixel_evaluation(work_dir: Optional[str] = None) -> Iterator[types.ModuleType]:
    """The same two fixes for cityscapesscripts' ``evalPixelLevelSemanticLabeling`` (its
    ``evaluatePair`` calls ``np.in1d`` for the instance-level iIoU; its ``writeJSONFile`` uses
    ``writeDict2JSON``), as ``with patched_pixel_evaluation() as cs_eval:``."""
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs_eval

    with _patched(cs_eval, work_dir) as m:
        yield m
