"""DatasetMapper: dataset dict -> model input dict (docs/architecture.md, "Data contract").

Reads the image (RGB), applies the torchvision v2 augmentation pipeline of
:mod:`instseg.data.transforms` to the image and the instance segmentations in one call (same random
parameters), and recomputes boxes from the transformed masks. As in Detectron2
(``detection_utils.transform_instance_annotations`` + ``annotations_to_instances``, used by the
official SparseInst and FastInst mappers):

- **polygons** are transformed as coordinates (:class:`instseg.data.polygons.Polygons`: resize
  scale, flip ``W - x``, crop clipping with shapely) and rasterized with pycocotools at the
  augmented size;
- **RLEs** are rasterized at the original size and the masks transformed with the image
  (nearest-neighbour resize, flip, crop).

Rasterizing polygons first and resizing the mask instead moves boundary pixels.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import cv2
import numpy as np
import torch
from torchvision import tv_tensors

from .polygons import Polygons
from .transforms import boxes_from_masks, build_augmentation

__all__ = ["DatasetMapper", "ImageDecodeError", "read_image", "annotations_to_masks"]

logger = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


def read_image(file_name: str) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        ``uint8 (H, W, 3)`` RGB array (EXIF orientation applied, grayscale expanded to 3 channels).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ImageDecodeError: (a ``ValueError``) the file cannot be decoded (the message names it).
    """
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"Image file not found: {file_name}")
    img = None
    if os.path.getsize(file_name) > 0:
        try:
            img = cv2.imread(file_name, cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise ImageDecodeError(f"Cannot decode image file (corrupt or not an image): {file_name}")
    return np.ascontiguousarray(img[:, :, ::-1])


def annotations_to_masks(annotations: List[Dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Rasterize COCO segmentations (polygons or RLE) at ``(height, width)`` with pycocotools.

    Returns:
        ``bool (N, height, width)`` array, one mask per annotation (all its polygons merged).

    Raises:
        ValueError: an RLE's ``size`` differs from ``(height, width)``, or an annotation has no
            ``segmentation``.
    """
    from pycocotools import mask as mask_util

    if not annotations:
        return np.zeros((0, height, width), dtype=bool)
    rles = []
    for anno in annotations:
        segm = anno.get("segmentation")
        if segm is None:
            raise ValueError(f"Annotation without segmentation: {anno}")
        if isinstance(segm, dict):
            if isinstance(segm.get("counts"), list):
                segm = mask_util.frPyObjects(segm, height, width)
            if [int(s) for s in segm["size"]] != [height, width]:
                raise ValueError(
                    f"RLE size {segm['size']} does not match the image size {[height, width]}"
                )
            rles.append(segm)
        else:
            polys = [np.asarray(p, dtype=np.float64) for p in segm]
            rles.append(mask_util.merge(mask_util.frPyObjects(polys, height, width)))
    masks = mask_util.decode(rles)  # (H, W, N), Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1)).astype(bool)


class DatasetMapper:
    """Callable turning a dataset dict into the model input dict.

    Args:
        cfg: config with ``INPUT.*`` (see :func:`instseg.data.transforms.build_augmentation`).
            May be ``None`` when ``augmentation`` is given.
        is_train: training (random augmentation, ``"instances"`` returned) or test mode
            (deterministic resize, no instances).
        augmentation: a transform on ``{"image": tv_tensors.Image, "masks": tv_tensors.Mask}``
            (training: plus ``"polygons"``, a :class:`~instseg.data.polygons.Polygons`, when the
            image has polygon annotations) replacing the one built from ``cfg`` (e.g. for tests
            or custom pipelines).
        transform_polygons: training only: transform polygon annotations as coordinates and
            rasterize them at the augmented size (Detectron2's way, the default). ``False``
            rasterizes them at the original size and transforms the masks, as RLEs are; needed
            for an ``augmentation`` with geometric transforms other than resize, crop and flips.

    ``mapper(dataset_dict)`` returns (the dataset dict is not modified)::

        {"image": torch.uint8 (3, H, W) RGB after augmentation,
         "height": int, "width": int,      # ORIGINAL size (as in the dataset dict)
         "image_id": ..., "file_name": str,
         "instances": {                    # training only
             "labels": torch.int64 (N,),   # contiguous class ids
             "masks": torch.bool (N, H, W),
             "boxes": torch.float32 (N, 4) # xyxy pixels, tight around the mask, x2/y2 exclusive
         }}

    Crowd annotations (``iscrowd=1``) are left out; instances whose mask is empty after the
    augmentation (e.g. cropped away) are dropped. ``"instances"`` keep the annotations' order.

    Raises (on call):
        FileNotFoundError: the image file does not exist (named in the message).
        ImageDecodeError: (a ``ValueError``) the image cannot be decoded (named in the message).
        ValueError: the decoded image size differs from the dict's ``height``/``width``.
        RuntimeError: the polygons did not follow the augmentation to the image's output size.
    """

    def __init__(
        self, cfg=None, is_train: bool = True, augmentation: Optional[Any] = None, transform_polygons: bool = True
    ) -> None:
        if augmentation is None:
            if cfg is None:
                raise ValueError("DatasetMapper needs a cfg or an augmentation")
            augmentation = build_augmentation(cfg, is_train)
        if cfg is not None:
            fmt = str(cfg.INPUT.FORMAT).upper()
            if fmt != "RGB":
                raise ValueError(
                    f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}: only 'RGB' is supported (the models "
                    "normalize RGB images with MODEL.PIXEL_MEAN/STD)"
                )
            mask_format = str(cfg.INPUT.MASK_FORMAT)
            if mask_format != "bitmask":
                raise ValueError(
                    f"INPUT.MASK_FORMAT={cfg.INPUT.MASK_FORMAT!r}: only 'bitmask' is supported "
                    "(polygon masks are rasterized to bitmasks at load time, after the augmentation)"
                )
        self.is_train = is_train
        self.augmentation = augmentation
        self.transform_polygons = bool(transform_polygons)

    def __repr__(self) -> str:
        return (
            f"DatasetMapper(is_train={self.is_train}, augmentation={self.augmentation}, "
            f"transform_polygons={self.transform_polygons})"
        )

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        file_name = dataset_dict["file_name"]
        image = read_image(file_name)
        h, w = image.shape[:2]
        exp_h, exp_w = dataset_dict.get("height"), dataset_dict.get("width")
        if (exp_h is not None and exp_h != h) or (exp_w is not None and exp_w != w):
            raise ValueError(
                f"Image {file_name} has size (h={h}, w={w}) but its dataset dict says "
                f"(h={exp_h}, w={exp_w})"
            )
        out: Dict[str, Any] = {
            "height": int(exp_h if exp_h is not None else h),
            "width": int(exp_w if exp_w is not None else w),
            "image_id": dataset_dict.get("image_id"),
            "file_name": file_name,
        }
        img_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())

        if not self.is_train:
            sample = self.augmentation({"image": img_t})
            out["image"] = sample["image"].as_subclass(torch.Tensor).contiguous()
            return out

        annos = [a for a in dataset_dict.get("annotations", []) if not a.get("iscrowd", 0)]
        labels = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)
        # polygons follow the augmentation as coordinates; RLEs (and everything when
        # transform_polygons is off) as masks rasterized at the original size
        poly_idx = [i for i, a in enumerate(annos) if self.transform_polygons and isinstance(a.get("segmentation"), list)]
        poly_set = set(poly_idx)
        mask_idx = [i for i in range(len(annos)) if i not in poly_set]
        inputs: Dict[str, Any] = {
            "image": img_t,
            "masks": tv_tensors.Mask(torch.from_numpy(annotations_to_masks([annos[i] for i in mask_idx], h, w))),
        }
        if poly_idx:
            inputs["polygons"] = Polygons.from_coco([annos[i]["segmentation"] for i in poly_idx], (h, w))
        sample = self.augmentation(inputs)
        image_out = sample["image"].as_subclass(torch.Tensor).contiguous()
        out_h, out_w = image_out.shape[-2:]
        masks_out = torch.zeros((len(annos), out_h, out_w), dtype=torch.bool)
        if mask_idx:
            masks_out[mask_idx] = sample["masks"].as_subclass(torch.Tensor).to(torch.bool)
        if poly_idx:
            polygons = sample["polygons"]
            if not isinstance(polygons, Polygons) or tuple(polygons.canvas_size) != (out_h, out_w):
                raise RuntimeError(
                    f"{file_name}: the polygons did not follow the augmentation (canvas "
                    f"{getattr(polygons, 'canvas_size', None)}, image {(out_h, out_w)}); build the "
                    "DatasetMapper with transform_polygons=False for this augmentation"
                )
            masks_out[poly_idx] = polygons.rasterize()
        keep = masks_out.flatten(1).any(dim=1)  # drop instances emptied by a crop
        masks_out = masks_out[keep].contiguous()
        labels = labels[keep]
        out["image"] = image_out
        out["instances"] = {
            "labels": labels,
            "masks": masks_out,
            "boxes": boxes_from_masks(masks_out),
        }
        return out
