"""A synthetic *smoke-test* dataset: colored shapes with exact instance masks.

``smoke_shapes`` is NOT a benchmark. It exists so that the whole pipeline (loader, model, loss,
evaluation) can be run end to end in minutes on a CPU without downloading anything, and so that a
tiny model visibly learns (AP well above zero after a few hundred iterations).

Each image (default 256x320) shows 1-4 large filled shapes of 3 classes, ``circle``, ``square``
(rotated) and ``triangle`` (rotated), on a noisy, low-saturation gradient background. Each class
has its own hue band (red / green / blue, jittered) so that the task is easy. Shapes are drawn
without anti-aliasing, so the image and the mask agree pixel for pixel; a later shape occludes
earlier ones and the occluded pixels are removed from the earlier masks (each instance keeps at
least 40% of its own area). Masks are stored as compressed RLE, exactly; ``area`` is the
mask's pixel count and ``bbox`` its tight ``[x, y, w, h]``.

Layout written by :func:`make_smoke_dataset` under ``root``::

    root/annotations_train.json   root/train/000001.jpg ...
    root/annotations_val.json     root/val/000001.jpg ...
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import cv2
import numpy as np

from .catalog import DatasetCatalog, MetadataCatalog
from .coco import datasets_root, load_coco_json

__all__ = [
    "SMOKE_CLASSES",
    "make_smoke_dataset",
    "ensure_smoke_dataset",
    "register_smoke_dataset",
]

SMOKE_CLASSES = ["circle", "square", "triangle"]
# OpenCV hue (0-179) centre per class: red, green, blue.
_HUE = [0, 60, 120]
_DEFAULT_NUM_IMAGES = {"train": 128, "val": 32}
_MIN_VISIBLE_FRACTION = 0.4
_MIN_AREA = 300


def _shape_mask(cls: int, cx: float, cy: float, r: float, angle: float, shape: Tuple[int, int], offset: int) -> np.ndarray:
    """uint8 mask (canvas ``shape``) of one shape; coordinates are shifted by ``offset``."""
    m = np.zeros(shape, dtype=np.uint8)
    cx, cy = cx + offset, cy + offset
    if cls == 0:
        cv2.circle(m, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1, lineType=cv2.LINE_8)
        return m
    if cls == 1:  # square, half-diagonal r
        angles = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        rr = r * 1.05
    else:  # equilateral triangle, circumradius r
        angles = angle + np.arange(3) * 2 * np.pi / 3
        rr = r * 1.2
    pts = np.stack([cx + rr * np.cos(angles), cy + rr * np.sin(angles)], axis=1)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return m


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 (H, W, 3) BGR textured, low-saturation background in [0, 255]."""
    base = rng.uniform(60, 190)
    tint = rng.uniform(-15, 15, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * gx / w + np.sin(ang) * gy / h) * rng.uniform(-50, 50)
    # Smooth blotches (low-frequency noise) plus fine grain.
    coarse = rng.normal(0, 1, size=(h // 16 + 1, w // 16 + 1)).astype(np.float32)
    coarse = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * 18
    img = base + grad[..., None] + coarse[..., None] + tint[None, None, :]
    img = img + rng.normal(0, 10, size=(h, w, 3))
    return img.astype(np.float32)


def _class_color(rng: np.random.Generator, cls: int) -> np.ndarray:
    hue = (_HUE[cls] + rng.integers(-12, 13)) % 180
    hsv = np.array([[[hue, rng.integers(150, 256), rng.integers(150, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _render_image(rng: np.random.Generator, h: int, w: int) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image (uint8 BGR) and its instances ``[(class, bool mask), ...]`` in drawing order."""
    img = _background(rng, h, w)
    target = int(rng.integers(1, 5))
    pad = int(0.5 * min(h, w)) + 4
    canvas = (h + 2 * pad, w + 2 * pad)
    insts: List[Tuple[int, np.ndarray, int]] = []  # (class, visible mask, full in-image area)
    for _ in range(40):
        if len(insts) == target:
            break
        cls = int(rng.integers(0, 3))
        r = rng.uniform(0.14, 0.3) * min(h, w)
        cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
        full = _shape_mask(cls, cx, cy, r, rng.uniform(0, 2 * np.pi), canvas, pad).astype(bool)
        new = full[pad : pad + h, pad : pad + w]
        area_new = int(new.sum())
        if area_new < _MIN_AREA or area_new < 0.6 * full.sum():
            continue  # mostly outside the image
        ok = all(
            (m & ~new).sum() >= max(_MIN_AREA, _MIN_VISIBLE_FRACTION * a0) for _, m, a0 in insts
        )
        if not ok:
            continue
        insts = [(c, m & ~new, a0) for c, m, a0 in insts]
        insts.append((cls, new.copy(), area_new))
        color = _class_color(rng, cls)
        grain = rng.normal(0, 8, size=(area_new, 3))
        img[new] = color[None, :] + grain
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img, [(c, m) for c, m, _ in insts]


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8"))])


def make_smoke_dataset(
    root: Union[str, os.PathLike],
    num_images: Union[int, Mapping[str, int], None] = None,
    image_size: Tuple[int, int] = (256, 320),
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    image_format: str = "jpg",
) -> Dict[str, Dict[str, str]]:
    """Render the synthetic *smoke-test* shapes dataset (COCO format) under ``root``.

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        num_images: images per split: an int for every split, or ``{split: n}``; default
            ``{"train": 128, "val": 32}`` (32 for any other split name).
        image_size: ``(H, W)`` in pixels of every image.
        seed: the output is a deterministic function of ``(seed, split name, sizes)``; splits
            use independent streams.
        splits: split names; writes ``annotations_<split>.json`` and images in ``<split>/``.
        image_format: ``"jpg"`` (quality 95) or ``"png"``; masks are exact either way.

    Returns:
        ``{split: {"json_file": str, "image_root": str}}`` (absolute paths).

    Categories: ids 1, 2, 3 = ``circle``, ``square``, ``triangle``. Annotations: compressed-RLE
    ``segmentation`` (counts as str), ``area`` = mask pixel count, tight ``bbox`` ``[x, y, w, h]``
    (pixels), ``iscrowd`` 0.

    Raises:
        ValueError: ``image_size`` smaller than 64 pixels or unknown ``image_format``.
    """
    from pycocotools import mask as mask_util

    h, w = int(image_size[0]), int(image_size[1])
    if min(h, w) < 64:
        raise ValueError(f"image_size must be at least 64x64, got {image_size}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Dict[str, str]] = {}
    for split in splits:
        if num_images is None:
            n = _DEFAULT_NUM_IMAGES.get(split, 32)
        elif isinstance(num_images, Mapping):
            n = int(num_images[split])
        else:
            n = int(num_images)
        rng = _split_rng(seed, split)
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        ann_id = 1
        for i in range(n):
            img, insts = _render_image(rng, h, w)
            fname = f"{i + 1:06d}.{image_format}"
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
            if not cv2.imwrite(str(img_dir / fname), img, params):
                raise OSError(f"Could not write {img_dir / fname}")
            images.append({"id": i + 1, "file_name": fname, "height": h, "width": w})
            for cls, m in insts:
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                ys, xs = np.nonzero(m)
                x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": i + 1,
                        "category_id": cls + 1,
                        "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                        "area": int(m.sum()),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
        data = {
            "info": {
                "description": "smoke_shapes: synthetic smoke-test dataset (not a benchmark)",
                "version": "1",
                "seed": int(seed),
                "split": split,
            },
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(SMOKE_CLASSES)],
        }
        json_file = root / f"annotations_{split}.json"
        tmp = json_file.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, json_file)
        out[split] = {"json_file": str(json_file), "image_root": str(img_dir)}
    return out


_SMOKE_SPLITS = ("train", "val")


def _smoke_paths(root: Path) -> Dict[str, Dict[str, str]]:
    return {
        s: {"json_file": str(root / f"annotations_{s}.json"), "image_root": str(root / s)}
        for s in _SMOKE_SPLITS
    }


def _smoke_complete(root: Path) -> bool:
    return all(os.path.isfile(p["json_file"]) for p in _smoke_paths(root).values())


def ensure_smoke_dataset(root: Union[str, os.PathLike, None] = None) -> Dict[str, Dict[str, str]]:
    """Generate the default smoke dataset (seed 0, 128 train / 32 val images, 256x320) under
    ``root`` (default ``$INSTSEG_DATASETS/smoke_shapes``) unless it is already there.

    Generation goes to a temporary sibling folder renamed into place, so that concurrent
    processes (e.g. DDP ranks) never see a half-written dataset. Returns the paths as
    :func:`make_smoke_dataset` does.
    """
    root = Path(root if root is not None else os.path.join(datasets_root(), "smoke_shapes"))
    root = root.expanduser().resolve()
    if _smoke_complete(root):
        return _smoke_paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        make_smoke_dataset(tmp, splits=_SMOKE_SPLITS)
        try:
            os.rename(tmp, root)
        except OSError:  # root exists: finished by another process, or an incomplete leftover
            if not _smoke_complete(root):
                shutil.rmtree(root, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _smoke_paths(root)


class _SmokeLoader:
    """Comparable loader: generate the smoke dataset if missing, then load one split."""

    def __init__(self, name: str, root: str, split: str) -> None:
        self.name, self.root, self.split = name, root, split

    def __call__(self) -> List[dict]:
        paths = ensure_smoke_dataset(self.root)[self.split]
        return load_coco_json(paths["json_file"], paths["image_root"], self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SmokeLoader) and (self.name, self.root, self.split) == (
            other.name, other.root, other.split,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.root, self.split))

    def __repr__(self) -> str:
        return f"smoke_shapes({self.root!r}, split={self.split!r})"


def register_smoke_dataset(root: Union[str, os.PathLike, None] = None, prefix: str = "smoke_shapes") -> List[str]:
    """Register ``<prefix>_train`` and ``<prefix>_val`` (default ``smoke_shapes_train/val``).

    Cheap: nothing is generated now. The files are generated under ``root`` (default
    ``$INSTSEG_DATASETS/smoke_shapes``) by :func:`ensure_smoke_dataset` on first use, i.e. on
    ``DatasetCatalog.get(name)`` or on first access of the metadata's ``json_file`` (which an
    evaluator reads). ``thing_classes`` are known right away.

    Returns:
        The registered names.

    Raises:
        ValueError: a name is already registered with a different root.
    """
    root_p = Path(root if root is not None else os.path.join(datasets_root(), "smoke_shapes"))
    root_s = str(root_p.expanduser().resolve())
    names = []
    for split in _SMOKE_SPLITS:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, _SmokeLoader(name, root_s, split))
        meta = MetadataCatalog.get(name)
        meta.set(
            thing_classes=list(SMOKE_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SMOKE_CLASSES))},
            image_root=os.path.join(root_s, split),
            evaluator_type="coco",
        )
        if not meta.has("json_file"):
            meta.set_lazy(
                "json_file", lambda root_s=root_s, split=split: ensure_smoke_dataset(root_s)[split]["json_file"]
            )
        names.append(name)
    return names
