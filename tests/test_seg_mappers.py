"""The data side of semantic and panoptic segmentation: the mappers (instseg/data/seg_mapper.py),
``build_mapper``, the datasets (instseg/data/cityscapes_seg.py, coco_panoptic.py), the empty
filter and ``resolve_num_classes`` for them, the ``--cityscapes-task`` flag.

Mapper targets are checked on a hand-made 8x12 label map (two stuff classes, two instances of one
thing class with ids above 65535, a crowd region, ignore pixels); the datasets on a copy of
``../shared/data/cityscapes-sample`` prepared once per module with ``datasets/prepare_cityscapes.py``
(skipped without the sample or cityscapesscripts).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from instseg.config import get_cfg
from instseg.data import (
    DatasetCatalog,
    DatasetError,
    DatasetMapper,
    ImageDecodeError,
    MetadataCatalog,
    PanopticDatasetMapper,
    SemanticDatasetMapper,
    build_mapper,
    get_dataset_dicts,
    register_coco_panoptic,
    resolve_num_classes,
    rgb2id,
)
from instseg.data.seg_mapper import CategoryAreaRandomCrop, SemSegMap
from instseg.data.transforms import RandomCrop, ResizeShortestEdge

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "cityscapes-sample"
CS19 = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle"]

# ----------------------------------------------------------------------------- hand-made sample
A_ID, B_ID, CROWD_ID = 70000, 2**24 - 1, 300  # two instances of class 5 (ids > 65535), a crowd


def _maps():
    """``(sem, ids)`` 8x12: stuff 0 (rows 0-3, id 1), stuff 1 (rows 4-7, id 2), thing 5: A rows 1-2
    cols 1-3, B rows 5-6 cols 8-10, crowd row 0 cols 10-11; ignore (255 / id 0) row 7 cols 0-1."""
    sem = np.zeros((8, 12), np.uint8)
    sem[4:] = 1
    ids = np.where(sem == 0, 1, 2).astype(np.int64)
    for (r0, r1, c0, c1), i in (((1, 3, 1, 4), A_ID), ((5, 7, 8, 11), B_ID), ((0, 1, 10, 12), CROWD_ID)):
        sem[r0:r1, c0:c1] = 5
        ids[r0:r1, c0:c1] = i
    sem[7, 0:2] = 255
    ids[7, 0:2] = 0
    return sem, ids


SEGMENTS = [  # segments_info order: not sorted by class
    {"id": 2, "category_id": 1, "iscrowd": 0},
    {"id": CROWD_ID, "category_id": 5, "iscrowd": 1},
    {"id": A_ID, "category_id": 5, "iscrowd": 0},
    {"id": 1, "category_id": 0, "iscrowd": 0},
    {"id": B_ID, "category_id": 5, "iscrowd": 0},
]


@pytest.fixture
def sample(tmp_path):
    sem, ids = _maps()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(sem).save(tmp_path / "sem.png")
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "pan.png")
    return {"file_name": str(tmp_path / "img.png"), "image_id": "img", "height": 8, "width": 12,
            "sem_seg_file_name": str(tmp_path / "sem.png"), "pan_seg_file_name": str(tmp_path / "pan.png"),
            "segments_info": [dict(s) for s in SEGMENTS]}


def _resize_flip():
    # 8x12 -> 16x24 (exact 2x nearest), then a certain horizontal flip
    return v2.Compose([ResizeShortestEdge([16], 1000), v2.RandomHorizontalFlip(p=1.0)])


def _big(a):
    return np.repeat(np.repeat(a, 2, 0), 2, 1)[:, ::-1]


def test_rgb2id_exact():
    rgb = np.array([[[255, 255, 255], [112, 17, 1], [0, 0, 0]]], np.uint8)
    assert rgb2id(rgb).tolist() == [[2**24 - 1, 112 + 17 * 256 + 65536, 0]]


def test_semantic_targets_exact_after_resize_and_flip(sample):
    out = SemanticDatasetMapper(augmentation=_resize_flip())(sample)
    sem, _ = _maps()
    exp = _big(sem.astype(np.int64))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 16, 24)
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (8, 12, sample["file_name"], "img")
    assert out["sem_seg"].dtype == torch.int64 and np.array_equal(out["sem_seg"].numpy(), exp)
    inst = out["instances"]
    assert inst["labels"].dtype == torch.int64 and inst["labels"].tolist() == [0, 1, 5]  # no 255
    assert inst["masks"].dtype == torch.bool and inst["masks"].shape == (3, 16, 24)
    for m, c in zip(inst["masks"].numpy(), [0, 1, 5]):
        assert np.array_equal(m, exp == c)
    # class 5 (A, B and the crowd region, flipped): x from 24-24=0 (crowd cols 10-11) to 24-2=22
    assert inst["boxes"].dtype == torch.float32
    assert inst["boxes"][2].tolist() == [0.0, 0.0, 22.0, 14.0]
    assert int(inst["masks"].sum()) == 16 * 24 - 4 * 2  # all but the 2x4 ignore pixels


def test_semantic_downscale_keeps_exact_values(sample):
    aug = v2.Compose([ResizeShortestEdge([5], 1000)])  # 8x12 -> 5x8: not an integer factor
    out = SemanticDatasetMapper(augmentation=aug)(sample)
    sem, _ = _maps()
    exp = torch.nn.functional.interpolate(torch.from_numpy(sem).float()[None, None], size=(5, 8), mode="nearest")
    assert np.array_equal(out["sem_seg"].numpy(), exp[0, 0].long().numpy())
    assert set(out["sem_seg"].unique().tolist()) <= {0, 1, 5, 255}
    for m, c in zip(out["instances"]["masks"], out["instances"]["labels"].tolist()):
        assert torch.equal(m, out["sem_seg"] == c)


def test_panoptic_targets_identities_crowd_and_big_ids(sample):
    out = PanopticDatasetMapper(augmentation=_resize_flip())(sample)
    sem, ids = _maps()
    inst = out["instances"]
    # segments_info order, crowd left out, the two class-5 instances kept apart
    assert inst["labels"].tolist() == [1, 5, 0, 5]
    big = _big(ids)
    for m, seg_id in zip(inst["masks"].numpy(), [2, A_ID, 1, B_ID]):
        assert m.any() and np.array_equal(m, big == seg_id)
    assert int(inst["masks"][1].sum()) == 2 * 3 * 4 and int(inst["masks"][3].sum()) == 2 * 3 * 4
    assert not (inst["masks"][1] & inst["masks"][3]).any()
    assert np.array_equal(out["sem_seg"].numpy(), _big(sem.astype(np.int64)))  # sem_seg_file_name given
    # A: rows 1-2 cols 1-3 -> rows 2-5, cols 2-7 -> flipped cols 16-21
    assert inst["boxes"][1].tolist() == [16.0, 2.0, 22.0, 6.0]


def test_panoptic_ids_above_65535_survive_downscale(sample):
    aug = ResizeShortestEdge([6], 1000)  # 8x12 -> 6x9
    mapper = PanopticDatasetMapper(augmentation=aug)
    out = mapper(sample)
    _, ids = _maps()
    exp = torch.nn.functional.interpolate(torch.from_numpy(ids).double()[None, None], size=(6, 9), mode="nearest")[0, 0]
    for m, seg_id in zip(out["instances"]["masks"], [2, A_ID, 1, B_ID]):
        assert torch.equal(m, exp == seg_id)
    assert out["instances"]["masks"][3].any()  # 2**24 - 1 still found


def test_panoptic_keeps_targets_emptied_by_crop(sample):
    # center 4x4 crop (rows 2-5, cols 4-7): A, B and the crowd are outside
    out = PanopticDatasetMapper(augmentation=v2.CenterCrop(4))(sample)
    inst = out["instances"]
    assert inst["labels"].tolist() == [1, 5, 0, 5]  # Mask2Former keeps empty targets
    assert inst["masks"].sum((1, 2)).tolist() == [8, 0, 8, 0]
    assert inst["boxes"][1].tolist() == [0.0, 0.0, 0.0, 0.0]
    sem_out = SemanticDatasetMapper(augmentation=v2.CenterCrop(4))(sample)
    assert sem_out["instances"]["labels"].tolist() == [0, 1]  # only the classes present


def test_panoptic_without_sem_seg_file(sample):
    d = {k: v for k, v in sample.items() if k != "sem_seg_file_name"}
    out = PanopticDatasetMapper(augmentation=v2.Identity())(d)
    assert "sem_seg" not in out and out["instances"]["labels"].tolist() == [1, 5, 0, 5]


def _cfg(**kw):
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 16
    cfg.INPUT.MAX_SIZE_TEST = 1000
    for k, v in kw.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, v)
    return cfg


@pytest.mark.parametrize("cls", [SemanticDatasetMapper, PanopticDatasetMapper])
def test_test_mode_passes_ground_truth_keys(sample, cls):
    out = cls(_cfg(), is_train=False)(sample)
    assert out["image"].shape == (3, 16, 24) and (out["height"], out["width"]) == (8, 12)
    assert out["sem_seg_file_name"] == sample["sem_seg_file_name"]
    assert out["pan_seg_file_name"] == sample["pan_seg_file_name"]
    assert out["segments_info"] == sample["segments_info"]
    assert "instances" not in out and "sem_seg" not in out
    d = {k: sample[k] for k in ("file_name", "image_id", "height", "width", "sem_seg_file_name")}
    assert "pan_seg_file_name" not in cls(_cfg(), is_train=False)(d)


def test_label_file_errors(sample, tmp_path):
    m = SemanticDatasetMapper(augmentation=v2.Identity())
    missing = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        m({**sample, "sem_seg_file_name": missing})
    bad = tmp_path / "bad.png"
    data = Path(sample["sem_seg_file_name"]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated PNG
    with pytest.raises(ImageDecodeError, match="bad.png"):
        m({**sample, "sem_seg_file_name": str(bad)})
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 12), np.uint8)).save(small)
    with pytest.raises(DatasetError, match=r"small\.png.*img\.png"):
        m({**sample, "sem_seg_file_name": str(small)})
    small_rgb = tmp_path / "small_rgb.png"
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(small_rgb)
    with pytest.raises(DatasetError, match=r"small_rgb\.png.*img\.png"):
        PanopticDatasetMapper(augmentation=v2.Identity())({**sample, "pan_seg_file_name": str(small_rgb)})
    with pytest.raises(DatasetError, match=r"small\.png: a panoptic PNG must be RGB"):
        PanopticDatasetMapper(augmentation=v2.Identity())({**sample, "pan_seg_file_name": str(small)})
    with pytest.raises(KeyError, match="sem_seg_file_name"):
        m({k: v for k, v in sample.items() if k != "sem_seg_file_name"})


def test_interpolating_augmentation_is_refused(sample):
    class Bilinear(v2.Transform):  # resizes masks bilinearly: new label values appear
        def _transform(self, inpt, params):
            x = inpt.as_subclass(torch.Tensor).float()[None]
            y = torch.nn.functional.interpolate(x, size=(5, 7), mode="bilinear")[0].round().to(inpt.dtype)
            return tv_tensors.wrap(y, like=inpt)

        def transform(self, inpt, params):
            return self._transform(inpt, params)

    with pytest.raises(RuntimeError, match="nearest"):
        SemanticDatasetMapper(augmentation=Bilinear())(sample)


# ----------------------------------------------------------------------------- crop constraint
class _ScriptedCrop(RandomCrop):
    """A RandomCrop whose windows come from a list (to test the retry rule exactly)."""

    def __init__(self, windows):
        super().__init__("absolute", [2, 2])
        self.windows, self.calls = list(windows), 0

    def make_params(self, flat_inputs):
        top, left, h, w = self.windows[min(self.calls, len(self.windows) - 1)]
        self.calls += 1
        return {"top": top, "left": left, "height": h, "width": w}


def _constraint_sample():
    sem = np.zeros((10, 10), np.int64)
    sem[:, 9] = 1          # column 9: class 1 (10% of a 10-wide window)
    sem[0, :] = 255        # row 0: ignore
    return {"image": torch.zeros(3, 10, 10, dtype=torch.uint8), "sem_seg": SemSegMap(torch.from_numpy(sem)[None])}


def test_category_area_constraint_retry_rule():
    single = (0, 0, 5, 5)       # class 0 + ignore only: one class -> rejected
    ninety = (1, 0, 9, 10)      # 81 px class 0, 9 px class 1: 90% -> rejected at max 0.9 (strict)
    mixed = (1, 5, 9, 5)        # 36 px class 0, 9 px class 1: 80% -> accepted
    crop = _ScriptedCrop([single, ninety, mixed, single])
    aug = CategoryAreaRandomCrop(crop, 0.9, ignore_label=255)
    out = aug(_constraint_sample())
    assert crop.calls == 3 and out["sem_seg"].shape == (1, 9, 5)
    crop = _ScriptedCrop([single] * 12)
    CategoryAreaRandomCrop(crop, 0.9, 255)(_constraint_sample())
    assert crop.calls == 10  # 10 tries, then the last one is used
    crop = _ScriptedCrop([ninety, mixed])
    CategoryAreaRandomCrop(crop, 0.95, 255)(_constraint_sample())
    assert crop.calls == 1  # 90% < 95%
    crop = _ScriptedCrop([single, mixed])
    CategoryAreaRandomCrop(crop, 1.0, 255)(_constraint_sample())
    assert crop.calls == 1  # 1.0: plain crop


def test_single_category_max_area_from_cfg(sample):
    kw = dict(INPUT__CROP__ENABLED=True, INPUT__CROP__PROB=1.0, INPUT__CROP__RESIZE_SHORT=[0],
              INPUT__CROP__TYPE="absolute", INPUT__CROP__SIZE=[3, 3], INPUT__MIN_SIZE_TRAIN=(0,),
              INPUT__RANDOM_FLIP="none")

    def mixed_fraction(max_area):
        mapper = SemanticDatasetMapper(_cfg(INPUT__CROP__SINGLE_CATEGORY_MAX_AREA=max_area, **kw))
        n = 0
        for seed in range(40):
            torch.manual_seed(seed)
            labels = mapper(sample)["instances"]["labels"]
            n += len(labels) > 1
        return n / 40

    plain = SemanticDatasetMapper(_cfg(**kw))
    assert not any(isinstance(t, CategoryAreaRandomCrop) for t in plain.augmentation.transforms[0].transforms[0].transforms)
    assert mixed_fraction(1.0) < 0.8
    assert mixed_fraction(0.75) == 1.0


# ----------------------------------------------------------------------------- build_mapper, filter, classes
def test_build_mapper_names():
    assert type(build_mapper(_cfg(), True)) is DatasetMapper
    assert isinstance(build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="mask_former_semantic"), True), SemanticDatasetMapper)
    m = build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="mask_former_panoptic"), False)
    assert isinstance(m, PanopticDatasetMapper) and not m.is_train
    with pytest.raises(ValueError, match=r"INPUT\.DATASET_MAPPER_NAME='bogus'.*'instance'.*'mask_former_semantic'.*'mask_former_panoptic'"):
        build_mapper(_cfg(INPUT__DATASET_MAPPER_NAME="bogus"), True)


def test_loaders_use_build_mapper(sample):
    from instseg.data import build_test_loader

    DatasetCatalog.register("test_seg_one", lambda: [dict(sample)])
    try:
        cfg = _cfg(INPUT__DATASET_MAPPER_NAME="mask_former_semantic")
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.DATALOADER.CHECK_FILES = False
        batch = next(iter(build_test_loader(cfg, "test_seg_one")))
        assert batch[0]["sem_seg_file_name"] == sample["sem_seg_file_name"]
    finally:
        DatasetCatalog.remove("test_seg_one")


def test_empty_filter_semantic_and_panoptic():
    dicts = [
        {"file_name": "inst_crowd_only", "annotations": [{"iscrowd": 1}]},
        {"file_name": "inst", "annotations": [{"iscrowd": 0}]},
        {"file_name": "inst_empty_with_segments", "annotations": [], "segments_info": [{"id": 1, "iscrowd": 0}]},
        {"file_name": "pan", "segments_info": [{"id": 1, "iscrowd": 1}, {"id": 2, "iscrowd": 0}]},
        {"file_name": "pan_crowd_only", "segments_info": [{"id": 1, "iscrowd": 1}]},
        {"file_name": "pan_empty", "segments_info": []},
        {"file_name": "sem", "sem_seg_file_name": "x.png"},
        {"file_name": "nothing"},
    ]
    DatasetCatalog.register("test_seg_filter", lambda: [dict(d) for d in dicts])
    try:
        kept = [d["file_name"] for d in get_dataset_dicts(["test_seg_filter"], filter_empty=True)]
    finally:
        DatasetCatalog.remove("test_seg_filter")
    assert kept == ["inst", "pan", "sem"]


def test_resolve_num_classes_segmentation_datasets():
    for name, n in [("cityscapes_fine_sem_seg_train", 19), ("cityscapes_fine_panoptic_val", 19),
                    ("coco_2017_train_panoptic", 133), ("cityscapes_fine_instance_seg_train", 8), ("coco_2017_train", 80)]:
        cfg = get_cfg()
        cfg.DATASETS.TRAIN = (name,)
        cfg.MODEL.NUM_CLASSES = -1
        assert resolve_num_classes(cfg) == n, name
        assert cfg.MODEL.NUM_CLASSES == n
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("cityscapes_fine_sem_seg_train",)
    cfg.DATASETS.TEST = ("cityscapes_fine_panoptic_val",)
    cfg.MODEL.NUM_CLASSES = 8
    with pytest.raises(ValueError, match="19"):
        resolve_num_classes(cfg)


def test_builtin_names_and_metadata():
    from instseg.data import datasets_root

    root = datasets_root()
    for split in ("train", "val"):
        m = MetadataCatalog.get(f"cityscapes_fine_sem_seg_{split}")
        assert m.evaluator_type == "cityscapes_sem_seg" and m.stuff_classes == CS19 and m.ignore_label == 255
        assert m.image_dir == f"{root}/cityscapes/leftImg8bit/{split}" and m.gt_dir == f"{root}/cityscapes/gtFine/{split}"
        assert len(m.stuff_colors) == 19 and tuple(m.stuff_colors[0]) == (128, 64, 128)
        p = MetadataCatalog.get(f"cityscapes_fine_panoptic_{split}")
        assert p.evaluator_type == "cityscapes_panoptic_seg" and p.thing_classes == CS19 and p.stuff_classes == CS19
        assert p.thing_dataset_id_to_contiguous_id == {24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
        assert p.stuff_dataset_id_to_contiguous_id == {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                                                       21: 8, 22: 9, 23: 10}
        assert (p.ignore_label, p.label_divisor) == (255, 1000)
        assert p.panoptic_root == f"{root}/cityscapes/gtFine/cityscapes_panoptic_{split}"
        assert p.panoptic_json == f"{root}/cityscapes/gtFine/cityscapes_panoptic_{split}.json"
        assert p.gt_dir == f"{root}/cityscapes/gtFine/{split}" and p.image_dir == f"{root}/cityscapes/leftImg8bit/{split}"
        c = MetadataCatalog.get(f"coco_2017_{split}_panoptic")
        assert c.evaluator_type == "coco_panoptic_seg" and len(c.stuff_classes) == 133 and c.thing_classes == c.stuff_classes
        assert c.panoptic_json == f"{root}/coco/panoptic_{split}2017.json"
        assert c.panoptic_root == f"{root}/coco/panoptic_{split}2017" and c.image_root == f"{root}/coco/{split}2017"
        assert len(c.thing_dataset_id_to_contiguous_id) == 80 and len(c.stuff_dataset_id_to_contiguous_id) == 53
        assert c.thing_dataset_id_to_contiguous_id[90] == 79 and c.stuff_dataset_id_to_contiguous_id[92] == 80
        assert c.stuff_dataset_id_to_contiguous_id[200] == 132 and c.stuff_classes[132] == "rug-merged"
        assert (c.ignore_label, c.label_divisor) == (255, 1000)


def test_coco_panoptic_json(tmp_path, sample):
    (tmp_path / "images").mkdir()
    (tmp_path / "pan").mkdir()
    shutil.copy(sample["file_name"], tmp_path / "images" / "000000000007.png")
    shutil.copy(sample["pan_seg_file_name"], tmp_path / "pan" / "000000000007.png")
    cats = [{"id": 200, "name": "rug-merged", "isthing": 0}, {"id": 3, "name": "car", "isthing": 1},
            {"id": 92, "name": "banner", "isthing": 0}, {"id": 1, "name": "person", "isthing": 1}]
    raw_cat = {1: 92, 0: 200, 5: 3}  # the sample's contiguous classes -> dataset ids
    segs = [{**s, "category_id": raw_cat[s["category_id"]]} for s in SEGMENTS]
    js = tmp_path / "panoptic.json"
    register_coco_panoptic("test_coco_pan", tmp_path / "images", tmp_path / "pan", js)  # json not there yet
    try:
        js.write_text(json.dumps({
            "images": [{"id": 7, "file_name": "000000000007.png", "height": 8, "width": 12}],
            "annotations": [{"image_id": 7, "file_name": "000000000007.png", "segments_info": segs}],
            "categories": cats}))
        meta = MetadataCatalog.get("test_coco_pan")
        assert meta.stuff_classes == ["person", "car", "banner", "rug-merged"] == meta.thing_classes
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
        assert meta.stuff_dataset_id_to_contiguous_id == {92: 2, 200: 3}
        assert meta.evaluator_type == "coco_panoptic_seg"
        (d,) = DatasetCatalog.get("test_coco_pan")
        assert d["file_name"] == str(tmp_path / "images" / "000000000007.png") and d["image_id"] == 7
        assert d["pan_seg_file_name"] == str(tmp_path / "pan" / "000000000007.png") and (d["height"], d["width"]) == (8, 12)
        assert [s["category_id"] for s in d["segments_info"]] == [2, 1, 1, 3, 1]
        assert [s["isthing"] for s in d["segments_info"]] == [False, True, True, False, True]
        out = PanopticDatasetMapper(augmentation=v2.Identity())(d)
        assert out["instances"]["labels"].tolist() == [2, 1, 3, 1] and "sem_seg" not in out
        _, ids = _maps()
        assert torch.equal(out["instances"]["masks"][3], torch.from_numpy(ids == B_ID))
    finally:
        DatasetCatalog.remove("test_coco_pan")
        MetadataCatalog.remove("test_coco_pan")


# ----------------------------------------------------------------------------- Cityscapes sample
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A copy of cityscapes-sample after ``datasets/prepare_cityscapes.py`` (once per module)."""
    pytest.importorskip("cityscapesscripts")
    if not (SAMPLE / "gtFine").is_dir():
        pytest.skip(f"cityscapes-sample not found at {SAMPLE}")
    root = tmp_path_factory.mktemp("cs_seg") / "cityscapes"
    shutil.copytree(SAMPLE, root)
    subprocess.run([sys.executable, str(REPO / "datasets" / "prepare_cityscapes.py"), str(root), "--workers", "2"],
                   check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def registered(prepared):
    from instseg.data import register_cityscapes_panoptic, register_cityscapes_sem_seg

    names = {}
    for split in ("train", "val"):
        image_dir, gt_dir = str(prepared / "leftImg8bit" / split), str(prepared / "gtFine" / split)
        register_cityscapes_sem_seg(f"test_cs_sem_{split}", image_dir, gt_dir)
        register_cityscapes_panoptic(f"test_cs_pan_{split}", image_dir, gt_dir,
                                     str(prepared / "gtFine" / f"cityscapes_panoptic_{split}"),
                                     str(prepared / "gtFine" / f"cityscapes_panoptic_{split}.json"))
        names[split] = (f"test_cs_sem_{split}", f"test_cs_pan_{split}")
    return names


@pytest.mark.parametrize("split,n", [("train", 55), ("val", 17)])
def test_cityscapes_dicts_and_metadata(prepared, registered, split, n):
    sem_name, pan_name = registered[split]
    sem = DatasetCatalog.get(sem_name)
    pan = DatasetCatalog.get(pan_name)
    assert len(sem) == len(pan) == n
    assert MetadataCatalog.get(sem_name).stuff_classes == CS19
    assert MetadataCatalog.get(pan_name).stuff_classes == CS19
    d = sem[0]
    assert set(d) == {"file_name", "sem_seg_file_name", "height", "width", "image_id"}
    assert d["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png") and Path(d["sem_seg_file_name"]).is_file()
    with Image.open(d["file_name"]) as im:
        assert im.size == (d["width"], d["height"])
    gt = json.loads((prepared / "gtFine" / f"cityscapes_panoptic_{split}.json").read_text())
    assert [a["image_id"] for a in gt["annotations"]] == [p["image_id"] for p in pan]
    assert sorted(p["image_id"] for p in pan) == sorted(s["image_id"] for s in sem)
    by_id = {a["image_id"]: a for a in gt["annotations"]}
    meta = MetadataCatalog.get(pan_name)
    to_train = {**meta.thing_dataset_id_to_contiguous_id, **meta.stuff_dataset_id_to_contiguous_id}
    for p in pan:
        assert p["image_id"] == "_".join(Path(p["file_name"]).name.split("_")[:3])
        assert [s["category_id"] for s in p["segments_info"]] == [
            to_train[s["category_id"]] for s in by_id[p["image_id"]]["segments_info"]]
        assert Path(p["pan_seg_file_name"]).is_file() and p["sem_seg_file_name"].endswith("_labelTrainIds.png")
    assert get_dataset_dicts([sem_name], filter_empty=True) == sem  # semantic dicts are never filtered


def test_cityscapes_mappers_on_real_images(registered):
    sem_name, pan_name = registered["val"]
    sem_d = DatasetCatalog.get(sem_name)[0]
    pan_d = DatasetCatalog.get(pan_name)[0]
    aug = v2.Compose([ResizeShortestEdge([200], 1000), v2.RandomHorizontalFlip(p=1.0)])
    out = SemanticDatasetMapper(augmentation=aug)(sem_d)
    present = sorted(set(np.unique(np.asarray(Image.open(sem_d["sem_seg_file_name"])))) - {255})
    assert out["instances"]["labels"].tolist() == present
    assert all(0 <= c < 19 for c in present)
    pout = PanopticDatasetMapper(augmentation=v2.Identity())(pan_d)
    segs = [s for s in pan_d["segments_info"] if not s["iscrowd"]]
    assert pout["instances"]["labels"].tolist() == [s["category_id"] for s in segs]
    ids = rgb2id(np.asarray(Image.open(pan_d["pan_seg_file_name"]).convert("RGB")))
    for m, s in zip(pout["instances"]["masks"].numpy(), segs):
        assert np.array_equal(m, ids == s["id"]) and int(m.sum()) == s["area"]


def test_cityscapes_missing_prepared_files(tmp_path):
    from instseg.data.cityscapes import CityscapesLayoutError
    from instseg.data.cityscapes_seg import load_cityscapes_panoptic, load_cityscapes_semantic

    if not (SAMPLE / "gtFine").is_dir():
        pytest.skip(f"cityscapes-sample not found at {SAMPLE}")
    pytest.importorskip("cityscapesscripts")
    left, gt = SAMPLE / "leftImg8bit" / "val", SAMPLE / "gtFine" / "val"  # only read: has no labelTrainIds
    with pytest.raises(CityscapesLayoutError, match=r"_gtFine_labelTrainIds\.png not found.*prepare_cityscapes\.py"):
        load_cityscapes_semantic(left, gt)
    with pytest.raises(CityscapesLayoutError, match=r"panoptic json not found: .*cityscapes_panoptic_val\.json; run .*prepare_cityscapes\.py"):
        load_cityscapes_panoptic(left, gt, tmp_path / "cityscapes_panoptic_val", tmp_path / "cityscapes_panoptic_val.json")
    with pytest.raises(CityscapesLayoutError, match=str(tmp_path / "nope")):
        load_cityscapes_semantic(tmp_path / "nope", gt)


def test_cli_cityscapes_task(prepared):
    from instseg.utils.cli import default_argument_parser, register_cli_datasets

    split = [str(prepared / "leftImg8bit" / "val"), str(prepared / "gtFine" / "val")]
    for task, etype in (("semantic", "cityscapes_sem_seg"), ("panoptic", "cityscapes_panoptic_seg")):
        args = default_argument_parser().parse_args(["--cityscapes", f"test_cli_{task}", *split, "--cityscapes-task", task])
        assert register_cli_datasets(args) == [f"test_cli_{task}"]
        assert MetadataCatalog.get(f"test_cli_{task}").evaluator_type == etype
        assert len(DatasetCatalog.get(f"test_cli_{task}")) == 17
    assert MetadataCatalog.get("test_cli_panoptic").panoptic_json == str(prepared / "gtFine" / "cityscapes_panoptic_val.json")
    assert default_argument_parser().parse_args([]).cityscapes_task == "instance"


# ----------------------------------------------------------------------------- training (FastInst)
def _train_fastinst(prepared, config, tmp_path, test_sets="()", iters=12):
    import csv
    import os

    args = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(REPO / "configs" / "fastinst" / config),
        "DATASETS.TEST", test_sets, "MODEL.RESNETS.NORM", "BN", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()", "SOLVER.BASE_LR", "0.0002", "SOLVER.WARMUP_ITERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "176", "INPUT.CROP.ENABLED", "False",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "176",
        "MODEL.FASTINST.NUM_OBJECT_QUERIES", "50", "MODEL.FASTINST.TRAIN_NUM_POINTS", "3136",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "3", "LOG_PERIOD", "1", "OUTPUT_DIR", str(tmp_path),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), INSTSEG_DATASETS=str(prepared.parent))
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for f in sorted((tmp_path / "csv").glob("version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    losses = {int(r["step"]): float(r["train/total_loss"]) for r in rows if r.get("train/total_loss")}
    steps = sorted(losses)
    assert len(steps) == iters
    first3 = sum(losses[s] for s in steps[:3]) / 3
    last3 = sum(losses[s] for s in steps[-3:]) / 3
    assert last3 < 0.7 * losses[steps[0]] and last3 < first3, (losses[steps[0]], first3, last3)
    return tmp_path


@pytest.mark.slow
def test_fastinst_panoptic_training_loss_falls_and_evaluates(prepared, tmp_path):
    """The Table V panoptic config (19 classes, panoptic mapper, three tasks at test time) on the
    prepared sample at 128 px: the loss falls in 12 iterations and the in-loop evaluation on val
    writes PQ/SQ/RQ (all, things, stuff), mIoU and Cityscapes AP."""
    import json

    out = _train_fastinst(prepared, "R50_D3_cityscapes_panoptic.yaml", tmp_path,
                          test_sets="('cityscapes_fine_panoptic_val',)")
    res = json.loads((out / "metrics.json").read_text())["cityscapes_fine_panoptic_val"]
    assert set(res) == {"panoptic_seg", "sem_seg", "segm"}
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert 0.0 <= res["panoptic_seg"][k] <= 100.0, (k, res["panoptic_seg"])
    assert 0.0 <= res["sem_seg"]["mIoU"] <= 100.0 and "IoU-building" in res["sem_seg"]


@pytest.mark.slow
def test_fastinst_semantic_training_loss_falls(prepared, tmp_path):
    _train_fastinst(prepared, "R50_D3_cityscapes_semantic.yaml", tmp_path)
