"""Semantic and panoptic dataset mappers (Mask2Former's ``MaskFormerSemanticDatasetMapper`` and
``MaskFormerPanopticDatasetMapper``, ``mask2former/data/dataset_mappers/``) and :func:`build_mapper`.

Both read the image with :func:`instseg.data.mapper.read_image` and a label map (semantic: a
class-id PNG; panoptic: a COCO-panoptic RGB PNG of segment ids), transform both with the same
torchvision v2 pipeline (:func:`instseg.data.transforms.build_augmentation`; the label map is a
``tv_tensors.Mask``, so it is resized with nearest neighbour and keeps exact integer values) and
turn the transformed map into mask-classification targets: one binary mask per class (semantic)
or per segment (panoptic).

``INPUT.DATASET_MAPPER_NAME`` picks the mapper (:func:`build_mapper`): ``"instance"``
(:class:`~instseg.data.mapper.DatasetMapper`), ``"mask_former_semantic"``
(:class:`SemanticDatasetMapper`), ``"mask_former_panoptic"`` (:class:`PanopticDatasetMapper`).

``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` < 1 replaces every :class:`~instseg.data.transforms.RandomCrop`
of the training pipeline by :class:`CategoryAreaRandomCrop` (Detectron2's
``RandomCrop_CategoryAreaConstraint``), which reads the semantic label map.

Differences from Mask2Former: the augmentation is this framework's :func:`build_augmentation`
(not Mask2Former's ResizeShortestEdge + crop + color jitter + flip), there is no padding to
``SIZE_DIVISIBILITY`` (the models pad their batches), and the targets carry tight ``boxes`` as the
instance mapper's do.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torchvision import tv_tensors

from .mapper import DatasetMapper, read_dataset_image
from .transforms import RandomCrop, _Transform, boxes_from_masks, build_augmentation
from .validation import DatasetError, ImageDecodeError

__all__ = [
    "MAPPER_NAMES",
    "SemanticDatasetMapper",
    "PanopticDatasetMapper",
    "CategoryAreaRandomCrop",
    "SemSegMap",
    "build_mapper",
    "read_label_map",
    "read_panoptic_ids",
    "rgb2id",
]

#: ``INPUT.DATASET_MAPPER_NAME`` values (Mask2Former's names for the two segmentation mappers).
MAPPER_NAMES = ("instance", "mask_former_semantic", "mask_former_panoptic")

_PASS_THROUGH = ("sem_seg_file_name", "pan_seg_file_name", "segments_info")


class SemSegMap(tv_tensors.Mask):
    """A ``tv_tensors.Mask`` that is the semantic label map ``(1, H, W)`` of a sample: transformed
    as any mask (nearest resize, flip, crop), and read by :class:`CategoryAreaRandomCrop`."""


class CategoryAreaRandomCrop(_Transform):
    """A :class:`~instseg.data.transforms.RandomCrop` that avoids crops dominated by one class
    (Detectron2's ``RandomCrop_CategoryAreaConstraint``, ``detectron2/data/transforms/augmentation_impl.py``).

    Up to 10 crops (size and position drawn by ``crop``) are tried; the first one in which at
    least two classes other than ``ignore_label`` occur and no class covers a fraction
    ``>= single_category_max_area`` of the non-ignored pixels is taken, else the 10th. With
    ``single_category_max_area >= 1``, or a sample without a :class:`SemSegMap`, it is ``crop``.

    Args:
        crop: the crop whose size/position rules are used.
        single_category_max_area: the fraction (``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``).
        ignore_label: label-map value not counted (255).
    """

    def __init__(self, crop: RandomCrop, single_category_max_area: float, ignore_label: Optional[int] = 255) -> None:
        super().__init__()
        self.crop = crop
        self.single_category_max_area = float(single_category_max_area)
        self.ignore_label = ignore_label

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        sem = next((x for x in flat_inputs if isinstance(x, SemSegMap)), None)
        if self.single_category_max_area >= 1.0 or sem is None:
            return self.crop.make_params(flat_inputs)
        label = sem.as_subclass(torch.Tensor).reshape(sem.shape[-2:])
        for _ in range(10):
            params = self.crop.make_params(flat_inputs)
            window = label[params["top"]: params["top"] + params["height"],
                           params["left"]: params["left"] + params["width"]]
            values, counts = torch.unique(window, return_counts=True)
            if self.ignore_label is not None:
                counts = counts[values != self.ignore_label]
            if len(counts) > 1 and int(counts.max()) < float(counts.sum()) * self.single_category_max_area:
                break
        return params

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self.crop.transform(inpt, params)


def _constrain_crops(aug: Any, single_category_max_area: float, ignore_label: Optional[int]) -> Any:
    """``aug`` with every :class:`RandomCrop` inside (``Compose`` / ``RandomApply`` / ... lists)
    wrapped in :class:`CategoryAreaRandomCrop` (in place; returns ``aug``)."""
    if isinstance(aug, RandomCrop):
        return CategoryAreaRandomCrop(aug, single_category_max_area, ignore_label)
    children = getattr(aug, "transforms", None)
    if isinstance(children, (list, torch.nn.ModuleList)):
        for i, child in enumerate(children):
            children[i] = _constrain_crops(child, single_category_max_area, ignore_label)
    return aug


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """COCO-panoptic segment ids of an RGB PNG's pixels: ``R + 256 * G + 256**2 * B`` (panopticapi's
    ``rgb2id``).

    Args:
        rgb: ``uint8 (H, W, 3)``.

    Returns:
        ``int32 (H, W)``, values in ``0 .. 2**24 - 1``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb2id needs an (H, W, 3) array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _open_png(file_name: str, what: str):
    from PIL import Image

    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"{what} file not found: {file_name}")
    try:
        with Image.open(file_name) as im:
            im.load()
            return im.copy()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        raise ImageDecodeError(f"{file_name}: cannot decode the {what} ({type(e).__name__}: {e})") from e


def read_label_map(file_name: str) -> np.ndarray:
    """Read a semantic label PNG (one class id per pixel, e.g. Cityscapes' ``_labelTrainIds.png``).

    Returns:
        ``int64 (H, W)`` (the stored values; for a palette PNG the palette indices).

    Raises:
        FileNotFoundError: the file does not exist (named).
        ImageDecodeError: (a ``ValueError``) the file cannot be decoded (named, with the reason).
        DatasetError: the PNG is not single-channel (named).
    """
    im = _open_png(file_name, "semantic label map")
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise DatasetError(f"{file_name}: a semantic label map must be single-channel, got shape {arr.shape} "
                           f"(mode {im.mode})")
    return arr.astype(np.int64)


def read_panoptic_ids(file_name: str) -> np.ndarray:
    """Read a COCO-panoptic PNG (segment id = ``R + 256 G + 256^2 B``, :func:`rgb2id`).

    Returns:
        ``int32 (H, W)`` segment ids (0 = unlabelled in COCO and Cityscapes).

    Raises:
        FileNotFoundError: the file does not exist (named).
        ImageDecodeError: (a ``ValueError``) the file cannot be decoded (named, with the reason).
        DatasetError: the PNG is not RGB (named).
    """
    im = _open_png(file_name, "panoptic PNG")
    if im.mode not in ("RGB", "RGBA"):
        raise DatasetError(f"{file_name}: a panoptic PNG must be RGB (id = R + 256 G + 256^2 B), got mode {im.mode}")
    return rgb2id(np.asarray(im.convert("RGB")))


def _metadata_ignore_label(cfg, is_train: bool) -> int:
    from .catalog import MetadataCatalog

    names = list(cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if names:
        return int(MetadataCatalog.get(names[0]).get("ignore_label", 255))
    return 255


class _SegMapperBase:
    """Shared part: cfg checks, augmentation, image reading, test mode."""

    _kind = ""

    def __init__(self, cfg=None, is_train: bool = True, augmentation: Optional[Any] = None,
                 ignore_label: Optional[int] = None) -> None:
        if augmentation is None:
            if cfg is None:
                raise ValueError(f"{type(self).__name__} needs a cfg or an augmentation")
            augmentation = build_augmentation(cfg, is_train)
        if ignore_label is None:
            ignore_label = _metadata_ignore_label(cfg, is_train) if cfg is not None else 255
        self.ignore_label = int(ignore_label)
        if cfg is not None and is_train:
            max_area = float(cfg.INPUT.CROP.get("SINGLE_CATEGORY_MAX_AREA", 1.0))
            if max_area < 1.0:
                augmentation = _constrain_crops(augmentation, max_area, self.ignore_label)
        # the instance mapper checks INPUT.FORMAT / MASK_FORMAT and does the test mode
        self._test_mapper = DatasetMapper(cfg, is_train=False, augmentation=augmentation)
        self.is_train = is_train
        self.augmentation = augmentation

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(is_train={self.is_train}, ignore_label={self.ignore_label}, "
                f"augmentation={self.augmentation})")

    def _test(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        out = self._test_mapper(dataset_dict)
        for key in _PASS_THROUGH:
            if key in dataset_dict:
                out[key] = dataset_dict[key]
        return out

    @staticmethod
    def _check_size(label: np.ndarray, image: np.ndarray, label_file: str, image_file: str) -> None:
        if label.shape[:2] != image.shape[:2]:
            raise DatasetError(
                f"{label_file}: label map of size (h={label.shape[0]}, w={label.shape[1]}) but its image "
                f"{image_file} has size (h={image.shape[0]}, w={image.shape[1]})")

    def _check_values(self, before: torch.Tensor, after: torch.Tensor, file_name: str) -> torch.Tensor:
        """Unique values of ``after``, checked to be a subset of ``before``'s (nearest resize,
        flips and crops create no new values; an interpolating transform would)."""
        if after.dtype.is_floating_point:
            raise RuntimeError(f"{file_name}: the augmentation turned the {self._kind} map into {after.dtype}")
        u_after = torch.unique(after)
        if not torch.isin(u_after, torch.unique(before)).all():
            raise RuntimeError(
                f"{file_name}: the augmentation created {self._kind} values that were not in the map "
                f"(it must resize masks with nearest neighbour): {self.augmentation}")
        return u_after


def _targets(labels: List[int], masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    masks = masks.contiguous()
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "boxes": boxes_from_masks(masks)}


class SemanticDatasetMapper(_SegMapperBase):
    """Dataset dict with ``"sem_seg_file_name"`` -> model input with per-class mask targets
    (Mask2Former's ``MaskFormerSemanticDatasetMapper``).

    Args:
        cfg: config (``INPUT.*`` for :func:`build_augmentation`, ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``,
            ``DATASETS.TRAIN``/``TEST`` for the ignore label); may be ``None`` with ``augmentation``.
        is_train: training (targets) or test mode.
        augmentation: a v2 transform on ``{"image": tv_tensors.Image, "sem_seg": SemSegMap}``
            replacing the one built from ``cfg``.
        ignore_label: label value without target (default: the metadata ``ignore_label`` of the
            first dataset of ``DATASETS.TRAIN`` (test mode: ``DATASETS.TEST``), else 255).

    Training output::

        {"image": torch.uint8 (3, H, W) RGB, augmented,
         "height": int, "width": int,             # ORIGINAL size
         "file_name": str, "image_id": ...,
         "sem_seg": torch.int64 (H, W),           # the augmented label map (ignore_label kept)
         "instances": {"labels": torch.int64 (M,),     # the classes present except ignore_label, ascending
                       "masks": torch.bool (M, H, W),  # sem_seg == labels[i]
                       "boxes": torch.float32 (M, 4)}} # xyxy pixels, x2/y2 exclusive (boxes_from_masks)

    Test output: as :class:`DatasetMapper`'s test mode (resized ``"image"``, original
    ``"height"``/``"width"``, ``"file_name"``, ``"image_id"``) plus the dict's
    ``"sem_seg_file_name"``, ``"pan_seg_file_name"``, ``"segments_info"`` when present (the
    evaluators read the ground truth from them); the label map is not read.

    Raises (on call):
        KeyError: a training dict without ``"sem_seg_file_name"``.
        FileNotFoundError / ImageDecodeError: the image or label PNG missing / undecodable (named).
        DatasetError: the label PNG's size differs from the image's (both files named), or the
            image's from the dict's ``height``/``width``.
        RuntimeError: the augmentation changed the label values (not a nearest-neighbour resize).
    """

    _kind = "semantic label"

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        if not self.is_train:
            return self._test(dataset_dict)
        if "sem_seg_file_name" not in dataset_dict:
            raise KeyError(f"{dataset_dict.get('file_name')}: the semantic mapper needs 'sem_seg_file_name' "
                           "in the dataset dict")
        image, out = read_dataset_image(dataset_dict)
        sem_file = dataset_dict["sem_seg_file_name"]
        label = read_label_map(sem_file)
        self._check_size(label, image, sem_file, out["file_name"])
        sem_in = torch.from_numpy(label)[None]
        sample = self.augmentation({
            "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
            "sem_seg": SemSegMap(sem_in),
        })
        image_out = sample["image"].as_subclass(torch.Tensor).contiguous()
        sem = sample["sem_seg"].as_subclass(torch.Tensor)[0].to(torch.int64).contiguous()
        classes = self._check_values(sem_in, sem, sem_file)
        classes = classes[classes != self.ignore_label]
        out["image"] = image_out
        out["sem_seg"] = sem
        masks = sem[None] == classes[:, None, None] if len(classes) else torch.zeros((0, *sem.shape), dtype=torch.bool)
        out["instances"] = _targets([int(c) for c in classes], masks)
        return out


class PanopticDatasetMapper(_SegMapperBase):
    """Dataset dict with ``"pan_seg_file_name"`` and ``"segments_info"`` -> model input with one
    mask target per segment (Mask2Former's ``MaskFormerPanopticDatasetMapper``).

    ``segments_info``: ``[{"id": int (segment id in the PNG), "category_id": int (CONTIGUOUS id,
    mapped when the dataset is loaded), "iscrowd": 0 | 1}, ...]``. Crowd segments get no target;
    every other segment gets one (things keep their identity: one target per instance), in
    ``segments_info`` order. As in Mask2Former, a segment whose mask is empty after the
    augmentation (cropped away, or absent from the PNG) KEEPS its target, with an all-False mask
    and box ``[0, 0, 0, 0]`` (the instance :class:`DatasetMapper` drops such instances).

    Args: as :class:`SemanticDatasetMapper` (``augmentation`` acts on ``{"image", "pan_seg":
    tv_tensors.Mask (1, H, W) int32}`` plus ``"sem_seg": SemSegMap`` when the dict has a
    ``"sem_seg_file_name"``). With ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA < 1`` the crop constraint
    reads the semantic map, so a dict without ``sem_seg_file_name`` gets the plain crop.

    Training output: ``"image"``, ``"height"``, ``"width"`` (original), ``"file_name"``,
    ``"image_id"``, ``"instances"`` (``"labels"`` int64 (M,) = category ids, ``"masks"`` bool
    (M, H, W) = (ids == segment id), ``"boxes"`` float32 (M, 4)) and, when the dict has a
    ``"sem_seg_file_name"``, ``"sem_seg"`` int64 (H, W). Test output: as the semantic mapper's.

    Raises (on call):
        KeyError: a training dict without ``"pan_seg_file_name"`` or ``"segments_info"``.
        FileNotFoundError / ImageDecodeError: the image or a PNG missing / undecodable (named).
        DatasetError: a PNG's size differs from the image's (both files named), the panoptic PNG
            is not RGB, or the image's size differs from the dict's.
        RuntimeError: the augmentation changed the id values (not a nearest-neighbour resize).
    """

    _kind = "panoptic id"

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        if not self.is_train:
            return self._test(dataset_dict)
        for key in ("pan_seg_file_name", "segments_info"):
            if key not in dataset_dict:
                raise KeyError(f"{dataset_dict.get('file_name')}: the panoptic mapper needs {key!r} in the dataset dict")
        image, out = read_dataset_image(dataset_dict)
        pan_file = dataset_dict["pan_seg_file_name"]
        ids = read_panoptic_ids(pan_file)
        self._check_size(ids, image, pan_file, out["file_name"])
        pan_in = torch.from_numpy(ids)[None]
        inputs: Dict[str, Any] = {
            "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
            "pan_seg": tv_tensors.Mask(pan_in),
        }
        sem_file = dataset_dict.get("sem_seg_file_name")
        if sem_file is not None:
            label = read_label_map(sem_file)
            self._check_size(label, image, sem_file, out["file_name"])
            inputs["sem_seg"] = SemSegMap(torch.from_numpy(label)[None])
        sample = self.augmentation(inputs)
        image_out = sample["image"].as_subclass(torch.Tensor).contiguous()
        pan = sample["pan_seg"].as_subclass(torch.Tensor)[0]
        self._check_values(pan_in, pan, pan_file)
        out["image"] = image_out
        if sem_file is not None:
            sem = sample["sem_seg"].as_subclass(torch.Tensor)[0].to(torch.int64).contiguous()
            out["sem_seg"] = sem
        segs = [s for s in dataset_dict["segments_info"] if not s.get("iscrowd", 0)]
        h, w = pan.shape
        masks = torch.zeros((len(segs), h, w), dtype=torch.bool)
        for i, s in enumerate(segs):
            masks[i] = pan == int(s["id"])
        out["instances"] = _targets([int(s["category_id"]) for s in segs], masks)
        return out


def build_mapper(cfg, is_train: bool):
    """The mapper ``INPUT.DATASET_MAPPER_NAME`` names (what the loaders use when none is passed).

    ``"instance"`` -> :class:`~instseg.data.mapper.DatasetMapper`, ``"mask_former_semantic"`` ->
    :class:`SemanticDatasetMapper`, ``"mask_former_panoptic"`` -> :class:`PanopticDatasetMapper`
    (a config without the key gets ``"instance"``).

    Raises:
        ValueError: another name (the message names the key and the allowed values).
    """
    name = cfg.INPUT.get("DATASET_MAPPER_NAME", "instance") if hasattr(cfg.INPUT, "get") else "instance"
    if name == "instance":
        return DatasetMapper(cfg, is_train=is_train)
    if name == "mask_former_semantic":
        return SemanticDatasetMapper(cfg, is_train=is_train)
    if name == "mask_former_panoptic":
        return PanopticDatasetMapper(cfg, is_train=is_train)
    raise ValueError(f"INPUT.DATASET_MAPPER_NAME={name!r} is not a mapper; expected one of "
                     f"{', '.join(repr(n) for n in MAPPER_NAMES)}")
