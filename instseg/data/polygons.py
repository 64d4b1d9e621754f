"""Instance polygons as a ``tv_tensors`` type that follows the augmentation the way Detectron2 does.

Detectron2, and so the official SparseInst and FastInst training mappers, transforms each
annotation's polygon coordinates with the image's geometric transforms
(``detection_utils.transform_instance_annotations`` -> ``TransformList.apply_polygons``) and only
then rasterizes them at the transformed size (``annotations_to_instances`` with
``INPUT.MASK_FORMAT: bitmask``, FastInst's ``FastInstInstanceDatasetMapper``: both
``structures.masks.polygons_to_bitmask``, i.e. pycocotools ``frPyObjects`` + ``merge`` +
``decode``). :class:`Polygons` carries one image's polygons through the same ``transforms.v2``
call as the image, so they get the same random parameters, and its kernels run the very fvcore
transforms Detectron2 uses (``detectron2/data/transforms/transform.py`` imports ``CropTransform``,
``HFlipTransform`` from fvcore; its ``ResizeTransform.apply_coords`` is fvcore's
``ScaleTransform.apply_coords``):

- ``F.resize`` to ``(new_h, new_w)``: ``x * (new_w / w)``, ``y * (new_h / h)``;
- ``F.horizontal_flip`` / ``F.vertical_flip``: ``x -> W - x`` / ``y -> H - y`` (coordinates, not
  pixel indices: not ``W - 1 - x``);
- ``F.crop``: each polygon is clipped to the crop window with shapely, then shifted
  (``CropTransform.apply_polygons``): it may split into several polygons or vanish.

torchvision's ``tv_tensors.KeyPoints`` would not give Detectron2's masks: its horizontal flip is
``W - 1 - x``, its resize multiplies by a float32 ratio and its crop does not clip.

Coordinates are float64, as Detectron2's for COCO's float polygons (an all-integer polygon would be
truncated by Detectron2's in-place ``apply_coords`` on an int array; here it is not).

Coordinates far outside the canvas are clipped (:func:`clip_polygons_to_margin`) before
pycocotools rasterizes them: pycocotools' cost grows with a polygon's perimeter in pixels (a
``1e8`` coordinate exhausts the memory), and it has no check for NaN/Inf (a non-finite coordinate
raises ``ValueError`` here; :func:`instseg.data.load_coco_json` and the mapper reject them earlier,
naming the image and annotation).

Geometric functionals without a Detectron2 rule here (rotate, affine, perspective, elastic, pad,
center/resized crop) raise ``TypeError`` rather than leaving the polygons behind; photometric ones
pass them through unchanged.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

__all__ = ["Polygons", "polygons_to_bitmask", "coordinate_margin", "clip_polygons_to_margin"]

PolygonList = List[List[np.ndarray]]  # per instance, its polygons, each (K, 2) float64 (x, y)


def coordinate_margin(height: int, width: int) -> int:
    """The margin (pixels) that polygon coordinates may lie outside a ``(height, width)`` image
    before they are clipped: ``max(height, width)``. Coordinates in ``[-M, width + M] x
    [-M, height + M]`` are kept exactly (COCO polygons often end a little outside the image);
    beyond it a polygon is clipped to that box, which leaves its mask inside the image unchanged
    (the box is larger than the image) and bounds pycocotools' work."""
    return int(max(int(height), int(width), 1))


def _outside_margin(arr: np.ndarray, height: int, width: int) -> bool:
    """``arr``: ``(K, 2)`` finite ``(x, y)``; True when a vertex is beyond the margin box."""
    m = coordinate_margin(height, width)
    lo = arr.min(axis=0)
    hi = arr.max(axis=0)
    return bool(lo[0] < -m or lo[1] < -m or hi[0] > width + m or hi[1] > height + m)


def clip_polygons_to_margin(polygons: Sequence[np.ndarray], height: int, width: int) -> Tuple[List[np.ndarray], bool]:
    """Clip polygons to the box ``[-M, width + M] x [-M, height + M]``, ``M`` =
    :func:`coordinate_margin`.

    Args:
        polygons: each a flat ``[x0, y0, x1, y1, ...]`` or ``(K, 2)`` array of finite floats.
        height, width: the image size (pixels).

    Returns:
        ``(polygons, clipped)``: flat ``float64`` arrays, and whether any polygon was changed.
        Polygons inside the box are returned unchanged (same values); one with a vertex outside
        is intersected with the box by shapely (fvcore's ``CropTransform.apply_polygons``, as a
        random crop does), so that it may split or vanish; if shapely fails on extreme values the
        coordinates are clamped to the box instead.

    Raises:
        ValueError: a coordinate is NaN or infinite.
    """
    out: List[np.ndarray] = []
    clipped = False
    m = coordinate_margin(height, width)
    for p in polygons:
        arr = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        if arr.size == 0:
            out.append(arr.reshape(-1))
            continue
        if not np.isfinite(arr).all():
            raise ValueError("non-finite (NaN or Inf) polygon coordinate")
        if not _outside_margin(arr, height, width):
            out.append(arr.reshape(-1))
            continue
        clipped = True
        out.extend(_clip_one(arr, -m, -m, width + m, height + m))
    return out, clipped


def _clip_one(arr: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> List[np.ndarray]:
    from fvcore.transforms.transform import CropTransform

    clamp = [np.stack([np.clip(arr[:, 0], x0, x1), np.clip(arr[:, 1], y0, y1)], axis=1).reshape(-1)]
    try:
        with np.errstate(all="ignore"):  # GEOS on extreme values (1e300): checked below
            parts = CropTransform(x0, y0, x1 - x0, y1 - y0).apply_polygons([arr])
    except Exception:  # GEOS on extreme values: fall back to clamping
        return clamp
    res = []
    for q in parts:
        q = np.asarray(q, dtype=np.float64) + np.array([x0, y0], dtype=np.float64)
        if q.size == 0 or not np.isfinite(q).all() or q[:, 0].min() < x0 - 1 or q[:, 0].max() > x1 + 1 \
                or q[:, 1].min() < y0 - 1 or q[:, 1].max() > y1 + 1:
            return clamp
        res.append(np.clip(q, [x0, y0], [x1, y1]).reshape(-1))
    return res


def polygons_to_bitmask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Detectron2's ``polygons_to_bitmask``: one instance's polygons (flat ``[x0, y0, x1, ...]``
    arrays) merged into a ``bool (height, width)`` mask with pycocotools; no polygon -> all False.

    A last guard before pycocotools: polygons beyond the margin are clipped
    (:func:`clip_polygons_to_margin`, the mask inside the image is unchanged).

    Raises:
        ValueError: a coordinate is NaN or infinite (pycocotools would crash or exhaust memory).
    """
    from pycocotools import mask as mask_util

    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    polys, _ = clip_polygons_to_margin(polygons, height, width)
    polys = [p for p in polys if p.size >= 6]
    if not polys:
        return np.zeros((height, width), dtype=bool)
    rles = mask_util.frPyObjects(polys, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


class Polygons(tv_tensors.TVTensor):
    """The polygons of one image's instances.

    The tensor holds every vertex, ``float64 (V, 2)`` as ``(x, y)`` in absolute coordinates (an
    image of size ``(H, W)`` spans ``[0, W] x [0, H]``); ``lengths`` gives, per instance, the
    vertex count of each of its polygons, and ``canvas_size`` the ``(H, W)`` the coordinates
    refer to (updated by every geometric kernel, as for ``tv_tensors.BoundingBoxes``).

    Build with :meth:`from_coco`; read back with :meth:`to_list` or :meth:`rasterize`.
    """

    lengths: Tuple[Tuple[int, ...], ...]
    canvas_size: Tuple[int, int]

    @classmethod
    def _wrap(cls, tensor: torch.Tensor, *, lengths, canvas_size) -> "Polygons":
        out = tensor.as_subclass(cls)
        out.lengths = tuple(tuple(int(n) for n in inst) for inst in lengths)
        out.canvas_size = (int(canvas_size[0]), int(canvas_size[1]))
        return out

    def __new__(cls, data: Any, *, lengths, canvas_size, requires_grad: bool | None = None) -> "Polygons":
        tensor = cls._to_tensor(data, dtype=torch.float64, requires_grad=requires_grad).reshape(-1, 2)
        total = sum(sum(inst) for inst in lengths)
        if tensor.shape[0] != total:
            raise ValueError(f"{tensor.shape[0]} vertices but lengths add up to {total}")
        return cls._wrap(tensor, lengths=lengths, canvas_size=canvas_size)

    @classmethod
    def _wrap_output(cls, output, args=(), kwargs=None):
        # clone(), to(), detach(), ... keep the type and its metadata
        like = next((a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, Polygons)), None)
        if isinstance(output, torch.Tensor) and not isinstance(output, Polygons) and like is not None:
            return Polygons._wrap(output, lengths=like.lengths, canvas_size=like.canvas_size)
        if isinstance(output, (tuple, list)):
            return type(output)(cls._wrap_output(part, args, kwargs) for part in output)
        return output

    @classmethod
    def from_list(cls, polygons: PolygonList, canvas_size: Sequence[int]) -> "Polygons":
        """From per-instance lists of ``(K, 2)`` (or flat ``2K``) coordinate arrays."""
        arrays = [[np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in inst] for inst in polygons]
        lengths = [[len(p) for p in inst] for inst in arrays]
        flat = [p for inst in arrays for p in inst]
        data = np.concatenate(flat, axis=0) if flat else np.zeros((0, 2), dtype=np.float64)
        return cls(torch.from_numpy(data), lengths=lengths, canvas_size=canvas_size)

    @classmethod
    def from_coco(cls, segmentations: Sequence[Sequence[Sequence[float]]], canvas_size: Sequence[int]) -> "Polygons":
        """From COCO polygon segmentations: per instance a list of flat ``[x0, y0, x1, y1, ...]``
        lists, at ``canvas_size = (H, W)``."""
        return cls.from_list([[np.asarray(p, dtype=np.float64) for p in segm] for segm in segmentations], canvas_size)

    def to_list(self) -> PolygonList:
        """Per instance, its polygons as ``float64 (K, 2)`` arrays (copies)."""
        data = self.as_subclass(torch.Tensor).detach().cpu().numpy()
        out: PolygonList = []
        start = 0
        for inst in self.lengths:
            polys = []
            for n in inst:
                polys.append(data[start:start + n].copy())
                start += n
            out.append(polys)
        return out

    def rasterize(self) -> torch.Tensor:
        """``bool (N, H, W)`` at ``canvas_size``, one mask per instance (:func:`polygons_to_bitmask`)."""
        h, w = self.canvas_size
        masks = [polygons_to_bitmask([p.reshape(-1) for p in inst], h, w) for inst in self.to_list()]
        if not masks:
            return torch.zeros((0, h, w), dtype=torch.bool)
        return torch.from_numpy(np.stack(masks))

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"Polygons(instances={len(self.lengths)}, vertices={self.shape[0]}, canvas_size={self.canvas_size})"


def _apply(polygons: Polygons, fn, canvas_size) -> Polygons:
    """Apply ``fn`` (a list of ``(K, 2)`` arrays -> list) to each instance's polygons."""
    return Polygons.from_list([fn(inst) for inst in polygons.to_list()], canvas_size)


@F.register_kernel(F.resize, Polygons)
def _resize_polygons(polygons: Polygons, size, interpolation=None, max_size=None, antialias=None) -> Polygons:
    from fvcore.transforms.transform import ScaleTransform

    h, w = polygons.canvas_size
    if size is not None and len(size) == 2:
        new_h, new_w = int(size[0]), int(size[1])
    else:
        from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

        new_h, new_w = _compute_resized_output_size((h, w), size=size, max_size=max_size)
    t = ScaleTransform(h, w, new_h, new_w)
    return _apply(polygons, t.apply_polygons, (new_h, new_w))


@F.register_kernel(F.horizontal_flip, Polygons)
def _hflip_polygons(polygons: Polygons) -> Polygons:
    from fvcore.transforms.transform import HFlipTransform

    t = HFlipTransform(polygons.canvas_size[1])
    return _apply(polygons, t.apply_polygons, polygons.canvas_size)


@F.register_kernel(F.vertical_flip, Polygons)
def _vflip_polygons(polygons: Polygons) -> Polygons:
    from fvcore.transforms.transform import VFlipTransform

    t = VFlipTransform(polygons.canvas_size[0])
    return _apply(polygons, t.apply_polygons, polygons.canvas_size)


@F.register_kernel(F.crop, Polygons)
def _crop_polygons(polygons: Polygons, top: int, left: int, height: int, width: int) -> Polygons:
    from fvcore.transforms.transform import CropTransform

    t = CropTransform(int(left), int(top), int(width), int(height))
    return _apply(polygons, t.apply_polygons, (height, width))


def _unsupported(functional):
    def kernel(polygons: Polygons, *args, **kwargs):
        raise TypeError(
            f"Polygons cannot follow F.{functional.__name__} (only resize, crop and flips, with "
            "Detectron2's rules); build the DatasetMapper with transform_polygons=False to "
            "rasterize polygons before the augmentation"
        )

    return kernel


for _fn in (F.rotate, F.affine, F.perspective, F.elastic, F.pad, F.center_crop, F.resized_crop):
    F.register_kernel(_fn, Polygons)(_unsupported(_fn))
