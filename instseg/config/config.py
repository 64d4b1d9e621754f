"""Config creation, YAML loading with ``_BASE_`` and ``KEY VALUE`` overrides.

Built on fvcore's :class:`CfgNode` (the class Detectron2's config derives from). Unknown keys in
a YAML file or on the command line raise :class:`KeyError` naming the full key. ``_BASE_`` cycles,
missing base files and YAML syntax errors name the chain of included files
(:meth:`CfgNode.load_yaml_with_base`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Sequence

import yaml
from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvCfgNode

__all__ = ["CfgNode", "ConfigFileError", "get_cfg", "register_config_hook", "setup_cfg"]

_ABSOLUTE_PREFIXES = ("/", "https://", "http://")  # fvcore: not joined to the including dir


class ConfigFileError(ValueError):
    """A config file cannot be loaded: a ``_BASE_`` cycle, invalid YAML, a top level that is not a
    mapping, or a key a file cannot inherit. The message names the file and the chain of files
    that included it."""


def _is_url(path: str) -> bool:
    return path.startswith(("https://", "http://"))


def _chain_text(chain: Sequence[str]) -> str:
    return " -> ".join(chain)


def _included_from(chain: Sequence[str]) -> str:
    """`` (included from a.yaml -> b.yaml)`` for the files above the current one, or ``""``."""
    return f" (included from {_chain_text(chain)})" if chain else ""


class CfgNode(_FvCfgNode):
    """fvcore CfgNode whose unknown keys raise ``KeyError("Non-existent config key: X")``.

    ``merge_from_file`` resolves ``_BASE_`` relative to the including file (fvcore semantics).
    """

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> Dict[str, Any]:
        """``yaml.safe_load`` of ``filename`` with its ``_BASE_`` files merged below it.

        fvcore's semantics exactly (:meth:`fvcore.common.config.CfgNode.load_yaml_with_base`): a
        ``_BASE_`` (a path or a list of paths) starting with ``~`` is user-expanded; one that is
        not absolute (``/``) or a URL is relative to the directory of the including file; the
        bases of a list are merged in order (later ones win), then the including file over them
        (nested mappings merged key by key, any other value replaced); ``allow_unsafe`` retries
        a file whose tags ``yaml.safe_load`` rejects with ``yaml.unsafe_load`` (with a warning).
        Unlike fvcore's, the errors name the chain of files; a file may be included more than
        once (diamonds), only not by itself.

        Args:
            filename: path (or URL) of the config file.
            allow_unsafe: allow ``yaml.unsafe_load`` for files with Python tags.

        Returns:
            the merged mapping (``_BASE_`` removed).

        Raises:
            FileNotFoundError: ``filename`` or one of its bases does not exist, e.g.
                ``_BASE_ 'x.yaml' of configs/b.yaml (included from configs/a.yaml) not found:
                /abs/configs/x.yaml``.
            ConfigFileError: a ``_BASE_`` cycle (``configs/a.yaml -> configs/b.yaml ->
                configs/a.yaml: _BASE_ cycle``), invalid YAML (file, line and column, 1-based),
                a file whose top level is not a mapping, or a mapping that would replace a
                base's non-mapping value.
        """
        return cls._load_yaml_chain(filename, allow_unsafe, (), (), None)

    @classmethod
    def _load_yaml_chain(
        cls, filename: str, allow_unsafe: bool, chain: tuple, keys: tuple, base_ref: Any
    ) -> Dict[str, Any]:
        """One file of the ``_BASE_`` tree. ``chain``: the files including it (outermost first),
        ``keys``: their identities (real paths; URLs as written), ``base_ref``: the ``_BASE_``
        value that named it (``None`` for the top-level file)."""
        shown = filename if _is_url(filename) else os.path.normpath(filename)
        key = filename if _is_url(filename) else os.path.realpath(filename)
        if key in keys:  # this file is among those including it (a diamond is not a cycle)
            raise ConfigFileError(f"{_chain_text(list(chain) + [shown])}: {BASE_KEY} cycle")
        if not _is_url(filename) and not os.path.isfile(filename):
            if base_ref is None:
                raise FileNotFoundError(f"Config file not found: {os.path.abspath(filename)}")
            raise FileNotFoundError(
                f"{BASE_KEY} {base_ref!r} of {chain[-1]}{_included_from(chain[:-1])} not found: "
                f"{os.path.abspath(filename)}"
            )

        def invalid_yaml(e: yaml.YAMLError, hint: str = "") -> ConfigFileError:
            def at(mark) -> str:
                return f"line {mark.line + 1}, column {mark.column + 1}"

            pmark, cmark = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            mark = pmark or cmark
            where = f", {at(mark)}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e)
            context = getattr(e, "context", None)
            if context:
                what += f" ({context}" + (f" from {at(cmark)})" if cmark is not None and cmark is not mark else ")")
            return ConfigFileError(f"Invalid YAML in {shown}{where}{_included_from(chain)}: {what}{hint}")

        with cls._open_cfg(filename) as f:
            try:
                cfg = yaml.safe_load(f)
            except yaml.constructor.ConstructorError as e:
                if not allow_unsafe:
                    raise invalid_yaml(e, " (a tag yaml.safe_load refuses; allow_unsafe=True loads it)") from e
                logging.getLogger(__name__).warning(
                    "Loading config {} with yaml.unsafe_load. Your machine may "
                    "be at risk if the file contains malicious content.".format(filename)
                )
                f.close()
                with cls._open_cfg(filename) as f2:
                    try:
                        cfg = yaml.unsafe_load(f2)
                    except yaml.YAMLError as e2:
                        raise invalid_yaml(e2) from e2
            except yaml.YAMLError as e:
                raise invalid_yaml(e) from e
        if not isinstance(cfg, dict):
            raise ConfigFileError(
                f"{shown}{_included_from(chain)}: the top level of a config file must be a mapping "
                f"of keys, got {type(cfg).__name__}{' (the file is empty)' if cfg is None else ''}"
            )

        def merge_a_into_b(a: Dict[str, Any], b: Dict[str, Any]) -> None:
            # merge dict a into dict b. values in a will overwrite b. (fvcore's merge)
            for k, v in a.items():
                if isinstance(v, dict) and k in b:
                    if not isinstance(b[k], dict):
                        raise ConfigFileError(
                            f"Cannot inherit key '{k}' from base! ({shown}{_included_from(chain)}: "
                            f"a mapping cannot replace the base's {type(b[k]).__name__})"
                        )
                    merge_a_into_b(v, b[k])
                else:
                    b[k] = v

        inner_chain, inner_keys = chain + (shown,), keys + (key,)

        def _load_with_base(base_cfg_file: str) -> Dict[str, Any]:
            ref = base_cfg_file
            if base_cfg_file.startswith("~"):
                base_cfg_file = os.path.expanduser(base_cfg_file)
            if not any(map(base_cfg_file.startswith, _ABSOLUTE_PREFIXES)):
                # the path to base cfg is relative to the config file itself.
                base_cfg_file = os.path.join(os.path.dirname(filename), base_cfg_file)
            return cls._load_yaml_chain(base_cfg_file, allow_unsafe, inner_chain, inner_keys, ref)

        if BASE_KEY in cfg:
            if isinstance(cfg[BASE_KEY], list):
                base_cfg: Dict[str, Any] = {}
                base_cfg_files = cfg[BASE_KEY]
                for base_cfg_file in base_cfg_files:
                    merge_a_into_b(_load_with_base(base_cfg_file), base_cfg)
            else:
                base_cfg_file = cfg[BASE_KEY]
                base_cfg = _load_with_base(base_cfg_file)
            del cfg[BASE_KEY]

            merge_a_into_b(cfg, base_cfg)
            return base_cfg
        return cfg

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        """Merge ``cfg_filename`` (with its ``_BASE_`` files, :meth:`load_yaml_with_base`) into
        this config.

        Raises:
            FileNotFoundError: the file or one of its bases does not exist (names the chain).
            ConfigFileError: a ``_BASE_`` cycle or invalid YAML (names the file, line, chain).
            KeyError: a key is unknown (names the key and ``cfg_filename``).
        """
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
