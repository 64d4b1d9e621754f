"""Loading weights: whole-model checkpoints (``MODEL.WEIGHTS``) and ImageNet backbone files.

``load_checkpoint(model, path)`` accepts our Lightning ``.ckpt`` files, plain state dicts, and
Detectron2-style ``{"model": state_dict}`` files (e.g. official checkpoints after
``tools/convert_official_weights.py``). Tensors whose shape differs from the model's (a classifier
trained with another number of classes, when fine-tuning) are skipped with a warning naming each
key and both shapes; missing and unexpected keys are logged.

``load_backbone_weights(backbone, path)`` is the offline way to ImageNet initialization: a
torchvision / timm classification state dict (or a Detectron2 ImageNet ``.pkl``) loaded into a
backbone's library model, classifier ignored.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from .convert import _to_tensor, convert_backbone_key, read_weights_file

__all__ = [
    "IncompleteWeightsError",
    "check_complete_load",
    "describe_load_report",
    "is_complete_load",
    "load_backbone_weights",
    "load_checkpoint",
    "load_state_dict_with_report",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

# Detectron2-named keys in a file meant for our model: the file was not converted.
_OFFICIAL_HINT = re.compile(r"^backbone\.(stem\.|res[2-5]\.)|conv2_offset\.")
_CLASSIFIER = re.compile(r"^(fc|classifier|head|head\.fc|stem\.fc)\.")
# First keys of ImageNet classification files: torchvision / timm ResNet, MobileNetV2, and
# Detectron2's converted .pkl files (optionally prefixed "backbone.").
_IMAGENET_KEY = re.compile(r"^(backbone\.)?(conv1\.|stem\.conv1\.|layer1\.|res2\.|features\.0\.)")


def _strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The model state dict stored in ``path`` as ``{name: tensor}``.

    Accepted: a Lightning ``.ckpt`` (``"state_dict"`` whose ``"model."``-prefixed entries are the
    model; other entries of the LightningModule are ignored), a Detectron2-style
    ``{"model": state_dict}`` torch file, a plain state dict, a Detectron2 ``.pkl`` (numpy arrays
    become tensors). A ``"module."`` prefix on every key (DDP) is removed.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: the file holds no state dict.
    """
    raw = read_weights_file(path)  # unwraps "model" / "state_dict"
    sd = {k: t for k, t in ((k, _to_tensor(v)) for k, v in raw.items()) if t is not None}
    model_keys = _strip_prefix(sd, "model.")
    if model_keys:
        ignored = [k for k in sd if not k.startswith("model.")]
        if ignored:
            logger.info("%s: ignoring %d non-model entries of the checkpoint (e.g. %s)", path, len(ignored), ignored[:5])
        sd = model_keys
    if sd and all(k.startswith("module.") for k in sd):
        sd = _strip_prefix(sd, "module.")
    return sd


def load_state_dict_with_report(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict_shapes: bool = False, source: str = "checkpoint"
) -> Dict[str, list]:
    """Copy the entries of ``state_dict`` whose name and shape match ``model``'s.

    Values are cast to the model tensor's dtype (``load_state_dict`` semantics). BN
    ``num_batches_tracked`` counters are neither reported missing nor unexpected.

    Returns:
        ``{"loaded": [keys], "skipped_shape": [keys], "missing": [keys], "unexpected": [keys],
        "shapes": {key: (checkpoint shape, model shape)} for the skipped ones}``.

    Raises:
        ValueError: ``strict_shapes`` and some shape differs (all mismatches listed).
    """
    model_sd = model.state_dict()
    loadable: Dict[str, torch.Tensor] = {}
    skipped: List[str] = []
    shapes: Dict[str, Tuple[tuple, tuple]] = {}
    unexpected: List[str] = []
    for key, value in state_dict.items():
        if key not in model_sd:
            if not key.endswith("num_batches_tracked"):
                unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(model_sd[key].shape):
            skipped.append(key)
            shapes[key] = (tuple(value.shape), tuple(model_sd[key].shape))
            continue
        loadable[key] = value
    if skipped:
        lines = "\n".join(f"  {k}: {shapes[k][0]} in {source}, {shapes[k][1]} in the model" for k in skipped)
        if strict_shapes:
            raise ValueError(f"Shape mismatch between {source} and the model:\n{lines}")
        logger.warning("Skipped %d tensors of %s whose shape differs from the model's:\n%s", len(skipped), source, lines)
    missing = [k for k in model_sd if k not in loadable and k not in shapes and not k.endswith("num_batches_tracked")]
    incompatible = model.load_state_dict(loadable, strict=False)
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys  # filtered above
    if missing:
        logger.warning("%d model tensors are not in %s (left as initialized): %s", len(missing), source, _short(missing))
    if unexpected:
        logger.warning("%d tensors of %s are not in the model (ignored): %s", len(unexpected), source, _short(unexpected))
        if any(_OFFICIAL_HINT.search(k) for k in unexpected):
            logger.warning(
                "%s uses the official Detectron2 key names: convert it first with "
                "`python tools/convert_official_weights.py --model sparseinst|fastinst IN.pth OUT.pth`",
                source,
            )
    logger.info("Loaded %d/%d model tensors from %s", len(loadable), len(model_sd), source)
    return {
        "loaded": sorted(loadable),
        "skipped_shape": skipped,
        "missing": missing,
        "unexpected": unexpected,
        "shapes": shapes,
    }


def _short(keys: List[str], n: int = 30) -> str:
    return str(keys) if len(keys) <= n else f"{keys[:n]} ... (+{len(keys) - n} more)"


def load_checkpoint(model: nn.Module, path: str, strict_shapes: bool = False) -> Dict[str, list]:
    """Load ``MODEL.WEIGHTS``-style file ``path`` into ``model`` (see :func:`read_checkpoint`).

    When no key of the file is a key of ``model`` and the file looks like an ImageNet
    classification checkpoint (``conv1.weight``, ``stem.conv1.weight``, ``features.0.0.weight``,
    ...), it is loaded into ``model.backbone`` with :func:`load_backbone_weights`, as Detectron2
    does with ``MODEL.WEIGHTS: R-50.pkl``; the report then names every tensor outside the backbone
    as missing.

    Args:
        model: the full model (its ``state_dict()`` names are the reference).
        path: ``.ckpt`` / ``.pth`` / ``.pkl`` file.
        strict_shapes: raise instead of skipping tensors whose shape differs.

    Returns:
        the report of :func:`load_state_dict_with_report` (with ``"imagenet_backbone": True``
        when the ImageNet path was taken).

    Raises:
        FileNotFoundError: no file at ``path`` (named in the message).
        ValueError: the file holds no state dict; or ``strict_shapes`` and shapes differ.
    """
    state_dict = read_checkpoint(path)
    backbone = getattr(model, "backbone", None)
    if (
        isinstance(backbone, nn.Module)
        and not set(state_dict) & set(model.state_dict())
        and _is_imagenet_file(state_dict)
    ):
        # Detectron2 semantics: MODEL.WEIGHTS may name an ImageNet classification file (R-50.pkl)
        return _load_imagenet_into_model(model, backbone, path, strict_shapes)
    return load_state_dict_with_report(model, state_dict, strict_shapes=strict_shapes, source=str(path))


def _is_imagenet_file(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Every key belongs to a classification backbone (ResNet / MobileNetV2, any naming we map)."""
    if not any(_IMAGENET_KEY.match(k) for k in state_dict):
        return False
    for key in state_dict:
        key = key[len("backbone.") :] if key.startswith("backbone.") else key
        if _CLASSIFIER.match(key) or key.startswith("features."):
            continue
        try:
            convert_backbone_key(key)
        except (KeyError, ValueError):
            return False
    return True


def _load_imagenet_into_model(model: nn.Module, backbone: nn.Module, path: str, strict_shapes: bool) -> Dict[str, list]:
    target = _backbone_target(backbone)
    prefix = next(name for name, m in model.named_modules() if m is target) + "."
    logger.info("%s holds ImageNet classification weights: loading them into %s", path, prefix[:-1])
    rep = load_backbone_weights(backbone, path, strict_shapes=strict_shapes)
    rest = [k for k in model.state_dict() if not k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    logger.info("%d tensors outside the backbone keep their initialization", len(rest))
    return {
        "loaded": [prefix + k for k in rep["loaded"]],
        "skipped_shape": [prefix + k for k in rep["skipped_shape"]],
        "missing": [prefix + k for k in rep["missing"]] + rest,
        "unexpected": rep["unexpected"],
        "shapes": {prefix + k: v for k, v in rep["shapes"].items()},
        "imagenet_backbone": True,
    }


def _backbone_target(backbone: nn.Module) -> nn.Module:
    """The module whose names follow the classification model: ``body`` (ResNet), the
    ``bottom_up`` of an FPN, or the backbone itself (MobileNetV2's ``features``)."""
    while hasattr(backbone, "bottom_up"):
        backbone = backbone.bottom_up
    return getattr(backbone, "body", backbone)


def load_backbone_weights(backbone: nn.Module, path: str, strict_shapes: bool = False) -> Dict[str, list]:
    """Load an ImageNet classification checkpoint into ``backbone`` (the local-file alternative to
    ``MODEL.BACKBONE.PRETRAINED``).

    Accepted files: a torchvision / timm state dict (``conv1.weight``, ``layer1.0.conv1.weight``,
    ``features.0.0.weight``, ..., possibly under ``"state_dict"`` / ``"model"``), or a Detectron2
    ImageNet ``.pkl`` (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, optionally prefixed
    ``backbone.``), whose names are mapped to torchvision's. Classifier entries (``fc``,
    ``classifier``) are ignored; deformable offset convs are not in ImageNet files and stay
    zero-initialized.

    Returns:
        the report of :func:`load_state_dict_with_report`, with keys relative to the library model
        (``conv1.weight`` for ``backbone.body.conv1.weight``).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_checkpoint`.
    """
    target = _backbone_target(backbone)
    raw = read_weights_file(path)
    sd: Dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        tensor = _to_tensor(value)
        if tensor is None or key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone."):
            key = key[len("backbone.") :]
        if key.startswith("body."):
            key = key[len("body.") :]
        if _CLASSIFIER.match(key):
            continue
        if re.match(r"^(stem\.|res[2-5]\.)", key) or "conv2_offset" in key:
            try:
                key = convert_backbone_key(key)
            except KeyError:
                pass
            if key is None:
                continue
        sd[key] = tensor
    report = load_state_dict_with_report(target, sd, strict_shapes=strict_shapes, source=str(path))
    return report


class IncompleteWeightsError(ValueError):
    """A weights file does not hold every tensor of the model with the model's shape (raised by
    :func:`check_complete_load`; the message lists the missing, unexpected and shape-mismatched
    tensors)."""


def is_complete_load(report: Mapping[str, list]) -> bool:
    """True when a :func:`load_checkpoint` report has no missing, unexpected or shape-mismatched
    tensor (``num_batches_tracked`` counters are never reported, so they never count)."""
    return not (report.get("missing") or report.get("unexpected") or report.get("skipped_shape"))


def describe_load_report(report: Mapping[str, list], source: str, limit: int = 20) -> str:
    """Human-readable summary of a :func:`load_checkpoint` report: how many model tensors were
    loaded (BN ``num_batches_tracked`` counters not counted) and the names of the missing, unexpected and shape-mismatched ones (with both shapes).

    Args:
        report: the report of :func:`load_checkpoint` / :func:`load_state_dict_with_report`.
        source: the file name to print.
        limit: at most this many names per category (``0``: all); the count is always complete.

    Returns:
        A multi-line string (no trailing newline).
    """
    loaded = [k for k in report.get("loaded", []) if not k.endswith("num_batches_tracked")]  # never counted
    missing = report.get("missing", [])
    unexpected, skipped = report.get("unexpected", []), report.get("skipped_shape", [])
    shapes = report.get("shapes", {})
    total = len(loaded) + len(missing) + len(skipped)

    def names(keys: List[str]) -> str:
        shown = keys if limit <= 0 else keys[:limit]
        more = "" if len(shown) == len(keys) else f", ... (+{len(keys) - len(shown)} more)"
        return ", ".join(shown) + more

    lines = [f"{source}: {len(loaded)} of {total} model tensors loaded"
             + (" (an ImageNet classification file: backbone only)" if report.get("imagenet_backbone") else "")]
    if missing:
        lines.append(f"  {len(missing)} missing (not in the file, left as initialized): {names(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected (in the file, not in the model): {names(unexpected)}")
    if skipped:
        shown = skipped if limit <= 0 else skipped[:limit]
        more = "" if len(shown) == len(skipped) else f", ... (+{len(skipped) - len(shown)} more)"
        items = ", ".join(f"{k} {shapes[k][0]} in the file vs {shapes[k][1]} in the model" if k in shapes else k for k in shown)
        lines.append(f"  {len(skipped)} with another shape (skipped): {items}{more}")
    return "\n".join(lines)


def check_complete_load(report: Mapping[str, list], source: str, what: str = "the model") -> None:
    """Raise unless ``report`` (of :func:`load_checkpoint`) loaded every tensor of the model.

    Args:
        report: the load report.
        source: the weights file (named in the message).
        what: the model, as the message should name it (e.g. ``"SparseInst (80 classes)"``).

    Raises:
        IncompleteWeightsError: some tensor is missing, unexpected or of another shape; the
            message lists them (20 per category; :func:`describe_load_report` gives all).
    """
    if is_complete_load(report):
        return
    raise IncompleteWeightsError(
        f"MODEL.WEIGHTS does not fit {what}; evaluating it would score a partly random model.\n"
        + describe_load_report(report, source)
        + "\nUse the config the weights were trained with (model family, MODEL.NUM_CLASSES, backbone), "
        "or pass --allow-partial-weights to evaluate them anyway."
    )
