"""Pieces of the data contract every meta-architecture shares (docs/architecture.md, "Data contract").

Inputs are lists of dicts with ``"image"``: ``uint8 (3, H, W)`` RGB; the model normalizes and pads
them itself, and returns results at ``("height", "width")``, the original size.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .postprocessing import boxes_from_masks, masks_to_original

__all__ = ["MetaArchBase", "boxes_from_masks", "collect_targets", "masks_to_original", "pad_to_divisible"]


def pad_to_divisible(
    tensors: Sequence[torch.Tensor], size_divisibility: int = 32, pad_value: float = 0.0
) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Stack ``(C, H_i, W_i)`` tensors into ``(B, C, H, W)``, zero-padded at the bottom/right.

    ``H`` and ``W`` are the largest ``H_i``/``W_i`` rounded up to a multiple of
    ``size_divisibility`` (no rounding for values <= 1). Returns the batch and the unpadded
    ``(H_i, W_i)`` of each image.
    """
    if len(tensors) == 0:
        raise ValueError("pad_to_divisible: empty list of images")
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
    max_h = max(s[0] for s in sizes)
    max_w = max(s[1] for s in sizes)
    if size_divisibility > 1:
        d = size_divisibility
        max_h = (max_h + d - 1) // d * d
        max_w = (max_w + d - 1) // d * d
    out = tensors[0].new_full((len(tensors), tensors[0].shape[0], max_h, max_w), pad_value)
    for i, t in enumerate(tensors):
        out[i, :, : t.shape[-2], : t.shape[-1]].copy_(t)
    return out, sizes


def collect_targets(batched_inputs: Sequence[Dict], keys: Sequence[str], device) -> List[Dict[str, torch.Tensor]]:
    """The ground truth of a training batch: per image ``{key: inputs["instances"][key]}`` moved to
    ``device`` (``labels`` int64 ``(M,)``, ``masks`` bool ``(M, H, W)``, ``boxes`` float ``(M, 4)``
    xyxy pixels of the augmented image; docs/architecture.md, "Data contract").

    Raises:
        KeyError: an input has no ``"instances"``, or they lack one of ``keys`` (both named).
    """
    targets = []
    for x in batched_inputs:
        if "instances" not in x:
            raise KeyError(f"training inputs need 'instances' ({', '.join(keys)}); got keys {sorted(x)}")
        inst = x["instances"]
        missing = [k for k in keys if k not in inst]
        if missing:
            raise KeyError(f"training 'instances' lack {missing} (have {sorted(inst)})")
        targets.append({k: inst[k].to(device) for k in keys})
    return targets


class MetaArchBase(nn.Module):
    """Base class of the four meta-architectures: pixel normalization and padding, the device,
    and the inference knobs that mean the same in every model.

    Args:
        pixel_mean, pixel_std: RGB, 0-255 scale (``MODEL.PIXEL_MEAN`` / ``MODEL.PIXEL_STD``).
        size_divisibility: the padded batch is a multiple of it (``MODEL.SIZE_DIVISIBILITY``).
        detections_per_image: at most this many instances per image, the highest scores
            (``TEST.DETECTIONS_PER_IMAGE``; :func:`instseg.modeling.postprocessing.select_top`).
        mask_threshold: a pixel is foreground when its probability is ``> mask_threshold``
            (``MODEL.<NAME>.MASK_THRESHOLD``, the official default of each model).

    Subclasses implement ``forward(batched_inputs)`` following the data contract
    (docs/architecture.md) and take their parts as keyword arguments, with a ``from_config(cfg)``
    classmethod (:func:`instseg.config.configurable`).

    Raises:
        ValueError: mean/std without 3 values, ``detections_per_image < 1`` or a mask threshold
            outside ``(0, 1)``.
    """

    def __init__(
        self,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int,
        detections_per_image: int = 100,
        mask_threshold: float = 0.5,
    ):
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("PIXEL_MEAN and PIXEL_STD need 3 values (RGB)")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size_divisibility = int(size_divisibility)
        if int(detections_per_image) < 1:
            raise ValueError(f"TEST.DETECTIONS_PER_IMAGE must be >= 1, got {detections_per_image}")
        if not 0.0 < float(mask_threshold) < 1.0:
            raise ValueError(f"the mask threshold must be in (0, 1), got {mask_threshold}")
        self.detections_per_image = int(detections_per_image)
        self.mask_threshold = float(mask_threshold)

    @staticmethod
    def base_config(cfg) -> Dict:
        """The base class's arguments from ``cfg`` (for the subclasses' ``from_config``); the mask
        threshold is each model's own key and is added by the subclass."""
        return {
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": cfg.MODEL.SIZE_DIVISIBILITY,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def output_tasks(self) -> Tuple[str, ...]:
        """What each eval-mode output dict holds (docs/architecture.md, "Data contract"):
        ``"instances"`` (``scores``, ``labels``, ``masks``, ``boxes``), ``"sem_seg"`` (``(C, H, W)``
        float) and / or ``"panoptic_seg"`` (``(H, W)`` int32 ids plus ``"segments_info"``). The
        engine picks the evaluators of a test set from it. Instance segmentation by default."""
        return ("instances",)

    @classmethod
    def has_internals(cls) -> bool:
        """Whether the model implements :meth:`internals` (``instseg-demo --show-internals``)."""
        return cls.internals is not MetaArchBase.internals

    def internals(self, batched_inputs: List[Dict], score_threshold: float = 0.5) -> List[Dict]:
        """What the model does on each image, as pictures of its intermediates (docs/deploy.md,
        "What the model does"): per image ``{"result": <the eval-mode output dict, equal to
        model(batched_inputs)'s>, "panels": [...]}``, the panels as described in
        :mod:`instseg.modeling.internals` (``"heatmaps"``, ``"points"``, ``"boxes"``), for the
        instances of score ``>= score_threshold`` (:func:`instseg.modeling.internals.select_kept`).
        Eval mode, no gradients. Implemented by each model in its own package.

        Raises:
            NotImplementedError: the model does not implement it (the message names the model).
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement internals() (the pictures of --show-internals); "
            "a model adds it in its own package (docs/deploy.md, 'What the model does')")

    def _check_internals_mode(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__}.internals() needs eval mode: call model.eval() first")

    def export_forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What an exported graph computes (:func:`instseg.export.export_onnx`; docs/deploy.md,
        "Export (ONNX)"): the network and every step of the post-processing that has no
        data-dependent count, written with traceable tensor ops.

        Args:
            images: normalized, padded ``(B, 3, Hp, Wp)`` float32 (as :meth:`preprocess_images`).
            image_sizes: ``(B, 2)`` int64 ``(h, w)`` of each image inside the padding (the graph's
                ``image_size`` input; unused here, so a default graph has only ``image``).

        Returns:
            ``{name: tensor}`` (the graph's outputs). Default: ``self.flops_forward(images)``, the
            network alone; a model overrides it to put more into the graph (e.g. per-query
            ``scores`` / ``labels`` / ``boxes`` and the mask branch on them).

        Raises:
            NotImplementedError: the subclass has no ``flops_forward``.
        """
        if not callable(getattr(self, "flops_forward", None)):
            raise NotImplementedError(f"{type(self).__name__} has no flops_forward(images) / export_forward")
        return self.flops_forward(images)

    def export_postprocess(self, outputs: Dict[str, torch.Tensor], batched_inputs: List[Dict],
                           image_sizes: List[Tuple[int, int]], padded_size: Tuple[int, int]) -> List[Dict]:
        """What stays in Python after an exported graph: :meth:`export_forward`'s outputs (batch
        ``B``, as tensors) -> one data-contract dict per image (docs/architecture.md, "Data
        contract"), equal to ``self(batched_inputs)`` in eval mode.

        Args:
            outputs: the graph's outputs by name.
            batched_inputs: per image ``{"height", "width"}`` at least (the output size).
            image_sizes: ``(h, w)`` of each image inside the padded input.
            padded_size: ``(Hp, Wp)`` of the graph's input.

        Default: ``self.inference(outputs, batched_inputs, image_sizes, padded_size)`` (the
        models whose ``inference`` takes ``flops_forward``'s outputs).

        Raises:
            NotImplementedError: the subclass has no such ``inference``.
        """
        if not callable(getattr(self, "inference", None)):
            raise NotImplementedError(f"{type(self).__name__} has no inference(outputs, ...) / export_postprocess")
        return self.inference(outputs, batched_inputs, image_sizes, padded_size)

    def preprocess_images(self, batched_inputs: List[Dict]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalize ``uint8 (3, H, W)`` RGB images and pad them into ``(B, 3, Hp, Wp)`` float32."""
        images = []
        for x in batched_inputs:
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected image of shape (3, H, W), got {tuple(img.shape)}")
            img = img.to(self.device, non_blocking=True).float()
            images.append((img - self.pixel_mean) / self.pixel_std)
        return pad_to_divisible(images, self.size_divisibility)
