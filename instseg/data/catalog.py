"""Dataset and metadata catalogs (Detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` idea).

A dataset is registered under a name with a function that returns its dataset dicts (see
docs/architecture.md, "Data contract"); the function runs only when the dataset is requested, so registering
is cheap. Each name also has a :class:`Metadata` object (``thing_classes``,
``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``, ``evaluator_type``, ...).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata"]

logger = logging.getLogger(__name__)


class _DatasetCatalog:
    """Global name -> loader function registry. Use the module-level :data:`DatasetCatalog`."""

    def __init__(self) -> None:
        self._fns: Dict[str, Callable[[], List[dict]]] = {}

    def register(self, name: str, fn: Callable[[], List[dict]]) -> None:
        """Register ``fn`` (no arguments, returns ``list[dict]``) under ``name``.

        Registering the same ``name`` again with an equal ``fn`` (the same object, or a loader that
        compares equal, e.g. the same json file and image root) is a no-op.

        Raises:
            TypeError: ``fn`` is not callable.
            ValueError: ``name`` is already registered with a different function.
        """
        if not callable(fn):
            raise TypeError(f"DatasetCatalog.register({name!r}, fn): fn must be callable, got {fn!r}")
        old = self._fns.get(name)
        if old is not None:
            if old is fn or old == fn:
                return
            raise ValueError(
                f"Dataset {name!r} is already registered with a different loader ({old!r}); "
                f"new one: {fn!r}. Use another name or call DatasetCatalog.remove({name!r}) first."
            )
        self._fns[name] = fn

    def get(self, name: str) -> List[dict]:
        """Call the registered function of ``name`` and return its dataset dicts.

        Raises:
            KeyError: ``name`` is not registered (the message lists the registered names).
        """
        try:
            fn = self._fns[name]
        except KeyError:
            raise KeyError(
                f"Dataset {name!r} is not registered. Registered datasets: {', '.join(self.list())}. "
                "Register a COCO-format dataset with register_coco_instances(name, json, image_root) "
                "or the tools' --dataset NAME JSON IMAGE_ROOT flag."
            ) from None
        dicts = fn()
        if not isinstance(dicts, list):
            raise TypeError(f"The loader of dataset {name!r} returned {type(dicts)}, expected a list")
        return dicts

    def list(self) -> List[str]:
        """Names of all registered datasets, sorted."""
        return sorted(self._fns)

    def remove(self, name: str) -> None:
        """Unregister ``name`` and drop its metadata (so that it can be registered anew).

        Raises:
            KeyError: ``name`` is not registered.
        """
        if name not in self._fns:
            raise KeyError(f"Dataset {name!r} is not registered")
        del self._fns[name]
        MetadataCatalog.remove(name)

    def clear(self) -> None:
        """Unregister everything (metadata included). Mostly for tests."""
        for name in list(self._fns):
            self.remove(name)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __repr__(self) -> str:
        return f"DatasetCatalog(registered datasets: {', '.join(self.list())})"


class Metadata:
    """Attribute bag describing one dataset (``SimpleNamespace``-like).

    An attribute, once set, cannot be set to a *different* value (that would mean two different
    datasets under one name): ``ValueError``. Setting the same value again is a no-op.
    Fields can also be *lazy* (:meth:`set_lazy`): computed by a function on first access, e.g. the
    category names read from a json file that does not exist yet at registration time.

    Common fields: ``thing_classes`` (``list[str]``, index = contiguous class id),
    ``thing_dataset_id_to_contiguous_id`` (``dict[int, int]``, json category id -> contiguous id),
    ``json_file``, ``image_root``, ``evaluator_type`` (``"coco"``).
    """

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_lazy", {})
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        # Only called when normal lookup fails.
        if key.startswith("__"):
            raise AttributeError(key)
        lazy = object.__getattribute__(self, "_lazy")
        if key in lazy:
            value = lazy[key]()
            del lazy[key]
            object.__setattr__(self, key, value)
            return value
        name = object.__getattribute__(self, "name")
        keys = sorted(k for k in self.__dict__ if not k.startswith("_")) + sorted(lazy)
        raise AttributeError(
            f"Attribute {key!r} does not exist in the metadata of dataset {name!r}. "
            f"Available keys: {keys}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name" and key in self.__dict__ and self.__dict__[key] != value:
            raise ValueError(f"Cannot rename metadata {self.name!r} to {value!r}")
        lazy = self.__dict__["_lazy"]
        if key in lazy:
            # Setting a lazily computed field directly: the explicit value wins.
            del lazy[key]
        if key in self.__dict__:
            old = self.__dict__[key]
            if old != value:
                raise ValueError(
                    f"Attribute {key!r} in the metadata of dataset {self.name!r} cannot be set to a "
                    f"different value: {_short(old)} != {_short(value)}. A second dataset must use "
                    "another name (or remove the first one)."
                )
            return
        object.__setattr__(self, key, value)

    def set(self, **kwargs: Any) -> "Metadata":
        """Set several attributes (same rules as attribute assignment); returns ``self``."""
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def set_lazy(self, key: str, fn: Callable[[], Any]) -> "Metadata":
        """Make ``key`` computed by ``fn()`` on first access (unless it is already set)."""
        if key not in self.__dict__:
            self._lazy[key] = fn
        return self

    def get(self, key: str, default: Any = None) -> Any:
        """``getattr(self, key, default)`` (a lazy field is computed)."""
        try:
            return getattr(self, key)
        except AttributeError:
            return default

    def has(self, key: str) -> bool:
        """Whether ``key`` is set or lazily available (does not compute it)."""
        return key in self.__dict__ or key in self._lazy

    def as_dict(self) -> Dict[str, Any]:
        """All fields (lazy ones computed) as a plain dict, ``name`` included."""
        for k in list(self._lazy):
            getattr(self, k)
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_short(v)}" for k, v in self.__dict__.items() if not k.startswith("_"))
        lazy = f", lazy={sorted(self._lazy)}" if self._lazy else ""
        return f"Metadata({fields}{lazy})"


def _short(v: Any, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


class _MetadataCatalog:
    """Global name -> :class:`Metadata`. Use the module-level :data:`MetadataCatalog`."""

    def __init__(self) -> None:
        self._meta: Dict[str, Metadata] = {}

    def get(self, name: str) -> Metadata:
        """The :class:`Metadata` of ``name``, created empty on first request."""
        m = self._meta.get(name)
        if m is None:
            m = self._meta[name] = Metadata(name=name)
        return m

    def list(self) -> List[str]:
        return sorted(self._meta)

    def remove(self, name: str) -> None:
        """Drop the metadata of ``name`` (no error when there is none)."""
        self._meta.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._meta


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()
