"""Augmentations as torchvision ``transforms.v2`` transforms, with Detectron2's semantics.

They act on ``tv_tensors`` (``Image``, ``Mask``, ``BoundingBoxes``) in any container (dict, tuple),
with the same random parameters for every tensor of one sample, so masks always stay aligned
with the image. Randomness comes from torch's global generator (seeded per DataLoader worker).

- :class:`ResizeShortestEdge`: Detectron2's ``ResizeShortestEdge`` (short side sampled by
  "choice" or "range", long side capped, ``int(x + 0.5)`` rounding).
- :class:`RandomCrop`: Detectron2's ``RandomCrop`` crop-size types, ``"absolute_range"`` (the
  official SparseInst/FastInst "aug" configs), ``"absolute"``, ``"relative"``,
  ``"relative_range"``.
- :func:`build_augmentation`: the pipeline for a config (train or test).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "ResizeShortestEdge",
    "RandomCrop",
    "build_augmentation",
    "shortest_edge_size",
    "boxes_from_masks",
]


def _query_size(flat_inputs: List[Any]) -> Tuple[int, int]:
    # Public as v2.query_size in recent torchvision; private in older versions.
    query_size = getattr(v2, "query_size", None)
    if query_size is None:  # pragma: no cover
        from torchvision.transforms.v2._utils import query_size
    return tuple(query_size(flat_inputs))


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Output ``(new_h, new_w)`` of Detectron2's ``ResizeShortestEdge.get_output_shape``.

    The short side becomes ``short``; if the long side would then exceed ``max_size`` both are
    scaled down so that it equals ``max_size``; sizes are rounded with ``int(x + 0.5)``.
    """
    scale = short * 1.0 / min(h, w)
    if h < w:
        newh, neww = short, scale * w
    else:
        newh, neww = scale * h, short
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


class _Transform(v2.Transform):
    """v2.Transform with the public ``make_params``/``transform`` hooks (torchvision >= 0.21)
    mapped to the private names that older versions call."""

    def _get_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:  # torchvision < 0.21
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: Dict[str, Any]) -> Any:  # torchvision < 0.21
        return self.transform(inpt, params)


class ResizeShortestEdge(_Transform):
    """Resize so that the short side is ``short_edge_length`` (sampled) and the long side is at
    most ``max_size`` (Detectron2 semantics, see :func:`shortest_edge_size`).

    Args:
        short_edge_length: sizes in pixels. ``sample_style="choice"``: one of them, uniformly;
            ``"range"``: an integer uniformly in ``[min, max]`` (both inclusive, 2 values).
            A short side of 0 leaves the input unchanged.
        max_size: cap of the long side in pixels.
        sample_style: ``"choice"`` or ``"range"``.

    Images are resized bilinearly (antialiased), masks with nearest neighbour, boxes scaled.

    Raises:
        ValueError: unknown ``sample_style`` or a "range" that does not have 2 values.
    """

    def __init__(
        self, short_edge_length: Sequence[int] | int, max_size: int = 10**9, sample_style: str = "choice"
    ) -> None:
        super().__init__()
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length, short_edge_length)
        self.short_edge_length = [int(s) for s in short_edge_length]
        if sample_style not in ("choice", "range"):
            raise ValueError(f"sample_style must be 'choice' or 'range', got {sample_style!r}")
        if sample_style == "range" and len(self.short_edge_length) != 2:
            raise ValueError(
                f"sample_style='range' needs [min, max] sizes, got {self.short_edge_length}"
            )
        if not self.short_edge_length:
            raise ValueError("short_edge_length is empty")
        self.max_size = int(max_size)
        self.sample_style = sample_style

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _query_size(flat_inputs)
        if self.sample_style == "range":
            lo, hi = self.short_edge_length
            short = int(torch.randint(lo, hi + 1, ()).item())
        else:
            idx = int(torch.randint(len(self.short_edge_length), ()).item())
            short = self.short_edge_length[idx]
        if short == 0:
            return {"size": None}
        return {"size": list(shortest_edge_size(h, w, short, self.max_size))}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if params["size"] is None:
            return inpt
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomCrop(_Transform):
    """Random crop with Detectron2's crop-size types, at a uniformly random position.

    Args:
        crop_type: ``"absolute_range"``: height and width drawn independently and uniformly from
            ``[min(H, size[0]), min(H, size[1])]`` (resp. ``W``), pixels; ``"absolute"``:
            ``(min(size[0], H), min(size[1], W))``; ``"relative"``: ``(H*size[0], W*size[1])``;
            ``"relative_range"``: fractions drawn uniformly in ``[size[i], 1]``.
        crop_size: two numbers, see ``crop_type``.

    Raises:
        ValueError: unknown ``crop_type`` or ``crop_size`` without 2 values.
    """

    _TYPES = ("absolute_range", "absolute", "relative", "relative_range")

    def __init__(self, crop_type: str, crop_size: Sequence[float]) -> None:
        super().__init__()
        if crop_type not in self._TYPES:
            raise ValueError(f"Unknown crop type {crop_type!r}; expected one of {self._TYPES}")
        if len(crop_size) != 2:
            raise ValueError(f"crop_size needs 2 values, got {list(crop_size)}")
        self.crop_type = crop_type
        self.crop_size = list(crop_size)

    def _crop_hw(self, h: int, w: int) -> Tuple[int, int]:
        a, b = self.crop_size
        if self.crop_type == "absolute_range":
            ch = int(torch.randint(min(h, int(a)), min(h, int(b)) + 1, ()).item())
            cw = int(torch.randint(min(w, int(a)), min(w, int(b)) + 1, ()).item())
            return ch, cw
        if self.crop_type == "absolute":
            return min(int(a), h), min(int(b), w)
        if self.crop_type == "relative":
            return int(h * a + 0.5), int(w * b + 0.5)
        r = torch.rand(2)
        fa, fb = a + float(r[0]) * (1 - a), b + float(r[1]) * (1 - b)
        return int(h * fa + 0.5), int(w * fb + 0.5)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _query_size(flat_inputs)
        ch, cw = self._crop_hw(h, w)
        ch, cw = max(1, min(ch, h)), max(1, min(cw, w))
        top = int(torch.randint(h - ch + 1, ()).item())
        left = int(torch.randint(w - cw + 1, ()).item())
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def build_augmentation(cfg, is_train: bool) -> v2.Compose:
    """The augmentation pipeline of a config, as a ``v2.Compose``.

    Training (the official SparseInst "aug" recipe when ``INPUT.CROP.ENABLED``):

    1. with probability ``INPUT.CROP.PROB``: resize the short side to one of
       ``INPUT.CROP.RESIZE_SHORT``, then :class:`RandomCrop` (``INPUT.CROP.TYPE``/``SIZE``);
    2. :class:`ResizeShortestEdge` (``INPUT.MIN_SIZE_TRAIN``, ``MAX_SIZE_TRAIN``,
       ``MIN_SIZE_TRAIN_SAMPLING``);
    3. flip with p=0.5 (``INPUT.RANDOM_FLIP``: "horizontal", "vertical" or "none").

    Test: deterministic :class:`ResizeShortestEdge` to ``INPUT.MIN_SIZE_TEST`` (0 = no resize)
    with ``INPUT.MAX_SIZE_TEST``.

    Raises:
        ValueError: unknown ``INPUT.RANDOM_FLIP`` or sampling style.
    """
    if not is_train:
        return v2.Compose([ResizeShortestEdge([int(cfg.INPUT.MIN_SIZE_TEST)], cfg.INPUT.MAX_SIZE_TEST)])
    augs: List[Any] = []
    if cfg.INPUT.CROP.ENABLED:
        crop = v2.Compose(
            [
                ResizeShortestEdge(list(cfg.INPUT.CROP.RESIZE_SHORT), sample_style="choice"),
                RandomCrop(cfg.INPUT.CROP.TYPE, list(cfg.INPUT.CROP.SIZE)),
            ]
        )
        augs.append(v2.RandomApply([crop], p=float(cfg.INPUT.CROP.PROB)))
    min_size = cfg.INPUT.MIN_SIZE_TRAIN
    min_size = [int(min_size)] if isinstance(min_size, int) else [int(s) for s in min_size]
    augs.append(ResizeShortestEdge(min_size, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
    flip = str(cfg.INPUT.RANDOM_FLIP).lower()
    if flip == "horizontal":
        augs.append(v2.RandomHorizontalFlip(p=0.5))
    elif flip == "vertical":
        augs.append(v2.RandomVerticalFlip(p=0.5))
    elif flip != "none":
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {flip!r}")
    return v2.Compose(augs)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of bool masks.

    Args:
        masks: ``bool (N, H, W)``.

    Returns:
        ``float32 (N, 4)`` xyxy in pixels, ``x2``/``y2`` exclusive (last foreground index + 1);
        an empty mask gives ``[0, 0, 0, 0]``.
    """
    n = masks.shape[0]
    boxes = torch.zeros((n, 4), dtype=torch.float32)
    if n == 0:
        return boxes
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    nonempty = rows.any(dim=1)
    if nonempty.any():
        h, w = masks.shape[-2:]
        ar_h = torch.arange(h)
        ar_w = torch.arange(w)
        big = max(h, w) + 1
        y1 = torch.where(rows, ar_h, big).min(dim=1).values
        y2 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
        x1 = torch.where(cols, ar_w, big).min(dim=1).values
        x2 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
        b = torch.stack([x1, y1, x2, y2], dim=1).float()
        boxes[nonempty] = b[nonempty]
    return boxes
