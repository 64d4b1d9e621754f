"""Tests of instseg.data: COCO loading, catalog, mapper/augmentations, samplers, loaders, smoke set."""
from __future__ import annotations

import itertools
import json
import logging
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from instseg.config import get_cfg
from instseg.data import (
    COCO_CATEGORIES,
    DatasetCatalog,
    DatasetMapper,
    GroupedBatchSampler,
    ImageDecodeError,
    InferenceSampler,
    InfiniteBatchSampler,
    MetadataCatalog,
    RandomCrop,
    ResizeShortestEdge,
    TrainingSampler,
    annotations_to_masks,
    boxes_from_masks,
    build_test_loader,
    build_train_loader,
    get_dataset_dicts,
    load_coco_json,
    make_smoke_dataset,
    read_image,
    register_coco_instances,
    register_smoke_dataset,
    resolve_num_classes,
)
from instseg.data.coco import _find_categories_fast
from instseg.data.transforms import shortest_edge_size


@pytest.fixture
def names():
    """Unique dataset names, unregistered after the test."""
    made = []

    def make(prefix="t"):
        n = f"{prefix}_{uuid.uuid4().hex[:8]}"
        made.append(n)
        return n

    yield make
    for n in made:
        if n in DatasetCatalog:
            DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def _cfg(train=(), test=(), **kw):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.DATALOADER.NUM_WORKERS = 0
    for k, v in kw.items():
        node = cfg
        parts = k.split("__")
        for p in parts[:-1]:
            node = getattr(node, p)
        setattr(node, parts[-1], v)
    return cfg


# ------------------------------------------------------------------------------------------- #
# COCO json loading and catalog
# ------------------------------------------------------------------------------------------- #
def test_load_coco_json_tiny8(coco128, names):
    jf = coco128 / "annotations_tiny8.json"
    raw = json.loads(jf.read_text())
    name = names()
    dicts = load_coco_json(str(jf), str(coco128 / "images"), name)
    assert len(dicts) == 8 == len(raw["images"])
    assert sum(len(d["annotations"]) for d in dicts) == 30 == len(raw["annotations"])

    meta = MetadataCatalog.get(name)
    cats = sorted(raw["categories"], key=lambda c: c["id"])
    assert meta.thing_classes == [c["name"] for c in cats]
    assert meta.thing_dataset_id_to_contiguous_id == {c["id"]: i for i, c in enumerate(cats)}
    cat_name = {c["id"]: c["name"] for c in raw["categories"]}
    # Annotations of each image, in json order, against the raw json.
    by_img = {}
    for a in raw["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    for d, img in zip(dicts, raw["images"]):
        assert d["image_id"] == img["id"]
        assert (d["height"], d["width"]) == (img["height"], img["width"])
        assert Path(d["file_name"]).is_absolute() and Path(d["file_name"]).is_file()
        assert Path(d["file_name"]).name == img["file_name"]
        for a, r in zip(d["annotations"], by_img[img["id"]], strict=True):
            assert 0 <= a["category_id"] < 80
            assert meta.thing_classes[a["category_id"]] == cat_name[r["category_id"]]
            assert a["bbox_mode"] == "XYWH_ABS"
            assert a["bbox"] == pytest.approx(r["bbox"])
            assert a["segmentation"] == [pytest.approx(p) for p in r["segmentation"]]
            assert a["iscrowd"] == 0


def test_builtin_coco_metadata_matches_real_coco_categories(coco128):
    raw = json.loads((coco128 / "annotations.json").read_text())
    assert [(c["id"], c["name"]) for c in COCO_CATEGORIES] == [
        (c["id"], c["name"]) for c in sorted(raw["categories"], key=lambda c: c["id"])
    ]
    meta = MetadataCatalog.get("coco_2017_val")
    assert len(meta.thing_classes) == 80 and meta.evaluator_type == "coco"
    assert meta.json_file.endswith("coco/annotations/instances_val2017.json")


def test_fast_category_reader_equals_full_parse(coco128):
    raw = json.loads((coco128 / "annotations.json").read_text())
    assert _find_categories_fast(str(coco128 / "annotations.json")) == raw["categories"]


def test_register_coco_instances_metadata_and_duplicates(coco128, tmp_path, names):
    name = names()
    jf = coco128 / "annotations_tiny8.json"
    register_coco_instances(name, str(jf), str(coco128 / "images"))
    meta = MetadataCatalog.get(name)
    # Classes known right after registering (read from the json's categories), and loading is lazy.
    assert len(meta.thing_classes) == 80
    assert meta.json_file == str(jf) and meta.evaluator_type == "coco"
    # Same name, same files: no-op. Same name, another json: error naming the dataset.
    register_coco_instances(name, str(jf), str(coco128 / "images"))
    other = tmp_path / "other.json"
    other.write_text(jf.read_text())
    with pytest.raises(ValueError, match=name):
        register_coco_instances(name, str(other), str(coco128 / "images"))
    with pytest.raises(ValueError, match="already registered"):
        DatasetCatalog.register(name, lambda: [])
    assert len(DatasetCatalog.get(name)) == 8
    with pytest.raises(KeyError, match="not registered"):
        DatasetCatalog.get(name + "_nope")


def test_degenerate_polygon_dropped_with_warning(coco128, tmp_path, caplog):
    raw = json.loads((coco128 / "annotations_tiny8.json").read_text())
    a0, a1 = raw["annotations"][0], raw["annotations"][1]
    a0["segmentation"] = [[10.0, 10.0, 50.0, 50.0]]  # 2 points only: annotation dropped
    a1["segmentation"] = a1["segmentation"] + [[1.0, 2.0, 3.0, 4.0]]  # extra bad polygon dropped
    jf = tmp_path / "bad.json"
    jf.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="instseg.data.coco"):
        dicts = load_coco_json(str(jf), str(coco128 / "images"))
    assert sum(len(d["annotations"]) for d in dicts) == 29
    assert "dropped 2 degenerate polygon(s)" in caplog.text
    assert "1 annotation(s) left without a valid polygon" in caplog.text
    kept = [a for d in dicts for a in d["annotations"] if d["image_id"] == a1["image_id"]]
    assert all(len(p) >= 6 for a in kept for p in a["segmentation"])
    # Still rasterizes fine.
    d = next(d for d in dicts if d["image_id"] == a1["image_id"])
    assert annotations_to_masks(d["annotations"], d["height"], d["width"]).any(axis=(1, 2)).all()


# ------------------------------------------------------------------------------------------- #
# Augmentations and mapper
# ------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "hw,short,max_size,expected",
    [((480, 640), 800, 1333, (800, 1067)), ((300, 2000), 800, 1333, (200, 1333)), ((640, 427), 512, 853, (767, 512))],
)
def test_shortest_edge_size(hw, short, max_size, expected):
    assert shortest_edge_size(*hw, short, max_size) == expected
    t = ResizeShortestEdge([short], max_size)
    out = t(v2.functional.to_image(torch.zeros(*hw, 3, dtype=torch.uint8).numpy()))
    assert tuple(out.shape[-2:]) == expected


def test_resize_range_sampling_and_crop_sizes():
    torch.manual_seed(0)
    t = ResizeShortestEdge([100, 104], 10_000, sample_style="range")
    img = torch.zeros(3, 50, 80, dtype=torch.uint8)
    from torchvision import tv_tensors

    shorts = {int(t(tv_tensors.Image(img)).shape[-2]) for _ in range(200)}
    assert shorts == {100, 101, 102, 103, 104}
    crop = RandomCrop("absolute_range", [20, 60])
    seen_h, seen_w = set(), set()
    for _ in range(300):
        out = crop(tv_tensors.Image(img))
        seen_h.add(out.shape[-2])
        seen_w.add(out.shape[-1])
    assert min(seen_h) == 20 and max(seen_h) == 50  # clipped to the image height
    assert min(seen_w) == 20 and max(seen_w) == 60


def test_boxes_from_masks_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 37, 53, generator=g) > 0.97
    masks[2] = False
    boxes = boxes_from_masks(masks)
    ref = masks_to_boxes(masks[[0, 1, 3, 4, 5]]).float()
    ref[:, 2:] += 1
    assert torch.equal(boxes[[0, 1, 3, 4, 5]], ref)
    assert torch.equal(boxes[2], torch.zeros(4))
    # hand cases: one pixel, a full-image mask, a mask touching the last row / column only
    m = torch.zeros(3, 5, 7, dtype=torch.bool)
    m[0, 2, 3] = True
    m[1] = True
    m[2, 4, 6] = True
    m[2, 1, 6] = True
    assert boxes_from_masks(m).tolist() == [[3, 2, 4, 3], [0, 0, 7, 5], [6, 1, 7, 5]]
    assert boxes_from_masks(torch.zeros(0, 5, 7, dtype=torch.bool)).shape == (0, 4)
    assert boxes_from_masks(torch.zeros(2, 5, 7, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]] * 2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _hand_transformed_mask(segm, hw, new_hw, flip=False, crop=None):
    """Detectron2's polygon path written out by hand: scale the coordinates to ``new_hw``, clip
    to ``crop = (top, left, height, width)`` with shapely and shift, flip ``x -> W - x``, then
    rasterize with pycocotools at the final size."""
    from shapely.geometry import Polygon, box

    (h, w), (nh, nw) = hw, new_hw
    polys = []
    for p in segm:
        q = np.asarray(p, dtype=np.float64).reshape(-1, 2).copy()
        q[:, 0] = q[:, 0] * (nw * 1.0 / w)
        q[:, 1] = q[:, 1] * (nh * 1.0 / h)
        polys.append(q)
    H, W = nh, nw
    if crop is not None:
        top, left, H, W = crop
        cropped = []
        for q in polys:
            inter = Polygon(q).buffer(0.0).intersection(box(left, top, left + W, top + H).buffer(0.0))
            for g in getattr(inter, "geoms", [inter]):
                if isinstance(g, Polygon) and not g.is_empty:
                    c = np.asarray(g.exterior.coords)[:-1].copy()
                    c[:, 0] -= left
                    c[:, 1] -= top
                    cropped.append(c)
        polys = cropped
    if flip:
        for q in polys:
            q[:, 0] = W - q[:, 0]
    if not polys:
        return np.zeros((H, W), dtype=bool)
    rle = mask_util.merge(mask_util.frPyObjects([q.reshape(-1) for q in polys], H, W))
    return mask_util.decode(rle).astype(bool)


def test_polygons_kernels_follow_detectron2_rules():
    """Coordinates, not pixel indices: flips are W - x / H - y, resize scales by new/old size,
    crop clips (a U shape cut below its base splits in two) and shifts; canvas sizes follow."""
    from torchvision.transforms.v2 import functional as F

    from instseg.data import Polygons

    u = [0, 0, 30, 0, 30, 30, 20, 30, 20, 10, 10, 10, 10, 30, 0, 30]  # a U, opening at y = 30
    p = Polygons.from_coco([[u], [[1, 1, 3, 1, 3, 3]]], (40, 50))
    assert p.lengths == ((8,), (3,)) and p.canvas_size == (40, 50) and p.dtype == torch.float64
    hf, vf = F.horizontal_flip(p), F.vertical_flip(p)
    assert np.array_equal(hf.to_list()[1][0], [[49, 1], [47, 1], [47, 3]])
    assert np.array_equal(vf.to_list()[1][0], [[1, 39], [3, 39], [3, 37]])
    r = F.resize(p, [20, 100])
    assert r.canvas_size == (20, 100) and np.array_equal(r.to_list()[1][0], [[2, 0.5], [6, 0.5], [6, 1.5]])
    c = F.crop(p, 15, 0, 25, 50)  # rows 15..40: the two arms of the U, the triangle gone
    assert c.canvas_size == (25, 50) and [len(inst) for inst in c.to_list()] == [2, 0]
    masks = c.rasterize()
    assert masks.shape == (2, 25, 50) and not masks[1].any()
    assert int(masks[0].sum()) == 2 * 10 * 15  # two 10 x 15 arms
    assert type(p.clone()) is Polygons and p.clone().lengths == p.lengths


class _FixedCrop(RandomCrop):
    """RandomCrop at a given window (known parameters for the hand-made reference)."""

    def __init__(self, top, left, height, width):
        super().__init__("absolute", [height, width])
        self.window = {"top": top, "left": left, "height": height, "width": width}

    def make_params(self, flat_inputs):
        return dict(self.window)


def test_mapper_polygons_transformed_then_rasterized_like_detectron2(coco128):
    """Polygons follow resize + crop + flip as coordinates and are rasterized at the output size
    (Detectron2's transform_instance_annotations + polygons_to_bitmask): bit-exact against the
    hand-transformed polygons; rasterizing first and transforming the mask (the old path, still
    used for RLEs) differs. Crowd annotations are dropped, instances cropped away too."""
    d = next(x for x in load_coco_json(str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
             if x["file_name"].endswith("000000000009.jpg"))
    h, w = d["height"], d["width"]
    nh, nw = shortest_edge_size(h, w, 320, 1000)  # (320, 427)
    crop = (120, 150, 180, 250)  # top, left, height, width: cuts 4 instances, removes the 4 small ones
    aug = v2.Compose([ResizeShortestEdge([320], 1000), _FixedCrop(*crop), v2.RandomHorizontalFlip(p=1.0)])
    annos = [dict(a) for a in d["annotations"]]
    n = len(annos)
    # one more instance, wholly outside the crop window (top-left 20x20 of the original image)
    annos.append({"bbox": [0, 0, 20, 20], "bbox_mode": "XYWH_ABS", "category_id": 5, "iscrowd": 0,
                  "segmentation": [[1.0, 1.0, 20.0, 1.0, 20.0, 20.0, 1.0, 20.0]]})
    annos.append(dict(annos[0], iscrowd=1))  # crowd: left out
    # the same first instance once more, as an RLE: it keeps the old path
    rle = mask_util.encode(np.asfortranarray(annotations_to_masks(annos[:1], h, w)[0].astype(np.uint8)))
    annos.append(dict(annos[0], segmentation={"size": rle["size"], "counts": rle["counts"].decode()}))
    d = dict(d, annotations=annos)

    out = DatasetMapper(None, is_train=True, augmentation=aug)(d)
    old = DatasetMapper(None, is_train=True, augmentation=aug, transform_polygons=False)(d)
    assert tuple(out["image"].shape) == (3, crop[2], crop[3]) and torch.equal(out["image"], old["image"])
    ins, ins_old = out["instances"], old["instances"]
    expected = [_hand_transformed_mask(a["segmentation"], (h, w), (nh, nw), flip=True, crop=crop) for a in annos[:n]]
    kept = [k for k in range(n) if expected[k].any()]
    assert 0 < len(kept) < n  # the crop removes some of the real instances, keeps others
    # kept: the real instances left by the crop, then the RLE copy; dropped: the outside one, the crowd
    assert ins["labels"].tolist() == [annos[k]["category_id"] for k in kept] + [annos[0]["category_id"]]
    assert ins["masks"].flatten(1).any(1).all() and torch.equal(ins["boxes"], boxes_from_masks(ins["masks"]))
    for j, k in enumerate(kept):
        assert np.array_equal(ins["masks"][j].numpy(), expected[k]), f"instance {k}"
    # the old path (rasterize at the original size, transform the masks with the image) moves
    # boundary pixels; the mapper's transform_polygons=False is that path
    img = tv_tensors.Image(torch.from_numpy(read_image(d["file_name"])).permute(2, 0, 1))
    masks0 = tv_tensors.Mask(torch.from_numpy(annotations_to_masks(annos[:n], h, w)))
    old_masks = aug({"image": img, "masks": masks0})["masks"].as_subclass(torch.Tensor).bool()
    assert sum(int((old_masks[k].numpy() != expected[k]).sum()) for k in range(n)) > 0
    old_kept = [k for k in range(n) if old_masks[k].any()]
    assert torch.equal(ins_old["masks"][: len(old_kept)], old_masks[old_kept])
    # the RLE copy is rasterized first and transformed as a mask, in both modes
    assert torch.equal(ins["masks"][-1], old_masks[0]) and torch.equal(ins_old["masks"][-1], old_masks[0])
    assert not np.array_equal(ins["masks"][-1].numpy(), expected[0])
    # a geometric transform without a polygon rule is an error that names the way out
    rot = v2.Compose([ResizeShortestEdge([320], 1000), v2.RandomRotation(10)])
    with pytest.raises(TypeError, match="transform_polygons=False"):
        DatasetMapper(None, is_train=True, augmentation=rot)(d)
    rotated = DatasetMapper(None, is_train=True, augmentation=rot, transform_polygons=False)(d)
    assert rotated["instances"]["masks"].shape[1:] == (nh, nw)


def test_mapper_flip_resize_alignment_real_images(coco128):
    dicts = load_coco_json(str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
    aug = v2.Compose([ResizeShortestEdge([320], 1000), v2.RandomHorizontalFlip(p=1.0)])
    mapper = DatasetMapper(None, is_train=True, augmentation=aug)
    for d in dicts[:4]:
        out = mapper(d)
        h, w = d["height"], d["width"]
        nh, nw = shortest_edge_size(h, w, 320, 1000)
        assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, nh, nw)
        assert (out["height"], out["width"], out["image_id"]) == (h, w, d["image_id"])
        ins = out["instances"]
        n = len(d["annotations"])
        assert ins["labels"].dtype == torch.int64 and ins["labels"].tolist() == [a["category_id"] for a in d["annotations"]]
        assert ins["masks"].dtype == torch.bool and tuple(ins["masks"].shape) == (n, nh, nw)
        assert ins["boxes"].dtype == torch.float32 and tuple(ins["boxes"].shape) == (n, 4)
        ref = masks_to_boxes(ins["masks"]).float()
        ref[:, 2:] += 1
        assert torch.equal(ins["boxes"], ref)
        # Independent reference (Detectron2's order): scale and flip the polygon coordinates by
        # hand, rasterize at the new size: bit-exact. The old order (rasterize at the original
        # size, resize the mask, flip it) is close but not equal.
        orig = annotations_to_masks(d["annotations"], h, w)
        for k in range(n):
            exp = _hand_transformed_mask(d["annotations"][k]["segmentation"], (h, w), (nh, nw), flip=True)
            got = ins["masks"][k].numpy()
            assert np.array_equal(got, exp)
            old = cv2.resize(orig[k].astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST)[:, ::-1] > 0
            assert _iou(got, old) > 0.9
            assert _iou(got, old[:, ::-1]) < _iou(got, old) or old.sum() == 0
        # The image is flipped too (compared with an independently resized/flipped original).
        rgb = cv2.imread(d["file_name"])[:, :, ::-1]
        exp_img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)[:, ::-1].astype(np.float32)
        got_img = out["image"].permute(1, 2, 0).numpy().astype(np.float32)
        err = np.abs(got_img - exp_img).mean()
        err_unflipped = np.abs(got_img - exp_img[:, ::-1]).mean()
        assert err < 6 and err < err_unflipped


def test_mapper_with_config_crop_keeps_masks_and_boxes_aligned(coco128):
    dicts = load_coco_json(str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
    cfg = _cfg(INPUT__MIN_SIZE_TRAIN=(256, 288), INPUT__MAX_SIZE_TRAIN=480)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.PROB = 1.0
    cfg.INPUT.CROP.RESIZE_SHORT = [300]
    cfg.INPUT.CROP.SIZE = [120, 200]
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    dropped = 0
    for d in dicts[:4] * 2:
        out = mapper(d)
        ins = out["instances"]
        H, W = out["image"].shape[-2:]
        assert min(H, W) in (256, 288) or max(H, W) == 480
        assert ins["masks"].shape[1:] == (H, W)
        assert ins["masks"].flatten(1).any(1).all()  # instances emptied by the crop are dropped
        assert torch.equal(ins["boxes"], boxes_from_masks(ins["masks"]))
        assert len(ins["labels"]) == len(ins["masks"]) <= len(d["annotations"])
        dropped += len(d["annotations"]) - len(ins["labels"])
    assert dropped > 0  # the small crops do remove instances


def test_mapper_test_mode_and_empty_image(coco128):
    dicts = {d["image_id"]: d for d in load_coco_json(str(coco128 / "annotations.json"), str(coco128 / "images"))}
    assert dicts[250]["annotations"] == [] and dicts[508]["annotations"] == []
    cfg = _cfg(INPUT__MIN_SIZE_TEST=240, INPUT__MAX_SIZE_TEST=400)
    out = DatasetMapper(cfg, is_train=False)(dicts[250])
    assert "instances" not in out and out["image_id"] == 250
    assert tuple(out["image"].shape) == (3,) + shortest_edge_size(480, 640, 240, 400)
    train_out = DatasetMapper(_cfg(INPUT__MIN_SIZE_TRAIN=(200,)), is_train=True)(dicts[508])
    assert train_out["instances"]["masks"].shape == (0,) + tuple(train_out["image"].shape[-2:])
    assert train_out["instances"]["boxes"].shape == (0, 4)
    # The training loader's filtering drops them (documented: FILTER_EMPTY_ANNOTATIONS).
    name = f"c128all_{uuid.uuid4().hex[:6]}"
    register_coco_instances(name, str(coco128 / "annotations.json"), str(coco128 / "images"))
    try:
        kept = {d["image_id"] for d in get_dataset_dicts([name], filter_empty=True)}
        assert len(kept) == 126 and 250 not in kept and 508 not in kept
        assert len(get_dataset_dicts([name], filter_empty=False)) == 128
    finally:
        DatasetCatalog.remove(name)


def test_mapper_bad_files(coco128, tmp_path):
    mapper = DatasetMapper(_cfg(INPUT__MIN_SIZE_TRAIN=(100,)), is_train=True)
    missing = str(tmp_path / "does_not_exist.jpg")
    with pytest.raises(FileNotFoundError, match="does_not_exist.jpg"):
        mapper({"file_name": missing, "image_id": 1, "height": 10, "width": 10, "annotations": []})
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(256)) * 4)
    with pytest.raises(ImageDecodeError, match="corrupt.jpg") as e:
        mapper({"file_name": str(corrupt), "image_id": 1, "height": 10, "width": 10, "annotations": []})
    assert isinstance(e.value, ValueError)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        mapper({"file_name": str(empty), "image_id": 1, "annotations": []})
    # A size that contradicts the dataset dict is an error naming the file.
    real = str(coco128 / "images" / "000000000009.jpg")
    with pytest.raises(ValueError, match="000000000009.jpg"):
        mapper({"file_name": real, "image_id": 9, "height": 10, "width": 10, "annotations": []})


# ------------------------------------------------------------------------------------------- #
# num classes
# ------------------------------------------------------------------------------------------- #
def test_resolve_num_classes(coco128, tmp_path, names):
    name = names()
    register_coco_instances(name, str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
    cfg = _cfg(train=[name])
    cfg.freeze()
    assert resolve_num_classes(cfg) == 80
    assert cfg.MODEL.NUM_CLASSES == 80 and cfg.is_frozen()

    bad = _cfg(train=[name], MODEL__NUM_CLASSES=5)
    with pytest.raises(ValueError) as e:
        resolve_num_classes(bad)
    assert "5" in str(e.value) and "80" in str(e.value) and name in str(e.value)

    assert resolve_num_classes(_cfg(test=[name])) == 80  # TEST when TRAIN is empty
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        resolve_num_classes(_cfg())
    assert resolve_num_classes(_cfg(MODEL__NUM_CLASSES=7)) == 7

    smoke = register_smoke_dataset(tmp_path / "smoke", prefix=names("smk"))
    with pytest.raises(ValueError, match="different numbers of classes"):
        resolve_num_classes(_cfg(train=[name, smoke[0]]))
    assert not (tmp_path / "smoke").exists()  # classes known without generating the files
    assert resolve_num_classes(_cfg(train=[smoke[0]])) == 3


# ------------------------------------------------------------------------------------------- #
# Samplers and loaders
# ------------------------------------------------------------------------------------------- #
def test_training_sampler_shards_are_disjoint():
    size, world = 11, 2
    streams = [list(itertools.islice(iter(TrainingSampler(size, seed=3, rank=r, world_size=world)), 40)) for r in range(world)]
    full = list(itertools.islice(iter(TrainingSampler(size, seed=3)), 80))
    assert streams[0] == full[0::2] and streams[1] == full[1::2]
    # Within each pass over the data (one permutation of 11 indices) the ranks never share an index.
    first_epoch = full[:size]
    assert sorted(first_epoch) == list(range(size))
    assert not set(first_epoch[0::2]) & set(first_epoch[1::2])
    assert streams[0][:5] != list(itertools.islice(iter(TrainingSampler(size, seed=4)), 0, 10, 2))


@pytest.mark.parametrize("grouped", [False, True])
def test_batch_sampler_resume_reproduces_tail(grouped):
    size, bs = 23, 3
    rng = np.random.default_rng(0)
    group_ids = rng.integers(0, 2, size)

    def batches(start_iter, rank=0, world=1):
        s = TrainingSampler(size, seed=5, rank=rank, world_size=world)
        bsamp = GroupedBatchSampler(s, group_ids, bs, start_iter) if grouped else InfiniteBatchSampler(s, bs, start_iter)
        return list(itertools.islice(iter(bsamp), 30))

    full = batches(0)
    assert batches(7)[:23] == full[7:30]
    assert all(len(b) == bs for b in full)
    if grouped:
        assert all(len({int(group_ids[i]) for i in b}) == 1 for b in full)
        assert {int(group_ids[b[0]]) for b in full} == {0, 1}


def test_inference_sampler_covers_once():
    for size, world in [(10, 3), (2, 4), (7, 1)]:
        shards = [list(InferenceSampler(size, r, world)) for r in range(world)]
        assert sum(shards, []) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_train_loader_stream_resume_ranks_and_grouping(coco128, names):
    name = names()
    register_coco_instances(name, str(coco128 / "annotations.json"), str(coco128 / "images"))
    cfg = _cfg(train=[name], SOLVER__IMS_PER_BATCH=4, SEED=11)
    meta = {d["image_id"]: d for d in DatasetCatalog.get(name)}
    ident = lambda d: d["image_id"]  # noqa: E731 -- skip image decoding: check the index stream

    def ids(rank=0, world=1, start=0, n=12):
        return list(itertools.islice(iter(build_train_loader(cfg, rank, world, start_iter=start, mapper=ident)), n))

    full = ids()
    assert all(len(b) == 4 for b in full)
    assert not {250, 508} & set(itertools.chain(*full))  # empty images filtered
    for b in full:  # aspect-ratio grouping on the original sizes
        assert len({meta[i]["width"] >= meta[i]["height"] for i in b}) == 1
    assert ids(start=5, n=7) == full[5:12]
    r0, r1 = ids(0, 2, n=8), ids(1, 2, n=8)
    assert all(len(b) == 2 for b in r0 + r1)
    seen0, seen1 = set(itertools.chain(*r0)), set(itertools.chain(*r1))
    assert not seen0 & seen1  # 32 draws of 126 images: one pass, disjoint shards

    cfg2 = _cfg(train=[name], SOLVER__IMS_PER_BATCH=3)
    with pytest.raises(ValueError, match="multiple"):
        build_train_loader(cfg2, 0, 2)


def test_loaders_map_real_images(coco128, names):
    name = names()
    register_coco_instances(name, str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
    cfg = _cfg(train=[name], test=[name], SOLVER__IMS_PER_BATCH=2, INPUT__MIN_SIZE_TRAIN=(160,),
               INPUT__MAX_SIZE_TRAIN=300, INPUT__MIN_SIZE_TEST=160, INPUT__MAX_SIZE_TEST=300)
    batch = next(iter(build_train_loader(cfg)))
    assert isinstance(batch, list) and len(batch) == 2
    for x in batch:
        assert x["image"].dtype == torch.uint8 and min(x["image"].shape[-2:]) == 160
        assert x["instances"]["masks"].shape[0] == x["instances"]["labels"].shape[0] > 0
    shards = [build_test_loader(cfg, name, rank=r, world_size=2, batch_size=3) for r in range(2)]
    got = [x["image_id"] for dl in shards for b in dl for x in b]
    assert got == [d["image_id"] for d in DatasetCatalog.get(name)]
    assert [len(dl) for dl in shards] == [2, 2]


def test_empty_dataset_raises_naming_it(names):
    name = names()
    DatasetCatalog.register(name, lambda: [{"file_name": "x.jpg", "image_id": 1, "height": 4, "width": 4, "annotations": []}])
    MetadataCatalog.get(name).set(thing_classes=["a"])
    with pytest.raises(ValueError, match=name):
        build_train_loader(_cfg(train=[name], SOLVER__IMS_PER_BATCH=1))


# ------------------------------------------------------------------------------------------- #
# Smoke dataset
# ------------------------------------------------------------------------------------------- #
def test_smoke_dataset_deterministic_and_exact(tmp_path):
    kw = dict(num_images={"train": 6, "val": 3}, image_size=(96, 128))
    a = make_smoke_dataset(tmp_path / "a", seed=0, **kw)
    b = make_smoke_dataset(tmp_path / "b", seed=0, **kw)
    c = make_smoke_dataset(tmp_path / "c", seed=1, **kw)
    for split in ("train", "val"):
        ja, jb = Path(a[split]["json_file"]).read_text(), Path(b[split]["json_file"]).read_text()
        assert ja == jb
        for f in sorted(Path(a[split]["image_root"]).iterdir()):
            assert f.read_bytes() == (Path(b[split]["image_root"]) / f.name).read_bytes()
    assert Path(c["train"]["json_file"]).read_text() != Path(a["train"]["json_file"]).read_text()
    assert Path(a["train"]["json_file"]).read_text() != Path(a["val"]["json_file"]).read_text()

    raw = json.loads(Path(a["train"]["json_file"]).read_text())
    assert [c["name"] for c in raw["categories"]] == ["circle", "square", "triangle"]
    per_img = {}
    for ann in raw["annotations"]:
        m = mask_util.decode(ann["segmentation"]).astype(bool)
        assert m.shape == (96, 128)
        assert int(m.sum()) == ann["area"] == int(mask_util.area(ann["segmentation"])) > 0
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        per_img.setdefault(ann["image_id"], []).append((ann["category_id"], m))
    assert all(1 <= len(v) <= 4 for v in per_img.values())
    for img_id, insts in per_img.items():
        stack = np.stack([m for _, m in insts])
        assert stack.sum(0).max() <= 1  # occluded parts removed: masks are disjoint
        # Each shape is painted with its class's dominant channel (circle R, square G,
        # triangle B) exactly where its mask is: checks image/mask alignment.
        bgr = cv2.imread(str(Path(a["train"]["image_root"]) / f"{img_id:06d}.jpg")).astype(np.float32)
        for cat, m in insts:
            inner = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            if inner.sum() < 20:
                continue
            mean = bgr[inner].mean(0)  # B, G, R
            assert int(np.argmax(mean)) == {1: 2, 2: 1, 3: 0}[cat]

    dicts = load_coco_json(a["train"]["json_file"], a["train"]["image_root"])
    assert len(dicts) == 6 and all(d["annotations"] for d in dicts)
    out = DatasetMapper(_cfg(INPUT__MIN_SIZE_TRAIN=(96,), INPUT__MAX_SIZE_TRAIN=1000), True)(dicts[0])
    exact = annotations_to_masks(dicts[0]["annotations"], 96, 128)
    got = out["instances"]["masks"].numpy()
    # No resize at this size: the mask is the original (possibly flipped).
    assert all(np.array_equal(g, e) or np.array_equal(g, e[:, ::-1]) for g, e in zip(got, exact))


def test_register_smoke_dataset_is_lazy(tmp_path, names):
    prefix = names("smk")
    root = tmp_path / "smoke"
    train, val = register_smoke_dataset(root, prefix=prefix)
    names_made = [train, val]
    try:
        assert not root.exists()
        assert MetadataCatalog.get(train).thing_classes == ["circle", "square", "triangle"]
        dicts = DatasetCatalog.get(val)
        assert root.is_dir() and len(dicts) == 32
        assert MetadataCatalog.get(val).json_file == str(root.resolve() / "annotations_val.json")
        register_smoke_dataset(root, prefix=prefix)  # same root: no-op
        with pytest.raises(ValueError):
            register_smoke_dataset(tmp_path / "elsewhere", prefix=prefix)
    finally:
        for n in names_made:
            if n in DatasetCatalog:
                DatasetCatalog.remove(n)
