"""Convert official checkpoints (Detectron2 naming, e.g. SparseInst / FastInst) to our key names.

Official checkpoints come from Detectron2 (``{"model": state_dict, ...}`` torch files) and their
ImageNet initializations from Detectron2 ``.pkl`` files (pickled dicts of numpy arrays). The
layouts are listed in ``tests/refs/*.json`` (every key with its shape).

Our backbones keep the library model as ``backbone.body`` (torchvision / timm names), so:

==========================================  ==================================================
official (Detectron2 ResNet)                ours
==========================================  ==================================================
``backbone.stem.conv1.weight``              ``backbone.body.conv1.weight``
``backbone.stem.conv1.norm.X``              ``backbone.body.bn1.X``
``backbone.resN.i.convK.weight``            ``backbone.body.layer{N-1}.i.convK.weight``
``backbone.resN.i.convK.norm.X``            ``backbone.body.layer{N-1}.i.bnK.X``
``backbone.resN.0.shortcut.weight``         ``backbone.body.layer{N-1}.0.downsample.0.weight``
``backbone.resN.0.shortcut.norm.X``         ``backbone.body.layer{N-1}.0.downsample.1.X``
``backbone.resN.i.conv2_offset.X``          ``backbone.body.layer{N-1}.i.conv2.offset.X``
official (timm ResNet-D, ``-vd`` configs)   ours
``backbone.conv1.0.weight``, ``layerN...``  ``backbone.body.`` + the same name
``backbone.layerN.i.conv2_offset.X``        ``backbone.body.layerN.i.conv2.offset.X``
==========================================  ==================================================

``num_batches_tracked`` and classifier (``fc``) entries are dropped. Non-backbone keys go through a
per-model table of ``(official prefix, our prefix)`` pairs (and, for layouts whose indices differ,
``(regex, replacement)`` patterns), a :class:`ModelKeyTable` that the model package registers with
:func:`register_key_table` when it is imported (e.g. ``sparseinst/convert.py``); the table also says
where the library ResNet sits in the model (``backbone.body.``, or ``backbone.bottom_up.body.``
under an FPN, ``queryinst/convert.py``);
:func:`model_key_tables` loads the installed model packages (:mod:`instseg.discovery`) and returns
them all. The core holds no model's table.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "BACKBONE_KEY_RULES",
    "MODEL_KEY_TABLES",
    "ConversionReport",
    "ModelKeyTable",
    "convert_backbone_key",
    "convert_official_state_dict",
    "convert_with_report",
    "model_key_tables",
    "official_keys_from_ref",
    "read_weights_file",
    "register_key_table",
    "state_dict_from_shapes",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- #
# Backbone keys (relative to "backbone."), first matching rule wins. A replacement is a format
# string over the match groups, with {layer} = N - 1 for a Detectron2 stage "resN".
# --------------------------------------------------------------------------------------------- #
_Rule = Tuple["re.Pattern[str]", Callable[["re.Match[str]"], str]]


def _d2(fmt: str) -> Callable[["re.Match[str]"], str]:
    """Replacement for Detectron2 stage keys: group 1 is N of ``resN``; {layer} = N - 1."""
    return lambda m: fmt.format(*m.groups(), layer=int(m.group(1)) - 1)


BACKBONE_KEY_RULES: List[_Rule] = [
    # Detectron2 ResNet (torchvision-converted R-50.pkl / R-101.pkl, STRIDE_IN_1X1 False)
    (re.compile(r"^stem\.conv1\.(weight|bias)$"), lambda m: f"conv1.{m.group(1)}"),
    (re.compile(r"^stem\.conv1\.norm\.(.+)$"), lambda m: f"bn1.{m.group(1)}"),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([123])\.(weight|bias)$"), _d2("layer{layer}.{1}.conv{2}.{3}")),
    (re.compile(r"^res([2-5])\.(\d+)\.conv([123])\.norm\.(.+)$"), _d2("layer{layer}.{1}.bn{2}.{3}")),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\.(weight|bias)$"), _d2("layer{layer}.{1}.downsample.0.{2}")),
    (re.compile(r"^res([2-5])\.(\d+)\.shortcut\.norm\.(.+)$"), _d2("layer{layer}.{1}.downsample.1.{2}")),
    # Detectron2 deformable blocks: offset conv is a sibling "conv2_offset" (ours: conv2.offset)
    (re.compile(r"^res([2-5])\.(\d+)\.conv2_offset\.(weight|bias)$"), _d2("layer{layer}.{1}.conv2.offset.{2}")),
    (re.compile(r"^res([2-5])\.(\d+)\.conv2\.offset\.(weight|bias)$"), _d2("layer{layer}.{1}.conv2.offset.{2}")),
    # timm / torchvision names (official ResNet-D backbones): same names, offset conv renamed
    (re.compile(r"^(layer[1-4]\.\d+)\.conv2_offset\.(weight|bias)$"), lambda m: f"{m.group(1)}.conv2.offset.{m.group(2)}"),
    (re.compile(r"^((?:conv1|bn1|layer[1-4])\..+)$"), lambda m: m.group(1)),
]

# Keys dropped from a backbone: BN counters and ImageNet classifiers ("stem.fc" in the pkl files
# produced by Detectron2's convert-torchvision-to-d2.py).
_BACKBONE_DROP = re.compile(r"(^|\.)num_batches_tracked$|^(stem\.)?fc\.")
# Caffe2 (MSRA) ImageNet weights: BGR, stride in the 1x1 conv; another architecture than ours.
_CAFFE2_KEY = re.compile(r"(^|\.)(res\d_\d+_branch|res_conv1_|conv1_w$)")


@dataclass(frozen=True)
class ModelKeyTable:
    """How one model's official keys map to ours, outside the backbone.

    ``prefixes``: ``(official prefix, our prefix)`` pairs, first match wins (longest first if they
    overlap). ``drop``: official prefixes that have no counterpart (loss buffers, ...).
    ``patterns``: ``(regex, replacement)`` pairs tried before ``prefixes``, first match wins: the
    regex is matched at the start of the key (:func:`re.match`), the matched part is replaced by
    ``match.expand(replacement)`` (``\\1`` = group 1) and the rest of the key is kept; for
    official layouts whose module indices or nesting differ from ours (mmdetection's).
    ``backbone_prefix``: where our library ResNet sits in the model, the target of the
    ``backbone.*`` keys (:data:`BACKBONE_KEY_RULES`).
    """

    prefixes: Tuple[Tuple[str, str], ...]
    drop: Tuple[str, ...] = ()
    patterns: Tuple[Tuple[str, str], ...] = ()
    backbone_prefix: str = "backbone.body."


#: The registry: model name (lower case, the ``--model`` of ``instseg-convert``) -> its table, as
#: registered so far by the model packages. Read it through :func:`model_key_tables`, which loads
#: the installed packages first, so that the result does not depend on what was imported before.
MODEL_KEY_TABLES: Dict[str, ModelKeyTable] = {}


def register_key_table(name: str, table: ModelKeyTable) -> ModelKeyTable:
    """Register ``table`` as the official-key table of model ``name`` (stored lower case).

    Model packages call it when they are imported. Registering the same name again with an equal
    table is a no-op (a re-imported module).

    Raises:
        TypeError: ``table`` is not a :class:`ModelKeyTable`.
        ValueError: ``name`` is empty, or already registered with another table.
    """
    if not isinstance(table, ModelKeyTable):
        raise TypeError(f"register_key_table('{name}', ...) expects a ModelKeyTable, got {type(table).__name__}")
    key = str(name).lower()
    if not key:
        raise ValueError("register_key_table: empty model name")
    old = MODEL_KEY_TABLES.get(key)
    if old is not None and old != table:
        raise ValueError(f"A different key table is already registered for model '{key}'")
    MODEL_KEY_TABLES[key] = table
    return table


def model_key_tables() -> Dict[str, ModelKeyTable]:
    """Every installed model's table (the model packages are loaded first), name -> table.

    Raises:
        instseg.discovery.ModelPackageImportError: a declared model package fails to import.
    """
    from .discovery import discover_models

    discover_models()
    return dict(MODEL_KEY_TABLES)

#: Our backbone's prefix in a model whose ``backbone`` is the ResNet itself (``model.backbone.body``
#: holds the library ResNet); the default :attr:`ModelKeyTable.backbone_prefix`.
OUR_BACKBONE_PREFIX = "backbone.body."


def convert_backbone_key(key: str) -> Optional[str]:
    """Official backbone key without ``"backbone."`` -> our key relative to ``backbone.body``.

    Returns ``None`` for keys to drop (``num_batches_tracked``, ``fc``) and raises ``KeyError``
    for a key no rule knows.

    Raises:
        ValueError: Caffe2/MSRA-style keys (``res2_0_branch2a_w``): those weights expect BGR input
            and a stride in the 1x1 conv, so they do not fit our torchvision-layout ResNet.
        KeyError: no rule matches.
    """
    if _BACKBONE_DROP.search(key):
        return None
    if _CAFFE2_KEY.search(key):
        raise ValueError(
            f"'{key}' is a Caffe2/MSRA ResNet key (BGR, stride in 1x1); use the torchvision-converted "
            "ImageNet weights (Detectron2's ImageNetPretrained/torchvision/R-50.pkl) instead"
        )
    for pattern, repl in BACKBONE_KEY_RULES:
        m = pattern.match(key)
        if m:
            return repl(m)
    raise KeyError(key)


@dataclass
class ConversionReport:
    """What :func:`convert_with_report` did with each input key."""

    converted: Dict[str, str] = field(default_factory=dict)  # official -> ours
    dropped: List[str] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)  # kept under their official name

    def counts(self) -> Dict[str, int]:
        return {"converted": len(self.converted), "dropped": len(self.dropped), "unmatched": len(self.unmatched)}


def _to_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, np.generic):
        return torch.as_tensor(np.asarray(value))
    return None


def convert_with_report(
    state_dict: Mapping[str, Union[torch.Tensor, np.ndarray]], model: str
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """:func:`convert_official_state_dict` plus a :class:`ConversionReport` (for the CLI)."""
    model = model.lower()
    tables = model_key_tables()
    if model not in tables:
        raise ValueError(f"Unknown model '{model}'; expected one of {sorted(tables)} (the installed models with a key table)")
    table = tables[model]
    out: Dict[str, torch.Tensor] = {}
    report = ConversionReport()
    for key, value in state_dict.items():
        tensor = _to_tensor(value)
        if tensor is None:
            report.dropped.append(key)
            continue
        if key.endswith("num_batches_tracked") or any(key.startswith(p) for p in table.drop):
            report.dropped.append(key)
            continue
        new_key: Optional[str] = None
        for pattern, repl in table.patterns:
            m = re.match(pattern, key)
            if m:
                new_key = m.expand(repl) + key[m.end() :]
                break
        if new_key is None and key.startswith("backbone."):
            try:
                rel = convert_backbone_key(key[len("backbone.") :])
            except KeyError:
                rel = "<unmatched>"
            if rel is None:
                report.dropped.append(key)
                continue
            if rel != "<unmatched>":
                new_key = table.backbone_prefix + rel
        elif new_key is None:
            for official, ours in table.prefixes:
                if key.startswith(official):
                    new_key = ours + key[len(official) :]
                    break
            if new_key is None:
                # a bare ImageNet checkpoint (no "backbone." prefix): backbone keys on their own
                try:
                    rel = convert_backbone_key(key)
                except KeyError:
                    rel = "<unmatched>"
                if rel is None:
                    report.dropped.append(key)
                    continue
                if rel != "<unmatched>":
                    new_key = table.backbone_prefix + rel
        if new_key is None:
            report.unmatched.append(key)
            new_key = key
        else:
            report.converted[key] = new_key
        if new_key in out:
            raise ValueError(f"Two official keys map to '{new_key}' (the second is '{key}')")
        out[new_key] = tensor
    if report.unmatched:
        logger.warning(
            "%d official keys matched no rule and are kept under their own names: %s",
            len(report.unmatched),
            report.unmatched[:20],
        )
    return out, report


def convert_official_state_dict(
    state_dict: Mapping[str, Union[torch.Tensor, np.ndarray]], model: str
) -> Dict[str, torch.Tensor]:
    """Map an official ``model`` state dict to our keys.

    Args:
        state_dict: official key -> ``torch.Tensor`` or ``numpy.ndarray`` (``.pkl`` files);
            arrays become tensors with the same dtype and shape.
        model: the name of a registered key table (:func:`model_key_tables`; e.g. sparseinst,
            fastinst), case-insensitive.

    Returns:
        our key -> tensor. Backbone keys per the table in this module's docstring;
        ``num_batches_tracked``, classifier keys and the table's ``drop`` prefixes (loss buffers
        such as ``criterion.*``) dropped; keys no rule matches
        are kept under their official name (and logged), so that loading reports them.

    Raises:
        ValueError: unknown ``model``; Caffe2/MSRA backbone keys; two keys mapping to one.
    """
    return convert_with_report(state_dict, model)[0]


def read_weights_file(path: str) -> Dict[str, Union[torch.Tensor, np.ndarray]]:
    """The flat state dict inside ``path``: a torch file or a Detectron2 ``.pkl`` (pickled numpy).

    Unwraps ``{"model": ...}`` (Detectron2) and ``{"state_dict": ...}`` (Lightning, timm training
    checkpoints). Values are left as stored (tensors or numpy arrays).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no mapping of arrays / tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            logger.warning(
                "%s holds objects other than tensors; loading it with weights_only=False "
                "(only do this with files you trust)",
                path,
            )
            obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors/arrays)")
    return dict(obj)


def official_keys_from_ref(json_path: str) -> Dict[str, List[int]]:
    """``state_dict`` of a ``refs/*.json`` file: official key -> shape (list of ints).

    Raises:
        FileNotFoundError: no such file. KeyError: the json has no ``state_dict``.
    """
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"Reference file not found: {json_path}")
    with open(json_path) as f:
        ref = json.load(f)
    return {k: [int(s) for s in v] for k, v in ref["state_dict"].items()}


def state_dict_from_shapes(shapes: Mapping[str, Sequence[int]], fill: float = 0.0) -> Dict[str, torch.Tensor]:
    """A fake state dict: ``key -> torch.full(shape, fill)`` (float32) for each key (tests)."""
    return {k: torch.full(tuple(s), fill, dtype=torch.float32) for k, s in shapes.items()}
