"""Validation of datasets: annotations (at load time) and image files (on read and in an up-front scan).

Errors (all subclasses of :class:`DatasetError`, itself a ``ValueError``):

- :class:`DatasetJSONError`: the json file cannot be parsed, or is not a COCO instances json
  (the message names the file, and the line/column for invalid JSON);
- :class:`AnnotationError`: an image or annotation entry is invalid (wrong type, missing key,
  duplicate id, non-finite coordinate, RLE of the wrong size, ...);
- :class:`ImageDecodeError`: an image file exists but is truncated or cannot be decoded;
- :class:`DatasetFilesError`: the up-front scan (:func:`check_dataset_files`) found missing,
  corrupt or mis-sized images; it lists them all.

Every message uses one location format (:func:`location`)::

    FILE: image 42 (000000000042.jpg) annotation 1234: PROBLEM

where ``FILE`` is the json file (at load time) or the image file (in the mapper), and parts that
are unknown are left out.

Coordinates: polygon coordinates and boxes may lie up to ``M = max(H, W)`` pixels outside the
image (:func:`instseg.data.polygons.coordinate_margin`); beyond that they are clipped to the box
``[-M, W + M] x [-M, H + M]`` (the mask inside the image does not change) and counted in one
logged warning. NaN and Inf are errors: pycocotools rasterizes a polygon in time and memory
proportional to its perimeter and has no check of its own (a ``1e8`` or NaN coordinate used to
take 21 GB or crash the process).
"""
from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .polygons import clip_polygons_to_margin, coordinate_margin

__all__ = [
    "DatasetError",
    "DatasetJSONError",
    "AnnotationError",
    "ImageDecodeError",
    "DatasetFilesError",
    "location",
    "check_polygons",
    "check_rle",
    "check_dataset_files",
    "resolve_check_files",
]

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Base class of the dataset errors of :mod:`instseg.data.validation` (a ``ValueError``)."""


class DatasetJSONError(DatasetError):
    """A dataset json cannot be parsed (invalid JSON: the message gives line and column) or is not
    a COCO instances json (no ``images`` list, ...). Attribute ``json_file``."""

    def __init__(self, message: str, json_file: Optional[str] = None) -> None:
        super().__init__(message)
        self.json_file = json_file


class AnnotationError(DatasetError):
    """An image or annotation entry of a dataset is invalid.

    Attributes:
        json_file: the json file (``None`` in the mapper).
        image_id, annotation_id: of the first problem (``None`` when unknown).
        problems: every problem found, one message each (:func:`location` format); the exception
            message lists the first 20 and the count.
    """

    def __init__(self, message: str, *, json_file: Optional[str] = None, image_id: Any = None,
                 annotation_id: Any = None, problems: Optional[List[str]] = None) -> None:
        super().__init__(message)
        self.json_file = json_file
        self.image_id = image_id
        self.annotation_id = annotation_id
        self.problems = list(problems) if problems is not None else [message]


class ImageDecodeError(DatasetError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


class DatasetFilesError(DatasetError):
    """The up-front scan found problems. Attribute ``problems``: list of
    ``(file_name, image_id, kind, message)``, ``kind`` in ``"missing"``, ``"corrupt"``,
    ``"size"``."""

    def __init__(self, message: str, problems: List[Tuple[str, Any, str, str]]) -> None:
        super().__init__(message)
        self.problems = problems


def location(file: Optional[str] = None, image_id: Any = None, file_name: Optional[str] = None,
             annotation_id: Any = None, annotation_index: Optional[int] = None) -> str:
    """The one location prefix of every dataset message.

    ``location("a.json", 42, "x.jpg", 7)`` -> ``"a.json: image 42 (x.jpg) annotation 7"``;
    ``annotation_index`` (position among the image's annotations) is added as ``"#i"`` when the id
    is unknown or as ``"(#i of the image)"``. Unknown parts are left out.
    """
    parts = []
    if image_id is not None or file_name is not None:
        s = f"image {image_id}" if image_id is not None else "image"
        if file_name is not None:
            s += f" ({file_name})"
        parts.append(s)
    if annotation_id is not None:
        s = f"annotation {annotation_id}"
        if annotation_index is not None:
            s += f" (#{annotation_index} of the image)"
        parts.append(s)
    elif annotation_index is not None:
        parts.append(f"annotation #{annotation_index}")
    body = " ".join(parts)
    if file is not None:
        return f"{file}: {body}" if body else str(file)
    return body


class Defect(ValueError):
    """A problem of one entry, without its location (the caller adds :func:`location`)."""


def _is_int(v: Any) -> bool:
    t = type(v)
    if t is int:
        return True
    return t is not bool and isinstance(v, (int, np.integer)) and not isinstance(v, np.bool_)


def _numeric_array(values: Any, what: str) -> np.ndarray:
    """``values`` as a 1-d numeric (int or float) array; :class:`Defect` unless a flat list of
    numbers."""
    if type(values) is not list and not isinstance(values, (list, tuple)):
        raise Defect(f"{what} must be a list of numbers, got {type(values).__name__}")
    try:
        arr = np.asarray(values)
        if arr.dtype.kind == "f" and arr.ndim == 1:  # the common case
            return arr
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is None:
            raise Defect(f"{what} must be a flat list of numbers, found an integer out of range")
        raise Defect(f"{what} must be a flat list of numbers, found {bad!r} ({type(bad).__name__})")
    return arr


def check_polygons(segm: Any, height: int, width: int) -> Tuple[List[List[float]], int, bool]:
    """Validate one annotation's polygon segmentation.

    Args:
        segm: a list of flat ``[x0, y0, x1, y1, ...]`` coordinate lists (pixels).
        height, width: the image size.

    Returns:
        ``(polygons, n_dropped, clipped)``: the polygons as float lists; the number dropped for
        having fewer than 3 points or an odd number of coordinates (as Detectron2's loader); and
        whether a polygon was clipped to the margin box (module docstring).

    Raises:
        Defect: a polygon is not a flat list of numbers, or has a NaN/Inf coordinate.
    """
    if not isinstance(segm, (list, tuple)):
        raise Defect(f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}")
    out: List[List[float]] = []
    arrays: List[np.ndarray] = []
    dropped = 0
    # a conservative box inside the margin box: one min and one max per polygon decide the
    # common case (NaN fails the comparisons and takes the exact path)
    m = coordinate_margin(height, width)
    lo_ok, hi_ok = -m, min(height, width) + m
    exact = False
    for j, poly in enumerate(segm):
        arr = _numeric_array(poly, f"polygon {j}")
        if arr.size:
            lo, hi = arr.min(), arr.max()
            if not (lo >= lo_ok and hi <= hi_ok):
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    bad = arr[~np.isfinite(arr)][0]
                    raise Defect(f"polygon {j} has a non-finite coordinate ({bad}); coordinates must be finite pixels")
                exact = True
        if arr.size % 2 or arr.size < 6:
            dropped += 1
            continue
        if arr.dtype.kind == "f":
            out.append(poly)
        else:  # integers (or an empty list): floats, as the data contract says
            arr = arr.astype(np.float64)
            out.append(arr.tolist())
        arrays.append(arr)
    if not exact:
        return out, dropped, False
    clipped_arrays, clipped = clip_polygons_to_margin(arrays, height, width)
    if not clipped:
        return out, dropped, False
    kept = [p for p in clipped_arrays if p.size >= 6]
    dropped += max(0, len(arrays) - len(kept))
    return [p.tolist() for p in kept], dropped, True


def check_bbox(bbox: Any, height: int, width: int) -> Tuple[List[float], bool]:
    """Validate an ``[x, y, w, h]`` box (pixels). Returns ``(bbox, clipped)``: floats, clipped
    to the margin box (module docstring) when it reaches beyond it.

    Raises:
        Defect: not 4 numbers, a non-finite value, or a negative width/height.
    """
    if not isinstance(bbox, (list, tuple)):
        raise Defect(f"bbox must be a list of numbers, got {type(bbox).__name__}")
    if len(bbox) != 4:
        raise Defect(f"bbox must be [x, y, width, height], got {len(bbox)} values")
    for v in bbox:
        if type(v) is not float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise Defect(f"bbox must be a flat list of numbers, found {v!r} ({type(v).__name__})")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:
        raise Defect(f"bbox {list(bbox)} has a value out of range") from None
    if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(w) and math.isfinite(h)):
        raise Defect(f"bbox {list(bbox)} has a non-finite value")
    if w < 0 or h < 0:
        raise Defect(f"bbox {list(bbox)} has a negative width or height")
    m = coordinate_margin(height, width)
    x0, y0, x1, y1 = x, y, x + w, y + h
    if x0 >= -m and y0 >= -m and x1 <= width + m and y1 <= height + m:
        return [x, y, w, h], False
    cx0, cy0 = min(max(x0, -m), width + m), min(max(y0, -m), height + m)
    cx1, cy1 = min(max(x1, -m), width + m), min(max(y1, -m), height + m)
    return [cx0, cy0, cx1 - cx0, cy1 - cy0], True


def _rle_string_counts(s: Union[str, bytes]) -> List[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools ``rleFrString``, in Python).

    Raises:
        Defect: a character outside the format, or the string ends inside a value.
    """
    if isinstance(s, bytes):
        s = s.decode("ascii", errors="replace")
    cnts: List[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise Defect("RLE counts string ends inside a value (truncated)")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise Defect(f"RLE counts string has an invalid character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(cnts) > 2:
            x += cnts[-2]
        cnts.append(x)
    return cnts


def check_rle(segm: Dict[str, Any], height: int, width: int) -> Dict[str, Any]:
    """Validate an RLE segmentation against the image size.

    Args:
        segm: ``{"size": [h, w], "counts": list of run lengths | compressed str/bytes}``.
        height, width: the image size.

    Returns:
        The RLE compressed (pycocotools ``frPyObjects`` for a list of counts; a copy otherwise).

    Raises:
        Defect: ``size`` missing or not ``[height, width]``, ``counts`` of the wrong type, a
            negative run, or runs that do not add up to ``height * width`` (pycocotools would
            read or write out of bounds).
    """
    from pycocotools import mask as mask_util

    size = segm.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size):
        raise Defect(f"RLE 'size' must be [height, width] integers, got {size!r}")
    if [int(size[0]), int(size[1])] != [int(height), int(width)]:
        raise Defect(f"RLE size {list(size)} does not match the image size {[int(height), int(width)]} (height, width)")
    counts = segm.get("counts")
    if isinstance(counts, (list, tuple)):
        arr = _numeric_array(counts, "RLE counts")
        runs = arr.tolist()
        if arr.size and (arr.dtype.kind == "f" and not np.all(arr == np.round(arr))):
            raise Defect("RLE counts must be integers")
    elif isinstance(counts, (str, bytes)):
        runs = _rle_string_counts(counts)
    else:
        raise Defect(f"RLE 'counts' must be a list of ints or a compressed string, got {type(counts).__name__}")
    if any(r < 0 for r in runs):
        raise Defect("RLE has a negative run length")
    total = int(sum(runs))
    if total != int(height) * int(width):
        raise Defect(f"RLE runs add up to {total} pixels, not height * width = {int(height) * int(width)}")
    if isinstance(counts, (list, tuple)):
        return mask_util.frPyObjects({"size": [int(height), int(width)], "counts": [int(r) for r in runs]},
                                     int(height), int(width))
    return dict(segm)


# --------------------------------------------------------------------------------------------- #
# Image files: the up-front scan
# --------------------------------------------------------------------------------------------- #
_checked_lock = threading.Lock()
_checked: set = set()  # (path, size, mtime_ns, height, width) of files that passed
_scan_pools: Dict[Tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads) -> the scan's pool


def _scan_pool(workers: int) -> ThreadPoolExecutor:
    """The image scan's thread pool, made once per process and thread count and never shut down.

    A thread that has called OpenCV runs OpenCV's thread-local-storage destructors when it exits,
    under a global (recursive) mutex of OpenCV, and Python's ``join`` returns before that native
    exit code has run. A data loader that forks its workers right after a scan whose threads are
    exiting can therefore copy the mutex locked by a thread the worker does not have: the worker's
    first ``cv2.imread`` then blocks forever (seen with opencv-python-headless 5.1: two trainings
    started side by side on 2 cores hung in 9 of 22 starts, the worker in ``pthread_mutex_lock``
    under ``cv2.imread``, the mutex owned by a scan thread id). Threads that never exit hold no
    OpenCV lock while they wait for work, so the fork is safe. Keyed by process id: a forked child
    makes its own pool (it does not have its parent's threads).
    """
    key = (os.getpid(), int(workers))
    pool = _scan_pools.get(key)
    if pool is None:
        pool = _scan_pools[key] = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="instseg-scan")
    return pool


def _file_key(d: dict) -> Optional[tuple]:
    try:
        st = os.stat(d["file_name"])
    except OSError:
        return None
    return (d["file_name"], st.st_size, st.st_mtime_ns, d.get("height"), d.get("width"))


def _check_one(d: dict) -> Optional[Tuple[str, Any, str, str]]:
    from .mapper import read_image

    file_name, image_id = d["file_name"], d.get("image_id")
    try:
        img = read_image(file_name)
    except FileNotFoundError:
        return (file_name, image_id, "missing", "file not found")
    except ImageDecodeError as e:
        msg = str(e)
        return (file_name, image_id, "corrupt", msg[len(file_name) + 2:] if msg.startswith(file_name + ": ") else msg)
    except Exception as e:  # noqa: BLE001 - any other failure to read is reported, not raised
        return (file_name, image_id, "corrupt", f"{type(e).__name__}: {e}")
    h, w = img.shape[:2]
    eh, ew = d.get("height"), d.get("width")
    if (eh is not None and eh != h) or (ew is not None and ew != w):
        return (file_name, image_id, "size", f"decoded size (h={h}, w={w}) differs from the json's (h={eh}, w={ew})")
    return None


def check_dataset_files(
    datasets: Union[str, Sequence[str], Sequence[dict]],
    num_workers: Optional[int] = None,
    progress: bool = True,
    max_listed: int = 50,
    desc: Optional[str] = None,
) -> int:
    """Open every image of ``datasets`` and report every missing, corrupt or mis-sized file at once.

    Each image is read as the mapper reads it (:func:`instseg.data.read_image`: Pillow's strict
    check, then OpenCV's decode with EXIF orientation) and its decoded size compared with the
    dict's ``height``/``width``. Files run in a thread pool (both decoders release the GIL; the
    pool lives as long as the process, so that no scan thread is exiting when a loader forks:
    :func:`_scan_pool`), with a tqdm progress bar. Files that passed are remembered in this process (by path, size,
    modification time and expected size), so a second scan of the same files is free.

    Args:
        datasets: a registered dataset name, a list of names, or a list of dataset dicts
            (``file_name``, ``image_id``, ``height``, ``width``).
        num_workers: threads (default ``min(8, os.cpu_count())``).
        progress: show a tqdm progress bar (on stderr).
        max_listed: problems listed in the error message (all are in ``.problems``).
        desc: progress bar label.

    Returns:
        The number of files checked.

    Raises:
        DatasetFilesError: one or more files are missing, corrupt/truncated or of another size
            than the json says; the message lists them (file, image id, problem) and counts them.
        KeyError: a dataset name is not registered.
    """
    if isinstance(datasets, str):
        datasets = [datasets]
    dicts: List[dict] = []
    for item in datasets:
        if isinstance(item, str):
            from .catalog import DatasetCatalog

            dicts.extend(DatasetCatalog.get(item))
        else:
            dicts.append(item)
    # one check per distinct file (a dataset may list an image twice, or two datasets share it)
    unique: Dict[tuple, dict] = {}
    for d in dicts:
        unique.setdefault((d["file_name"], d.get("height"), d.get("width")), d)
    todo = []
    for d in unique.values():
        key = _file_key(d)
        with _checked_lock:
            if key is not None and key in _checked:
                continue
        todo.append((key, d))
    problems: List[Tuple[str, Any, str, str]] = []
    if todo:
        from tqdm import tqdm

        workers = num_workers or min(8, os.cpu_count() or 1)
        bar = tqdm(total=len(todo), desc=desc or "Checking image files", unit="img", disable=not progress,
                   mininterval=1.0, leave=False)
        # a pool that outlives the scan: see _scan_pool (a loader may fork right after this)
        pool = _scan_pool(max(1, workers))
        for (key, d), res in zip(todo, pool.map(lambda kd: _check_one(kd[1]), todo)):
            bar.update(1)
            if res is None:
                if key is not None:
                    with _checked_lock:
                        _checked.add(key)
            else:
                problems.append(res)
        bar.close()
    if problems:
        kinds = {k: sum(1 for p in problems if p[2] == k) for k in ("missing", "corrupt", "size")}
        head = (f"{len(problems)} of {len(unique)} image file(s) cannot be used: {kinds['missing']} missing, "
                f"{kinds['corrupt']} corrupt or truncated, {kinds['size']} of another size than the json says")
        lines = [f"  {location(None, image_id=i, file_name=f)}: {k}: {m}" for f, i, k, m in problems[:max_listed]]
        if len(problems) > max_listed:
            lines.append(f"  ... and {len(problems) - max_listed} more")
        raise DatasetFilesError(
            head + ":\n" + "\n".join(lines) + "\nFix or remove these images (tools/check_dataset.py "
            "lists them all), or set DATALOADER.CHECK_FILES False to skip this check.",
            problems,
        )
    return len(unique)


def resolve_check_files(value: Any, num_images: int, max_images: int) -> bool:
    """Whether to scan image files, from ``DATALOADER.CHECK_FILES``.

    Args:
        value: ``"auto"`` (scan when ``num_images <= max_images``), ``True``/``False``, or the
            strings ``"true"/"false"/"on"/"off"/"1"/"0"`` (any case).
        num_images: images the loader would read.
        max_images: ``DATALOADER.CHECK_FILES_MAX_IMAGES``.

    Raises:
        ValueError: another value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s == "auto":
        return int(num_images) <= int(max_images)
    if s in ("true", "on", "1", "yes"):
        return True
    if s in ("false", "off", "0", "no", "none"):
        return False
    raise ValueError(f"DATALOADER.CHECK_FILES must be 'auto', True or False, got {value!r}")


def _summarize(json_file: str, counts: Dict[str, int], examples: List[str]) -> Optional[str]:
    """One warning line for the load-time summary (``None`` when nothing was dropped or clipped)."""
    parts = []
    if counts["poly_dropped"]:
        parts.append(f"dropped {counts['poly_dropped']} degenerate polygon(s) (fewer than 3 points)")
    if counts["ann_no_valid_poly"]:
        parts.append(f"dropped {counts['ann_no_valid_poly']} annotation(s) left without a valid polygon")
    if counts["ann_no_segm"]:
        parts.append(f"dropped {counts['ann_no_segm']} annotation(s) without segmentation")
    if counts["clipped"]:
        parts.append(f"clipped {counts['clipped']} annotation(s) with coordinates more than max(H, W) px "
                     "outside the image")
    if counts["unknown_image"]:
        parts.append(f"ignored {counts['unknown_image']} annotation(s) of image ids not in the json's images")
    if not parts:
        return None
    msg = f"{json_file}: " + "; ".join(parts) + "."
    if examples:
        msg += " First cases: " + "; ".join(examples)
    return msg


def iter_problems(problems: Iterable[str], limit: int = 20) -> str:
    """``problems`` as indented lines, at most ``limit``, with a count of the rest."""
    problems = list(problems)
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
