"""Cityscapes: the loader (instseg/data/cityscapes.py), the official-evaluation wrapper
(instseg/evaluation/cityscapes_evaluation.py), the NumPy shim (cityscapes_compat.py), the CLI flag,
the evaluator choice and the Cityscapes configs.

Data tests run on a copy of ``../shared/data/cityscapes-sample`` (72 coco128 photographs in the
Cityscapes layout; train 55 images / 238 instances, val 17 / 95) and skip without it.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cityscapesscripts")

from instseg.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from instseg.data.cityscapes import (  # noqa: E402
    CityscapesLabelError,
    CityscapesLayoutError,
    cityscapes_instance_metadata,
    load_cityscapes_instances,
    register_cityscapes_instances,
)
from instseg.evaluation import CityscapesInstanceEvaluator  # noqa: E402
from instseg.evaluation import cityscapes_compat  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory) -> Path:
    """A writable copy of the cityscapes-sample (``leftImg8bit/``, ``gtFine/``)."""
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "cityscapes-sample"
    if not (src / "gtFine").is_dir():
        pytest.skip(f"cityscapes-sample not found at {src}")
    dst = tmp_path_factory.mktemp("cs") / "cityscapes"
    shutil.copytree(src, dst)
    return dst


def _split(root: Path, split: str):
    return str(root / "leftImg8bit" / split), str(root / "gtFine" / split)


@pytest.fixture(scope="module")
def val_dicts(cs_root):
    return load_cityscapes_instances(*_split(cs_root, "val"), num_workers=0)


def _decode(anno) -> np.ndarray:
    from pycocotools import mask as mask_util

    return mask_util.decode(anno["segmentation"]).astype(bool)


# ----------------------------------------------------------------------------- metadata, loader
def test_metadata_is_cityscapesscripts_order():
    from cityscapesscripts.helpers.labels import name2label

    meta = cityscapes_instance_metadata()
    assert meta["thing_classes"] == CLASSES
    assert meta["thing_dataset_id_to_contiguous_id"] == {24: 0, 25: 1, 26: 2, 27: 3, 28: 4, 31: 5, 32: 6, 33: 7}
    assert meta["thing_colors"] == [tuple(name2label[c].color) for c in CLASSES]


def test_builtin_names_registered_with_evaluator_type():
    for split in ("train", "val", "test"):
        name = f"cityscapes_fine_instance_seg_{split}"
        assert name in DatasetCatalog
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "cityscapes_instance"
        assert meta.thing_classes == CLASSES
        assert meta.gt_dir.endswith(os.path.join("cityscapes", "gtFine", split))


@pytest.mark.parametrize("split,n_images,n_instances", [("train", 55, 238), ("val", 17, 95)])
def test_counts_and_masks_equal_instance_png(cs_root, split, n_images, n_instances):
    # num_workers=2: the process pool (the default for the 2,975 training files)
    dicts = load_cityscapes_instances(*_split(cs_root, split), num_workers=2)
    assert len(dicts) == n_images
    assert sum(len(d["annotations"]) for d in dicts) == n_instances
    for d in dicts:
        inst = np.asarray(Image.open(d["gt_file"]))
        assert inst.shape == (d["height"], d["width"])
        assert d["image_id"] == os.path.basename(d["file_name"])
        ids = sorted(int(v) for v in np.unique(inst) if v >= 1000)
        assert sorted(a["id"] for a in d["annotations"]) == ids
        for a in d["annotations"]:
            mask = _decode(a)
            assert np.array_equal(mask, inst == a["id"]), (d["file_name"], a["id"])
            assert a["category_id"] == cityscapes_instance_metadata()["thing_dataset_id_to_contiguous_id"][a["id"] // 1000]
            ys, xs = np.nonzero(mask)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["iscrowd"] == 0 and a["bbox_mode"] == "XYWH_ABS"


def test_pool_equals_serial(cs_root, val_dicts):
    assert load_cityscapes_instances(*_split(cs_root, "val"), num_workers=3) == val_dicts


def test_from_json_same_instances_close_masks(cs_root, val_dicts):
    """The json path draws with cityscapesscripts' createInstanceImage: same instances and ids; the
    masks differ from the sample's PNGs only at boundaries (rasterizer), see docs/cityscapes.md."""
    dj = load_cityscapes_instances(*_split(cs_root, "val"), from_json=True, num_workers=0)
    inter = union = 0
    for a_img, b_img in zip(val_dicts, dj):
        assert [a["id"] for a in a_img["annotations"]] == [b["id"] for b in b_img["annotations"]]
        for a, b in zip(a_img["annotations"], b_img["annotations"]):
            ma, mb = _decode(a), _decode(b)
            assert (ma & mb).sum() / (ma | mb).sum() > 0.5  # tiny instances: a few pixels differ
            inter, union = inter + (ma & mb).sum(), union + (ma | mb).sum()
    assert 0.98 < inter / union < 1.0  # measured 0.991: boundary pixels only, but not identical


def _write_image(root: Path, split: str, city: str, stem: str, objects, size=(40, 60), write_png=True):
    h, w = size
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(img_dir / f"{stem}_leftImg8bit.png")
    with open(gt_dir / f"{stem}_gtFine_polygons.json", "w") as f:
        json.dump({"imgHeight": h, "imgWidth": w, "objects": objects}, f)
    if write_png:
        Image.fromarray(np.zeros((h, w), np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")


def test_json_occlusion_later_object_on_top(tmp_path):
    """Polygons are drawn in file order: the second car covers the first where they overlap."""
    sq = lambda x0, y0, x1, y1: [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]  # noqa: E731
    objs = [{"label": "car", "polygon": sq(5, 5, 30, 30)}, {"label": "car", "polygon": sq(20, 10, 50, 35)},
            {"label": "sky", "polygon": sq(0, 0, 3, 3)}, {"label": "cargroup", "polygon": sq(52, 30, 58, 38)}]
    _write_image(tmp_path, "train", "aachen", "aachen_000000_000001", objs)
    (d,) = load_cityscapes_instances(tmp_path / "leftImg8bit/train", tmp_path / "gtFine/train", from_json=True)
    by_id = {a["id"]: a for a in d["annotations"]}
    assert sorted(by_id) == [26, 26000, 26001]  # the group has the plain label id
    first, second = _decode(by_id[26000]), _decode(by_id[26001])
    assert not (first & second).any()
    assert second[20, 25] and not first[20, 25]  # overlap -> the later object
    assert first[10, 10]
    assert by_id[26]["iscrowd"] == 1 and by_id[26000]["iscrowd"] == 0


# ----------------------------------------------------------------------------- bad layouts
def test_no_city_folders_names_folder(tmp_path):
    d = tmp_path / "leftImg8bit" / "train"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "x_000000_000001_leftImg8bit.png")
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(CityscapesLayoutError, match=f"{d}: no city folders"):
        load_cityscapes_instances(d, tmp_path / "gtFine" / "train")


def test_image_without_gtfine_names_folder(cs_root, tmp_path):
    root = tmp_path / "cs"
    shutil.copytree(cs_root / "leftImg8bit" / "val", root / "leftImg8bit" / "val")
    shutil.copytree(cs_root / "gtFine" / "val", root / "gtFine" / "val")
    victim = sorted(glob.glob(str(root / "gtFine/val/coco128/*_gtFine_instanceIds.png")))[3]
    os.remove(victim)
    gt_city = str(root / "gtFine" / "val" / "coco128")
    stem = os.path.basename(victim)[: -len("_gtFine_instanceIds.png")]
    with pytest.raises(CityscapesLayoutError) as e:
        load_cityscapes_instances(*_split(root, "val"), num_workers=0)
    msg = str(e.value)
    assert msg.startswith(gt_city + ":") and f"{stem}_leftImg8bit.png" in msg and os.path.basename(victim) in msg
    # the json path needs the json only, so it still loads
    assert len(load_cityscapes_instances(*_split(root, "val"), from_json=True, num_workers=0)) == 17


def test_missing_gt_city_folder(tmp_path):
    _write_image(tmp_path, "val", "bonn", "bonn_000000_000001", [])
    shutil.rmtree(tmp_path / "gtFine" / "val" / "bonn")
    with pytest.raises(CityscapesLayoutError, match="gtFine/val/bonn: ground-truth folder of city 'bonn' not found"):
        load_cityscapes_instances(tmp_path / "leftImg8bit/val", tmp_path / "gtFine/val")


def test_unknown_label_names_file(tmp_path):
    _write_image(tmp_path, "val", "bonn", "bonn_000000_000001",
                 [{"label": "car", "polygon": [[1, 1], [9, 1], [9, 9]]},
                  {"label": "spaceship", "polygon": [[1, 1], [9, 1], [9, 9]]}])
    js = tmp_path / "gtFine/val/bonn/bonn_000000_000001_gtFine_polygons.json"
    with pytest.raises(CityscapesLabelError, match=f"{js}: object #1 has the unknown label 'spaceship'"):
        load_cityscapes_instances(tmp_path / "leftImg8bit/val", tmp_path / "gtFine/val", from_json=True)


def test_unknown_label_id_in_png_names_file(tmp_path):
    _write_image(tmp_path, "val", "bonn", "bonn_000000_000001", [])
    png = tmp_path / "gtFine/val/bonn/bonn_000000_000001_gtFine_instanceIds.png"
    arr = np.zeros((40, 60), np.uint16)
    arr[:5, :5] = 60000
    Image.fromarray(arr).save(png)
    with pytest.raises(CityscapesLabelError, match=f"{png}: pixel value 60000 has the unknown label id 60"):
        load_cityscapes_instances(tmp_path / "leftImg8bit/val", tmp_path / "gtFine/val")


# ----------------------------------------------------------------------------- evaluator
def _gt_outputs(dicts, drop=None, erode=0, seed=0):
    """Ground truth as model outputs; ``drop``: fraction of instances left out; ``erode``: pixels."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    batches = []
    for d in dicts:
        anns = [a for a in d["annotations"] if not a["iscrowd"]]
        if drop:
            anns = [a for a in anns if rng.random() >= drop]
        masks = [_decode(a) for a in anns]
        if erode:
            masks = [ndimage.binary_erosion(m, iterations=erode) if k % 2 == 0 else m for k, m in enumerate(masks)]
        m = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, d["height"], d["width"], dtype=torch.bool)
        out = {"scores": torch.from_numpy(rng.uniform(0.05, 1.0, len(anns))).float(),
               "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64), "masks": m}
        batches.append(({"file_name": d["file_name"], "height": d["height"], "width": d["width"]}, out))
    return batches


def _evaluate(name_or_gt, batches, **kw):
    ev = CityscapesInstanceEvaluator(name_or_gt, **kw) if isinstance(name_or_gt, str) and name_or_gt in DatasetCatalog \
        else CityscapesInstanceEvaluator(gt_dir=name_or_gt, **kw)
    ev.reset()
    for inp, out in batches:
        ev.process([inp], [out])
    return ev.evaluate()["segm"]


def test_ground_truth_as_predictions_gives_100(cs_root, val_dicts, tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    register_cityscapes_instances("test_cs_val_copy", *_split(cs_root, "val"))
    res = _evaluate("test_cs_val_copy", _gt_outputs(val_dicts), output_dir=str(tmp_path))
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    for c in ("person", "car", "truck", "bus", "motorcycle", "bicycle"):
        assert res[f"AP-{c}"] == pytest.approx(100.0)
    assert np.isnan(res["AP-rider"]) and np.isnan(res["AP-train"])  # none in val
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["segm"]["AP"] == pytest.approx(100.0) and saved["segm"]["AP-rider"] is None
    assert os.listdir(tmp_path / "cwd") == []  # cityscapesscripts' matches.json not left in the working dir


def _reference_ap(batches, gt_dir, work, monkeypatch):
    """cityscapesscripts called directly on a submission written here (own in1d/json patches)."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval
    from cityscapesscripts.helpers.labels import name2label

    sub = work / "sub"
    sub.mkdir()
    preds, gts = [], []
    for inp, out in batches:
        stem = os.path.basename(inp["file_name"])[: -len("_leftImg8bit.png")]
        lines = []
        for k in range(len(out["scores"])):
            fn = f"{stem}_{k}.png"
            Image.fromarray(out["masks"][k].numpy().astype(np.uint8) * 255).save(sub / fn)
            lines.append(f"{fn} {name2label[CLASSES[int(out['labels'][k])]].id} {float(out['scores'][k])}\n")
        (sub / f"{stem}_pred.txt").write_text("".join(lines))
        preds.append(str(sub / f"{stem}_pred.txt"))
        gts.append(os.path.join(gt_dir, "coco128", f"{stem}_gtFine_instanceIds.png"))
    monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(np.ravel(a), b, invert=invert), raising=False)
    monkeypatch.setattr(cs_eval, "writeDict2JSON", lambda d, f: None)
    monkeypatch.chdir(work)
    args = copy.copy(cs_eval.args)
    args.predictionPath, args.predictionWalk = str(sub), None
    args.gtInstancesFile = str(work / "gtInstances.json")
    args.JSONOutput, args.quiet, args.colorized = False, True, False
    res = cs_eval.evaluateImgLists(preds, gts, args)["averages"]
    return res["allAp"] * 100, res["allAp50%"] * 100, {c: res["classes"][c]["ap"] * 100 for c in CLASSES}


def test_perturbed_submission_same_ap_as_cityscapesscripts(cs_root, val_dicts, tmp_path, monkeypatch):
    batches = _gt_outputs(val_dicts, drop=0.3, erode=2, seed=1)
    gt_dir = _split(cs_root, "val")[1]
    ours = _evaluate(gt_dir, batches)
    ap, ap50, per_class = _reference_ap(batches, gt_dir, tmp_path, monkeypatch)
    assert 20 < ours["AP"] < 90  # really perturbed
    assert ours["AP"] == pytest.approx(ap, abs=1e-9) and ours["AP50"] == pytest.approx(ap50, abs=1e-9)
    for c in CLASSES:
        assert ours[f"AP-{c}"] == pytest.approx(per_class[c], abs=1e-9, nan_ok=True)


def test_evaluator_checks_inputs(cs_root, val_dicts):
    ev = CityscapesInstanceEvaluator(gt_dir=_split(cs_root, "val")[1], max_dets_per_image=2)
    d = val_dicts[0]
    inp = {"file_name": d["file_name"], "height": d["height"], "width": d["width"]}
    m = torch.zeros(3, d["height"], d["width"], dtype=torch.bool)
    with pytest.raises(ValueError, match="masks must be bool"):
        ev.process([inp], [{"scores": torch.ones(3), "labels": torch.zeros(3, dtype=torch.long), "masks": m.float()}])
    with pytest.raises(ValueError, match="expected the original size"):
        ev.process([inp], [{"scores": torch.ones(3), "labels": torch.zeros(3, dtype=torch.long), "masks": m[:, 1:]}])
    with pytest.raises(ValueError, match=r"labels \[8\] outside 0..7"):
        ev.process([inp], [{"scores": torch.ones(3), "labels": torch.full((3,), 8), "masks": m}])
    ev.process([inp], [{"scores": torch.tensor([0.1, 0.9, 0.5]), "labels": torch.zeros(3, dtype=torch.long),
                        "masks": m}])
    assert [s for _, s, _ in ev._predictions[0]["instances"]] == pytest.approx([0.9, 0.5])  # top 2 kept


def test_make_evaluator_follows_evaluator_type(cs_root, coco128):
    from instseg.config import get_cfg
    from instseg.data import register_coco_instances
    from instseg.engine.module import InstSegModule
    from instseg.evaluation import COCOEvaluator

    register_cityscapes_instances("test_cs_val_copy", *_split(cs_root, "val"))
    register_coco_instances("test_cs_coco128_tiny8", str(coco128 / "annotations_tiny8.json"), str(coco128 / "images"))
    fake = types.SimpleNamespace(cfg=get_cfg(), per_category=False)
    assert isinstance(InstSegModule._make_evaluator(fake, "test_cs_val_copy"), CityscapesInstanceEvaluator)
    assert isinstance(InstSegModule._make_evaluator(fake, "test_cs_coco128_tiny8"), COCOEvaluator)


def test_cli_cityscapes_flag(cs_root):
    from instseg.utils.cli import default_argument_parser, register_cli_datasets

    args = default_argument_parser().parse_args(["--cityscapes", "test_cs_cli", *_split(cs_root, "val")])
    assert register_cli_datasets(args) == ["test_cs_cli"]
    assert MetadataCatalog.get("test_cs_cli").evaluator_type == "cityscapes_instance"
    assert len(DatasetCatalog.get("test_cs_cli")) == 17
    bad = default_argument_parser().parse_args(["--cityscapes", "x", "/nonexistent/left", "/nonexistent/gt"])
    with pytest.raises(FileNotFoundError, match="--cityscapes x: IMAGE_DIR not found: /nonexistent/left"):
        register_cli_datasets(bad)


# ----------------------------------------------------------------------------- NumPy shim
def test_in1d_matches_old_semantics():
    a = np.array([[1, 5], [7, 2]])
    assert cityscapes_compat.in1d(a, [2, 7]).tolist() == [False, False, True, True]  # flattened, as np.in1d
    assert cityscapes_compat.in1d(a, [2, 7], invert=True).tolist() == [True, True, False, False]


def test_numpy_proxy_and_json_default():
    proxy = cityscapes_compat.numpy_proxy()
    assert proxy.isin is np.isin and proxy.count_nonzero is np.count_nonzero
    assert callable(proxy.in1d)
    data = {"a": np.int64(3), "b": np.float32(0.5), "c": np.bool_(True), "d": np.arange(3),
            "e": types.SimpleNamespace(x=np.uint16(7))}
    assert json.loads(json.dumps(data, default=cityscapes_compat.json_default)) == \
        {"a": 3, "b": 0.5, "c": True, "d": [0, 1, 2], "e": {"x": 7}}
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        json.dumps({"s": {1}}, default=cityscapes_compat.json_default)


def test_write_dict_to_json_relative_path_under_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    cityscapes_compat.write_dict_to_json({"n": np.int64(2)}, "matches.json", base_dir=str(tmp_path / "w"))
    assert not (tmp_path / "matches.json").exists()
    assert json.load(open(tmp_path / "w" / "matches.json")) == {"n": 2}


def test_patch_is_local_and_restored(tmp_path):
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    had_in1d = hasattr(np, "in1d")
    before = (cs_eval.np, cs_eval.writeDict2JSON)
    with cityscapes_compat.patched_instance_evaluation(str(tmp_path)) as mod:
        assert mod is cs_eval and hasattr(mod.np, "in1d") and mod.np is not np
        mod.writeDict2JSON({"k": np.int64(1)}, "matches.json")
        assert json.load(open(tmp_path / "matches.json")) == {"k": 1}
    assert (cs_eval.np, cs_eval.writeDict2JSON) == before
    assert hasattr(np, "in1d") == had_in1d  # numpy itself untouched


@pytest.mark.skipif(hasattr(np, "in1d"), reason="NumPy < 2.4 still has np.in1d")
def test_unpatched_cityscapesscripts_fails_on_this_numpy(cs_root, val_dicts, tmp_path, monkeypatch):
    """Why the shim exists: cityscapesscripts 2.3.0 as installed fails on this NumPy."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    monkeypatch.chdir(tmp_path)
    gt = val_dicts[0]["gt_file"]
    (tmp_path / "p.txt").write_text("")
    args = copy.copy(cs_eval.args)
    args.predictionPath, args.gtInstancesFile, args.quiet, args.JSONOutput = str(tmp_path), str(tmp_path / "g.json"), True, False
    with pytest.raises(AttributeError, match="in1d"):
        cs_eval.evaluateImgLists([str(tmp_path / "p.txt")], [gt], args)


# ----------------------------------------------------------------------------- configs
# the instance configs; the semantic / panoptic ones (19 classes) are tested in test_panoptic_semantic.py
CONFIGS = sorted(p for p in glob.glob(str(REPO / "configs" / "**" / "*cityscapes*.yaml"), recursive=True)
                 if not p.endswith(("_panoptic.yaml", "_semantic.yaml")))


def test_config_list_covers_the_tables():
    names = {os.path.relpath(p, REPO / "configs") for p in CONFIGS}
    assert {"fastinst/R50_D3_cityscapes.yaml", "fastinst/mask2former_light_R50_cityscapes.yaml",
            "fassst/MNv2_768_cityscapes.yaml", "fassst/MNv2_768_cityscapes_scratch.yaml",
            "queryinst/R50_FPN_100q_cityscapes.yaml"} <= names
    assert {f"fassst/ablations/table7_n{n}_cityscapes.yaml" for n in (16, 25, 36, 49, 64, 81)} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO / "configs") for p in CONFIGS])
def test_config_builds_8_class_model(path):
    from instseg.config import setup_cfg
    from instseg.data import resolve_num_classes
    from instseg.modeling import build_model

    cfg = setup_cfg(path, ["MODEL.DEVICE", "cpu"])
    assert cfg.DATASETS.TRAIN == ("cityscapes_fine_instance_seg_train",)
    assert cfg.DATASETS.TEST == ("cityscapes_fine_instance_seg_val",)
    assert resolve_num_classes(cfg) == 8
    model = build_model(cfg)
    counts = {int(m.num_classes) for m in model.modules() if isinstance(getattr(m, "num_classes", None), int)}
    assert counts == {8}, counts
