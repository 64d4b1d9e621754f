"""Dataset validation (issue 11, items 1 and 2): annotation checks at load time and in the mapper,
strict image decoding, the up-front file scan, its loader wiring and tools/check_dataset.py.

Most tests build a small synthetic json and images in ``tmp_path`` (no shared data needed); the
pixel-equality test of :func:`read_image` uses the shared sample images and skips without them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import resource
from pathlib import Path

import cv2
import numpy as np
import pytest

from instseg.config import get_cfg
from instseg.data import (
    AnnotationError,
    DatasetCatalog,
    DatasetError,
    DatasetFilesError,
    DatasetJSONError,
    DatasetMapper,
    ImageDecodeError,
    annotations_to_masks,
    check_dataset_files,
    load_coco_json,
    polygons_to_bitmask,
    read_image,
    register_coco_instances,
)
from instseg.data.build import build_test_loader, build_train_loader
from instseg.data.validation import _rle_string_counts, check_rle, location, resolve_check_files

H, W = 60, 80  # synthetic image size


@contextlib.contextmanager
def memory_limit(extra_bytes: int = 2 * 2**30):
    """Address-space limit of the current size + ``extra_bytes`` (restored after): a regression
    that sends a huge coordinate to pycocotools fails with MemoryError instead of taking the
    machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, vm + extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _image(path: Path, h: int = H, w: int = W, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    assert cv2.imwrite(str(path), img)
    return path


def _dataset(tmp_path: Path, n_images: int = 2):
    """A valid json (2 images, 2 polygon annotations each) and its images."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    images, annos = [], []
    for i in range(n_images):
        _image(root / f"im{i}.jpg", seed=i)
        images.append({"id": 10 + i, "file_name": f"im{i}.jpg", "height": H, "width": W})
        for k in range(2):
            x, y = 5 + 20 * k, 5 + 10 * k
            annos.append({"id": 100 + 10 * i + k, "image_id": 10 + i, "category_id": 1 + k, "iscrowd": 0,
                          "bbox": [x, y, 30, 20], "area": 600,
                          "segmentation": [[x, y, x + 30, y, x + 30, y + 20, x, y + 20]]})
    raw = {"images": images, "annotations": annos,
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return raw, root


def _write(tmp_path: Path, raw, name: str = "ann.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return str(p)


def _mapper():
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 80
    return DatasetMapper(cfg, is_train=True)


# ------------------------------------------------------------------------------------------- #
# coordinates: NaN / Inf are errors, huge values are clipped
# ------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_polygon_coordinate_is_an_error_naming_file_image_annotation(tmp_path, value):
    raw, root = _dataset(tmp_path)
    raw["annotations"][1]["segmentation"][0][3] = value  # json.dumps writes NaN / Infinity
    jf = _write(tmp_path, raw)
    with memory_limit(), pytest.raises(AnnotationError) as e:
        load_coco_json(jf, str(root))
    assert isinstance(e.value, ValueError) and isinstance(e.value, DatasetError)
    assert str(e.value) == (f"{jf}: image 10 (im0.jpg) annotation 101: polygon 0 has a non-finite "
                            f"coordinate ({value}); coordinates must be finite pixels")
    assert (e.value.image_id, e.value.annotation_id) == (10, 101)


def test_non_finite_bbox_is_an_error(tmp_path):
    raw, root = _dataset(tmp_path)
    raw["annotations"][2]["bbox"][2] = float("inf")
    jf = _write(tmp_path, raw)
    with pytest.raises(AnnotationError, match=r"image 11 \(im1.jpg\) annotation 110: bbox \[5, 5, inf, 20\] "
                                              r"has a non-finite value"):
        load_coco_json(jf, str(root))


def test_huge_coordinate_is_clipped_with_a_counted_warning_and_the_mask_is_unchanged(tmp_path, caplog):
    raw, root = _dataset(tmp_path)
    # a triangle with one vertex far to the right: its edges cross the image at a slant
    tri = [10.0, 10.0, 1e8, 30.0, 10.0, 50.0]
    raw["annotations"][0]["segmentation"] = [tri]
    raw["annotations"][3]["segmentation"][0][0] = -1e8
    raw["annotations"][3]["bbox"] = [-1e8, 15, 1e8 + 55, 20]
    jf = _write(tmp_path, raw)
    with memory_limit(), caplog.at_level(logging.WARNING, logger="instseg.data"):
        dicts = load_coco_json(jf, str(root))
    assert f"{jf}: clipped 2 annotation(s) with coordinates more than max(H, W) px outside the image." in caplog.text
    assert f"{jf}: image 10 (im0.jpg) annotation 100: coordinates more than 80 px (max(H, W)) outside the image clipped" in caplog.text
    assert caplog.text.count("clipped 2 annotation(s)") == 1  # one summary warning
    (poly,) = dicts[0]["annotations"][0]["segmentation"]
    assert max(poly[0::2]) <= W + 80 and min(poly) >= -80  # within the margin box
    # the mask inside the image equals pycocotools' on the same line at a far but affordable
    # distance (the clipping box is larger than the image, so the edges inside are the same)
    far = [10.0, 10.0, 1e5, 10.0 + 20.0 * (1e5 - 10.0) / (1e8 - 10.0), 10.0, 50.0]
    from pycocotools import mask as mask_util

    ref = mask_util.decode(mask_util.merge(mask_util.frPyObjects([far], H, W))).astype(bool)
    got = annotations_to_masks(dicts[0]["annotations"][:1], H, W)[0]
    assert ref.sum() > 500 and np.array_equal(got, ref)
    # the unchanged annotations keep their exact coordinates
    assert dicts[0]["annotations"][1]["segmentation"] == raw["annotations"][1]["segmentation"]
    x, y, w, h = dicts[1]["annotations"][1]["bbox"]
    assert (x, y, x + w) == (-80.0, 15.0, 55.0)


def test_mapper_path_guards_pycocotools_against_nan_and_huge(tmp_path):
    """Dataset dicts that bypass load_coco_json (custom loaders): the mapper checks too."""
    raw, root = _dataset(tmp_path)
    d = load_coco_json(_write(tmp_path, raw), str(root))[0]
    huge = copy.deepcopy(d)
    huge["annotations"][1]["segmentation"][0][2] = 1e8
    with memory_limit():
        out = _mapper()(huge)
        assert len(out["instances"]["labels"]) == 2
        masks = polygons_to_bitmask([np.array([0, 0, 1e9, 0, 1e9, 1e9], dtype=float)], H, W)  # the last guard
    assert masks[:, :].sum() > 0.4 * H * W
    bad = copy.deepcopy(d)
    bad["annotations"][1]["segmentation"][0][2] = float("nan")
    with pytest.raises(AnnotationError) as e:
        _mapper()(bad)
    assert str(e.value) == (f"{d['file_name']}: image 10 annotation 101 (#1 of the image): polygon 0 has a "
                            "non-finite coordinate (nan); coordinates must be finite pixels")
    with pytest.raises(ValueError, match="non-finite"):
        polygons_to_bitmask([np.array([0, 0, np.inf, 0, 5, 5])], H, W)


# ------------------------------------------------------------------------------------------- #
# RLE
# ------------------------------------------------------------------------------------------- #
def test_rle_size_mismatch_names_image_and_annotation_at_load_and_in_the_mapper(tmp_path):
    from pycocotools import mask as mask_util

    raw, root = _dataset(tmp_path)
    small = mask_util.encode(np.asfortranarray(np.ones((10, 10), dtype=np.uint8)))
    rle = {"size": [10, 10], "counts": small["counts"].decode()}
    raw["annotations"][2]["segmentation"] = rle
    jf = _write(tmp_path, raw)
    with pytest.raises(AnnotationError) as e:
        load_coco_json(jf, str(root))
    assert str(e.value) == (f"{jf}: image 11 (im1.jpg) annotation 110: RLE size [10, 10] does not match the "
                            f"image size [{H}, {W}] (height, width)")
    # in the mapper (a dict from another source): file, image id, annotation id and position
    raw, root = _dataset(tmp_path)
    d = load_coco_json(_write(tmp_path, raw), str(root))[1]
    d["annotations"][1]["segmentation"] = rle
    with pytest.raises(AnnotationError) as e:
        _mapper()(d)
    assert str(e.value) == (f"{d['file_name']}: image 11 annotation 111 (#1 of the image): RLE size [10, 10] "
                            f"does not match the image size [{H}, {W}] (height, width)")
    with pytest.raises(AnnotationError, match=r"image 11 annotation #0: RLE size"):
        annotations_to_masks([{"segmentation": rle}], H, W, file_name="x.jpg", image_id=11)


def test_rle_runs_must_cover_the_image(tmp_path):
    from pycocotools import mask as mask_util

    m = np.zeros((H, W), dtype=np.uint8)
    m[10:30, 5:50] = 1
    enc = mask_util.encode(np.asfortranarray(m))
    s = enc["counts"].decode()
    assert sum(_rle_string_counts(s)) == H * W  # the Python port reads pycocotools' strings
    ok = check_rle({"size": [H, W], "counts": s}, H, W)
    assert (mask_util.decode(ok) == m).all()
    runs = _rle_string_counts(s)
    assert (mask_util.decode(check_rle({"size": [H, W], "counts": runs}, H, W)) == m).all()  # list form
    raw, root = _dataset(tmp_path)
    raw["annotations"][0]["segmentation"] = {"size": [H, W], "counts": runs[:-1]}  # short of the image
    raw["annotations"][1]["segmentation"] = {"size": [H, W], "counts": s[:-1]}  # cut inside a value?
    raw["annotations"][2]["segmentation"] = {"size": [H, W], "counts": [H * W + 5]}  # beyond the image
    jf = _write(tmp_path, raw)
    with pytest.raises(AnnotationError) as e:
        load_coco_json(jf, str(root))
    p = e.value.problems
    assert p[0] == f"{jf}: image 10 (im0.jpg) annotation 100: RLE runs add up to {H * W - runs[-1]} pixels, not height * width = {H * W}"
    assert p[1].startswith(f"{jf}: image 10 (im0.jpg) annotation 101: RLE ")
    assert p[2] == f"{jf}: image 11 (im1.jpg) annotation 110: RLE runs add up to {H * W + 5} pixels, not height * width = {H * W}"
    assert str(e.value).startswith(f"{jf}: 3 invalid image/annotation entries")


# ------------------------------------------------------------------------------------------- #
# invalid JSON, missing keys, wrong types, duplicates
# ------------------------------------------------------------------------------------------- #
def test_invalid_json_names_the_file_and_position(tmp_path):
    raw, root = _dataset(tmp_path)
    text = json.dumps(raw, indent=1)
    cut = text.index('"annotations"')
    jf = _write(tmp_path, text[:cut] + "," + text[cut:])
    line = text[:cut].count("\n") + 1
    col = cut - text[:cut].rfind("\n")
    with pytest.raises(DatasetJSONError) as e:
        load_coco_json(jf, str(root))
    assert str(e.value) == (f"{jf}: invalid JSON at line {line} column {col} (char {cut}): Expecting property "
                            "name enclosed in double quotes")
    from instseg.data import read_coco_categories

    with pytest.raises(DatasetJSONError, match=f"{jf}: invalid JSON at line {line} column {col}"):
        read_coco_categories(jf)
    jf2 = _write(tmp_path, "[1, 2]", "list.json")
    with pytest.raises(DatasetJSONError, match="not a COCO instances json"):
        load_coco_json(jf2, str(root))


def _ann(raw, i=0):
    return raw["annotations"][i]


CASES = {
    "segmentation a string": (lambda r: _ann(r).update(segmentation="abc"),
                              "image 10 (im0.jpg) annotation 100: segmentation must be a list of polygons or an RLE dict, got str"),
    "polygon with a string": (lambda r: _ann(r)["segmentation"][0].__setitem__(2, "7"),
                              "image 10 (im0.jpg) annotation 100: polygon 0 must be a flat list of numbers, found '7' (str)"),
    "nested polygon": (lambda r: _ann(r).update(segmentation=[[[1, 2], [3, 4], [5, 6]]]),
                       "image 10 (im0.jpg) annotation 100: polygon 0 must be a flat list of numbers"),
    "bbox missing": (lambda r: _ann(r).pop("bbox"),
                     "image 10 (im0.jpg) annotation 100: annotation has no 'bbox' ([x, y, width, height] pixels)"),
    "bbox 3 values": (lambda r: _ann(r).update(bbox=[1, 2, 3]),
                      "image 10 (im0.jpg) annotation 100: bbox must be [x, y, width, height], got 3 values"),
    "bbox negative size": (lambda r: _ann(r).update(bbox=[1, 2, -3, 4]),
                           "image 10 (im0.jpg) annotation 100: bbox [1, 2, -3, 4] has a negative width or height"),
    "category_id missing": (lambda r: _ann(r).pop("category_id"),
                            "image 10 (im0.jpg) annotation 100: annotation has no 'category_id'"),
    "unknown category": (lambda r: _ann(r).update(category_id=7),
                         "image 10 (im0.jpg) annotation 100: category_id 7 is not among the json's categories [1, 2]"),
    "category as string": (lambda r: _ann(r).update(category_id="1"),
                           "image 10 (im0.jpg) annotation 100: category_id '1' is not among the json's categories [1, 2]"),
    "iscrowd 2": (lambda r: _ann(r).update(iscrowd=2),
                  "image 10 (im0.jpg) annotation 100: 'iscrowd' must be 0 or 1, got 2"),
    "annotation id missing": (lambda r: _ann(r).pop("id"),
                              "image 10 (im0.jpg) annotation #0: annotation 'id' must be an integer, got None"),
    "duplicate annotation ids": (lambda r: _ann(r, 2).update(id=101),
                                 "image 11 (im1.jpg) annotation 101: duplicate annotation id 101 (also annotation #1 of the json)"),
    "image_id a string": (lambda r: _ann(r).update(image_id="10"),
                          "image 10 annotation 100: annotation 'image_id' must be an integer, got '10'"),
    "duplicate image ids": (lambda r: r["images"][1].update(id=10),
                            "image 10 (im1.jpg): duplicate image id 10 (also image #0 of the json)"),
    "image without file_name": (lambda r: r["images"][0].pop("file_name"),
                                "image 10: image 'file_name' must be a non-empty string, got None"),
    "height zero": (lambda r: r["images"][0].update(height=0),
                    "image 10 (im0.jpg): 'height' must be a positive integer (pixels), got 0"),
    "width a string": (lambda r: r["images"][0].update(width="80"),
                       "image 10 (im0.jpg): 'width' must be a positive integer (pixels), got '80'"),
    "height missing": (lambda r: r["images"][1].pop("height"), "image 11 (im1.jpg): has no 'height'"),
    "annotation not an object": (lambda r: r["annotations"].append([1, 2]),
                                 "annotation #4: annotation entry must be an object, got list"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_entries_raise_the_documented_error(tmp_path, case):
    mutate, expected = CASES[case]
    raw, root = _dataset(tmp_path)
    mutate(raw)
    jf = _write(tmp_path, raw)
    with pytest.raises(AnnotationError) as e:
        load_coco_json(jf, str(root))
    msg = str(e.value)
    if case == "image_id a string":  # the annotation's image is unknown: no file name
        assert msg.startswith(f"{jf}: image 10 annotation 100: "), msg
    assert msg.startswith(f"{jf}: {expected}"), msg


def test_all_problems_are_listed_at_once(tmp_path):
    raw, root = _dataset(tmp_path, n_images=3)
    for a in raw["annotations"]:
        a["segmentation"][0][0] = float("nan")
    jf = _write(tmp_path, raw)
    with pytest.raises(AnnotationError) as e:
        load_coco_json(jf, str(root))
    assert len(e.value.problems) == 6
    lines = str(e.value).splitlines()
    assert lines[0] == f"{jf}: 6 invalid image/annotation entries (tools/check_dataset.py lists them all):"
    assert lines[6] == f"  {jf}: image 12 (im2.jpg) annotation 121: polygon 0 has a non-finite coordinate (nan); coordinates must be finite pixels"


def test_valid_entries_load_unchanged_and_keep_the_annotation_id(tmp_path):
    raw, root = _dataset(tmp_path)
    raw["images"][0]["height"] = float(H)  # 60.0 is accepted
    raw["annotations"].append({"id": 999, "image_id": 77, "category_id": 1, "bbox": [0, 0, 1, 1],
                               "segmentation": [[0, 0, 1, 0, 1, 1]]})  # unknown image: ignored
    raw["annotations"][2]["segmentation"] = [[1, 2, 30, 2, 30, 40]]  # integers: converted to floats
    raw["annotations"][3]["segmentation"][0][2] = W + 79.5  # outside the image, inside the margin: kept
    dicts = load_coco_json(_write(tmp_path, raw), str(root))
    assert [a["id"] for d in dicts for a in d["annotations"]] == [100, 101, 110, 111]
    seg = dicts[1]["annotations"][0]["segmentation"]
    assert seg == [[1.0, 2.0, 30.0, 2.0, 30.0, 40.0]] and all(type(v) is float for v in seg[0])
    assert dicts[1]["annotations"][1]["segmentation"] == raw["annotations"][3]["segmentation"]
    assert dicts[0]["height"] == H and isinstance(dicts[0]["height"], int)
    assert dicts[0]["annotations"][0]["segmentation"] == raw["annotations"][0]["segmentation"]
    assert location("f.json", 1, "a.jpg", 2) == "f.json: image 1 (a.jpg) annotation 2"


# ------------------------------------------------------------------------------------------- #
# image files
# ------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_image_raises_image_decode_error_naming_the_file(tmp_path, ext):
    p = _image(tmp_path / f"good{ext}", 120, 160)
    data = p.read_bytes()
    bad = tmp_path / f"truncated{ext}"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError) as e:
        read_image(str(bad))
    assert str(e.value).startswith(f"{bad}: cannot decode image (OSError: image file is truncated")
    # OpenCV alone returns an image for the truncated JPEG (what happened before)
    if ext == ".jpg":
        assert cv2.imread(str(bad)) is not None
    bad.write_bytes(data[:-2])  # even the last marker missing
    with pytest.raises(ImageDecodeError):
        read_image(str(bad))
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" + bytes(range(256)))
    with pytest.raises(ImageDecodeError, match="garbage.jpg: cannot decode image"):
        read_image(str(tmp_path / "garbage.jpg"))


def test_read_image_pixels_equal_opencv_on_the_sample_images(shared_data):
    """Pillow only validates: the pixels are still OpenCV's (the golden tests' decoder)."""
    files = sorted((shared_data / "coco128-seg" / "images").glob("*")) + sorted((shared_data / "fruits_nuts" / "images").glob("*"))
    if not files:
        pytest.skip("no sample images")
    for f in files:
        ref = cv2.imread(str(f), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert np.array_equal(read_image(str(f)), ref), f


def test_exif_orientation_is_applied_and_checked_against_the_rotated_size(tmp_path):
    from PIL import Image

    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, :50] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, exif=exif, quality=95)
    img = read_image(str(p))
    assert img.shape == (100, 40, 3) and np.array_equal(img, cv2.imread(str(p))[:, :, ::-1])
    check_dataset_files([{"file_name": str(p), "image_id": 1, "height": 100, "width": 40}], progress=False)
    with pytest.raises(DatasetFilesError, match="decoded size"):
        check_dataset_files([{"file_name": str(p), "image_id": 1, "height": 40, "width": 100}], progress=False)


def test_up_front_scan_reports_every_bad_file_at_once(tmp_path):
    raw, root = _dataset(tmp_path, n_images=6)
    (root / "im1.jpg").unlink()  # missing
    data = (root / "im2.jpg").read_bytes()
    (root / "im2.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (root / "im3.jpg").write_bytes(b"not an image at all")  # corrupt
    _image(root / "im4.jpg", h=H + 1)  # of another size than the json says
    dicts = load_coco_json(_write(tmp_path, raw), str(root))
    with pytest.raises(DatasetFilesError) as e:
        check_dataset_files(dicts, progress=False)
    msg = str(e.value)
    assert msg.splitlines()[0] == ("4 of 6 image file(s) cannot be used: 1 missing, 2 corrupt or truncated, "
                                   "1 of another size than the json says:")
    assert f"  image 11 ({root / 'im1.jpg'}): missing: file not found" in msg
    assert f"  image 12 ({root / 'im2.jpg'}): corrupt: cannot decode image (OSError: image file is truncated" in msg
    assert f"  image 13 ({root / 'im3.jpg'}): corrupt: cannot decode image" in msg
    assert f"  image 14 ({root / 'im4.jpg'}): size: decoded size (h={H + 1}, w={W}) differs from the json's (h={H}, w={W})" in msg
    assert sorted(p[1] for p in e.value.problems) == [11, 12, 13, 14]
    assert check_dataset_files([dicts[0], dicts[5]], progress=False) == 2
    with pytest.raises(DatasetFilesError) as e:
        check_dataset_files(dicts, progress=False, max_listed=2)
    assert "  ... and 2 more" in str(e.value)


def test_scan_threads_outlive_the_scan_so_a_loader_can_fork_safely(tmp_path):
    # A scan thread that exits runs OpenCV's TLS destructors under OpenCV's global mutex after
    # Python's join has returned; a loader forking then gave workers a locked mutex (cv2.imread
    # hung). The scan's threads must therefore stay alive, idle, and be reused by the next scan.
    import threading

    raw, root = _dataset(tmp_path, n_images=4)
    dicts = load_coco_json(_write(tmp_path, raw), str(root))

    def scan_threads():
        return {t.ident: t for t in threading.enumerate() if t.name.startswith("instseg-scan")}

    assert check_dataset_files(dicts[:2], num_workers=2, progress=False) == 2
    first = scan_threads()
    assert first and all(t.is_alive() for t in first.values())
    for d in dicts[2:]:  # new files (not in the passed-files memo), so the pool runs again
        _image(Path(d["file_name"]), h=H)
    assert check_dataset_files(dicts[2:], num_workers=2, progress=False) == 2
    assert set(first) <= set(scan_threads()) and all(t.is_alive() for t in first.values())


def test_loaders_scan_the_files_according_to_dataloader_check_files(tmp_path):
    raw, root = _dataset(tmp_path, n_images=3)
    (root / "im1.jpg").unlink()
    (root / "im2.jpg").write_bytes(b"broken")
    name = f"_val_{tmp_path.name}"
    register_coco_instances(name, _write(tmp_path, raw), str(root))
    try:
        cfg = get_cfg()
        cfg.DATASETS.TRAIN = (name,)
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SOLVER.IMS_PER_BATCH = 1
        assert cfg.DATALOADER.CHECK_FILES == "auto"
        with pytest.raises(DatasetFilesError, match="2 of 3 image file"):
            build_train_loader(cfg)
        with pytest.raises(DatasetFilesError, match="2 of 3 image file"):
            build_test_loader(cfg, name)
        cfg.DATALOADER.CHECK_FILES_MAX_IMAGES = 2  # "auto" and a larger dataset: not scanned
        build_train_loader(cfg)
        cfg.DATALOADER.CHECK_FILES = True
        with pytest.raises(DatasetFilesError):
            build_train_loader(cfg)
        cfg.DATALOADER.CHECK_FILES = False
        cfg.DATALOADER.CHECK_FILES_MAX_IMAGES = 10000
        build_test_loader(cfg, name)
    finally:
        DatasetCatalog.remove(name)
    assert resolve_check_files("AUTO", 5, 5) and not resolve_check_files("auto", 6, 5)
    assert resolve_check_files("true", 10**9, 1) and not resolve_check_files("off", 0, 1)
    with pytest.raises(ValueError, match="DATALOADER.CHECK_FILES must be 'auto', True or False, got 'sometimes'"):
        resolve_check_files("sometimes", 1, 1)


def test_check_dataset_tool_reports_and_exits_non_zero(tmp_path, capsys):
    from instseg.tools.check_dataset import main

    raw, root = _dataset(tmp_path, n_images=3)
    good = _write(tmp_path, raw, "good.json")
    assert main(["--dataset", f"_chk_good_{tmp_path.name}", good, str(root)]) == 0
    out = capsys.readouterr().out
    assert "annotations: OK (3 images, 6 annotations kept)" in out and "No problems found" in out
    raw["annotations"][0]["segmentation"][0][1] = float("nan")
    raw["annotations"][3]["bbox"] = "x"
    (root / "im2.jpg").write_bytes(b"broken")
    bad = _write(tmp_path, raw, "bad.json")
    assert main(["--dataset", f"_chk_bad_{tmp_path.name}", bad, str(root)]) == 1
    out = capsys.readouterr().out
    assert "annotations: 2 invalid entries" in out
    assert f"{bad}: image 10 (im0.jpg) annotation 100: polygon 0 has a non-finite coordinate (nan)" in out
    assert f"{bad}: image 11 (im1.jpg) annotation 111: bbox must be a list of numbers, got str" in out
    raw["annotations"][0]["segmentation"][0][1] = 1.0
    raw["annotations"][3]["bbox"] = [1, 1, 2, 2]
    files_bad = _write(tmp_path, raw, "files_bad.json")
    assert main(["--dataset", f"_chk_files_{tmp_path.name}", files_bad, str(root)]) == 1
    out = capsys.readouterr().out
    assert "images: 1 of 3 image file(s) cannot be used" in out and "im2.jpg" in out and "1 problem(s) found" in out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    # --config-file: the config's DATASETS.TRAIN and TEST (named by --dataset)
    cfg_file = tmp_path / "c.yaml"
    name = f"_chk_cfg_{tmp_path.name}"
    cfg_file.write_text(f'DATASETS:\n  TRAIN: ("{name}",)\n  TEST: ("{name}",)\n')
    assert main(["--config-file", str(cfg_file), "--dataset", name, files_bad, str(root)]) == 1
    out = capsys.readouterr().out
    assert out.count(f"== {name}") == 1 and "1 problem(s) found" in out
    cfg_file.write_text('DATASETS:\n  TRAIN: ("_never_registered",)\n')
    assert main(["--config-file", str(cfg_file)]) == 1
    assert "cannot set up the datasets: Dataset '_never_registered' is not registered" in capsys.readouterr().err
