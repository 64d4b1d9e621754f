"""Semantic / panoptic inference (Mask2Former's rules), the mIoU and PQ evaluators, FastInst's task switches
and the engine's choice of evaluators (issue 13).

Pure logic on hand-made tensors and tiny hand-made label maps; no shared data needed.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instseg.evaluation import PanopticEvaluator, SemSegEvaluator, semseg_metrics
from instseg.evaluation.panoptic_evaluation import id2rgb, pq_average_safe
from instseg.modeling.panoptic import panoptic_inference, semantic_inference

REPO = Path(__file__).resolve().parents[1]
BIG = 20.0  # logit magnitude: softmax / sigmoid saturate to ~1 / ~0


def _cls(num_classes, cls, score=None):
    """(C + 1,) logits whose softmax top class is ``cls`` (``num_classes`` = no object) with probability
    ~1, or exactly ``score`` when given (the rest spread evenly)."""
    n = num_classes + 1
    if score is None:
        v = torch.zeros(n)
        v[cls] = BIG
        return v
    p = torch.full((n,), (1 - score) / (n - 1))
    p[cls] = score
    return p.log()


def _mask(h, w, region, inside=BIG, outside=-BIG):
    m = torch.full((h, w), outside)
    m[region] = inside
    return m


# --------------------------------------------------------------------------- semantic inference
def test_semantic_inference_is_sum_of_class_prob_times_mask_prob():
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(5, 4, generator=g)  # Q=5, C=3 (+ no object)
    masks = torch.randn(5, 6, 7, generator=g)
    out = semantic_inference(cls, masks)
    assert out.shape == (3, 6, 7) and out.dtype == torch.float32
    p = cls.softmax(-1)
    expected = torch.zeros(3, 6, 7)
    for q in range(5):
        for c in range(3):  # the no-object column (3) never contributes
            expected[c] += p[q, c] * masks[q].sigmoid()
    torch.testing.assert_close(out, expected)


def test_semantic_inference_known_winner_per_pixel():
    h, w = 2, 4
    cls = torch.stack([_cls(2, 0), _cls(2, 1), _cls(2, 2)])  # third query: no object
    left = (slice(None), slice(0, 2))
    masks = torch.stack([_mask(h, w, left), _mask(h, w, (slice(None), slice(2, 4))), torch.full((h, w), BIG)])
    label = semantic_inference(cls, masks).argmax(0)
    assert label.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]  # the no-object query covering everything is ignored


def test_semantic_inference_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mask_pred must be"):
        semantic_inference(torch.zeros(3, 4), torch.zeros(2, 5, 5))


# --------------------------------------------------------------------------- panoptic inference
# 4 x 6 image; classes: 0 car (thing), 1 road (stuff), 2 sky (stuff); C = 3, no object = 3
H, W, C = 4, 6, 3
THINGS = {0}
TL, TR = (slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4))
BL, BR = (slice(2, 4), slice(0, 2)), (slice(2, 4), slice(2, 4))


def _scene():
    cls = torch.stack([
        _cls(C, 0),              # q0 car, top-left
        _cls(C, 0),              # q1 car, top-right
        _cls(C, 1),              # q2 road, bottom-left
        _cls(C, 1),              # q3 road, bottom-right -> merged with q2
        _cls(C, 2, score=0.6),   # q4 sky, score 0.6 (< 0.8), mask everywhere; would win only columns 4-5
        _cls(C, 3),              # q5 no object, mask everywhere
    ])
    masks = torch.stack([_mask(H, W, TL), _mask(H, W, TR), _mask(H, W, BL), _mask(H, W, BR),
                         torch.full((H, W), BIG), torch.full((H, W), BIG)])
    return cls, masks


def test_panoptic_inference_defaults_things_stuff_merge_and_drops():
    cls, masks = _scene()
    seg, info = panoptic_inference(cls, masks, THINGS)
    assert seg.dtype == torch.int32 and seg.shape == (H, W)
    assert info == [{"id": 1, "isthing": True, "category_id": 0},
                    {"id": 2, "isthing": True, "category_id": 0},
                    {"id": 3, "isthing": False, "category_id": 1}]
    expected = torch.zeros(H, W, dtype=torch.int32)
    expected[TL], expected[TR], expected[BL], expected[BR] = 1, 2, 3, 3  # two road queries: one segment
    assert torch.equal(seg, expected)  # columns 4-5: void (q4 under the object-mask threshold, q5 no object)


def test_panoptic_inference_overlap_threshold():
    cls, masks = _scene()
    # q4 kept by a lower object-mask threshold: it wins 8 px (columns 4-5) of its 24 px mask -> ratio 1/3
    seg, info = panoptic_inference(cls, masks, THINGS, object_mask_threshold=0.5, overlap_threshold=0.8)
    assert [s["category_id"] for s in info] == [0, 0, 1]  # dropped: 1/3 < 0.8
    assert (seg[:, 4:] == 0).all()
    seg, info = panoptic_inference(cls, masks, THINGS, object_mask_threshold=0.5, overlap_threshold=8 / 24)
    assert info[-1] == {"id": 4, "isthing": False, "category_id": 2}  # kept at ratio == threshold (>=)
    assert (seg[:, 4:] == 4).all() and (seg[:, :4] != 4).all()


def test_panoptic_inference_overlap_counts_won_pixels_as_mask2former():
    """Mask2Former: mask_area = pixels the query wins (any probability), original_area = prob >= 0.5;
    the segment is won AND >= 0.5. A query that wins 3 of its 4 foreground pixels plus 1 background
    pixel has mask_area/original_area = 4/4 and is kept (a won-and-foreground ratio, 3/4, would drop it)."""
    cls = torch.stack([_cls(2, 1), _cls(2, 0, score=0.9)])  # a: road, score ~1; b: car, score 0.9
    a = torch.tensor([[BIG, BIG, BIG, 0.5, -1.0, -BIG]])    # probs 1, 1, 1, 0.62, 0.27, 0
    b = torch.tensor([[-BIG, -BIG, -BIG, BIG, -BIG, BIG]])  # probs 0, 0, 0, 1, 0, 1
    # score x prob: px 3: a 0.62 < b 0.9 -> b; px 4: a 0.27 > b 0 -> a (a is below 0.5 there)
    seg, info = panoptic_inference(cls, torch.stack([a, b]), thing_ids={0})
    # a wins px 0,1,2,4 (4 px), original area 4 (px 0-3) -> kept, segment = px 0-2; b wins px 3, 5; fg 3, 5
    assert info == [{"id": 1, "isthing": False, "category_id": 1}, {"id": 2, "isthing": True, "category_id": 0}]
    assert seg.tolist() == [[1, 1, 1, 2, 0, 2]]


def test_panoptic_inference_nothing_kept():
    cls = torch.stack([_cls(C, 3), _cls(C, 1, score=0.5)])
    seg, info = panoptic_inference(cls, torch.zeros(2, 3, 3), THINGS)
    assert info == [] and seg.dtype == torch.int32 and not seg.any()


# --------------------------------------------------------------------------- semantic evaluator
GT1 = np.array([[0, 0], [1, 255]])
PR1 = np.array([[0, 1], [1, 1]])
GT2 = np.array([[1, 1], [1, 0]])
PR2 = np.array([[1, 1], [0, 0]])


def _onehot(label, c):
    return torch.nn.functional.one_hot(torch.as_tensor(label), c).permute(2, 0, 1).float()


def _sem_eval(c, tmp_path):
    ev = SemSegEvaluator(c, [f"k{i}" for i in range(c)])
    f1 = tmp_path / "gt1.png"
    Image.fromarray(GT1.astype(np.uint8)).save(f1)
    ev.process([{"sem_seg_file_name": str(f1)}], [{"sem_seg": _onehot(PR1, c)}])
    ev.process([{"sem_seg_gt": torch.as_tensor(GT2)}], [{"sem_seg": _onehot(PR2, c)}])
    return ev


def test_semseg_evaluator_hand_computed_two_images(tmp_path):
    # labelled pixels: class 0: gt 3, pred 3, TP 2 -> IoU 2/4; class 1: gt 4, pred 4, TP 3 -> IoU 3/5
    m = _sem_eval(2, tmp_path).evaluate()["sem_seg"]
    assert m["IoU-k0"] == pytest.approx(50.0) and m["IoU-k1"] == pytest.approx(60.0)
    assert m["mIoU"] == pytest.approx(55.0)
    assert m["fwIoU"] == pytest.approx(100 * (3 / 7 * 0.5 + 4 / 7 * 0.6))
    assert m["pACC"] == pytest.approx(100 * 5 / 7)
    assert m["mACC"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)


def test_semseg_class_without_gt_is_nan_and_left_out(tmp_path):
    m = _sem_eval(3, tmp_path).evaluate()["sem_seg"]
    assert math.isnan(m["IoU-k2"]) and math.isnan(m["ACC-k2"])
    assert m["mIoU"] == pytest.approx(55.0)


def test_semseg_ddp_sums_confusion_matrices(tmp_path, monkeypatch):
    from instseg.utils import comm

    ev = _sem_eval(2, tmp_path)
    single = ev.evaluate()["sem_seg"]
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [data, np.zeros_like(data)])
    assert ev.evaluate()["sem_seg"] == pytest.approx(single)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert ev.evaluate() == {}


def test_semseg_bad_inputs(tmp_path):
    ev = SemSegEvaluator(2)
    with pytest.raises(ValueError, match="outside 0..1"):
        ev.process([{"sem_seg_gt": np.array([[0, 7]]), "file_name": "x.png"}], [{"sem_seg": torch.zeros(2, 1, 2)}])
    with pytest.raises(ValueError, match="ground truth is"):
        ev.process([{"sem_seg_gt": np.zeros((2, 2))}], [{"sem_seg": torch.zeros(2, 1, 2)}])
    with pytest.raises(ValueError, match="sem_seg_file_name"):
        ev.process([{"file_name": "a.png"}], [{"sem_seg": torch.zeros(2, 1, 2)}])
    with pytest.raises(ValueError, match=r"\(C \+ 1, C \+ 1\)"):
        semseg_metrics(np.zeros((3, 2)))


# --------------------------------------------------------------------------- panoptic evaluator
CATS = [{"id": 1, "name": "car", "isthing": 1, "supercategory": "vehicle"},
        {"id": 2, "name": "road", "isthing": 0, "supercategory": "flat"}]


def _panoptic_case(tmp_path):
    """Two 4x4 images. img1: gt car (4 px) + road (rows 2-3), void elsewhere; pred car 3 px inside the
    gt car (IoU 0.75) + road exact (IoU 1). img2: gt road everywhere but a car at row 0 cols 0-1;
    pred road everywhere but a car at row 3 cols 0-1 -> road IoU 12/16 = 0.75, pred car FP, gt car FN."""
    gt1 = np.zeros((4, 4), np.int64); gt1[:2, :2] = 1; gt1[2:] = 2
    pr1 = np.zeros((4, 4), np.int64); pr1[0, :2] = 1; pr1[1, 0] = 1; pr1[2:] = 2
    gt2 = np.full((4, 4), 2, np.int64); gt2[0, :2] = 1
    pr2 = np.full((4, 4), 2, np.int64); pr2[3, :2] = 1
    gt_folder = tmp_path / "gt"; gt_folder.mkdir()
    anns = []
    for name, gt in (("img1", gt1), ("img2", gt2)):
        Image.fromarray(id2rgb(gt)).save(gt_folder / f"{name}.png")
        anns.append({"image_id": name, "file_name": f"{name}.png", "segments_info": [
            {"id": 1, "category_id": 1, "iscrowd": 0, "area": int((gt == 1).sum())},
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": int((gt == 2).sum())}]})
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps({"images": [{"id": a["image_id"], "file_name": a["file_name"]} for a in anns],
                                   "annotations": anns, "categories": CATS}))
    # model outputs: contiguous category ids (0 car, 1 road)
    info = [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 1}]
    preds = {"img1": (torch.as_tensor(pr1, dtype=torch.int32), info),
             "img2": (torch.as_tensor(pr2, dtype=torch.int32), info)}
    return str(gt_json), str(gt_folder), preds


def test_panoptic_evaluator_hand_computed_and_equal_to_library(tmp_path):
    gt_json, gt_folder, preds = _panoptic_case(tmp_path)
    ev = PanopticEvaluator(gt_json, gt_folder, output_dir=str(tmp_path / "out"))
    ev.process([{"image_id": "img1", "file_name": "/x/img1.jpg"}], [{"panoptic_seg": preds["img1"]}])
    seg2, info2 = preds["img2"]  # the (seg, separate segments_info) form, matched by file stem
    ev.process([{"file_name": "/x/img2.png"}], [{"panoptic_seg": seg2, "segments_info": info2}])
    m = ev.evaluate()["panoptic_seg"]
    # car: TP 1 (IoU 0.75), FP 1, FN 1 -> PQ .75/2, SQ .75, RQ .5; road: TP 2 (IoU 1, .75) -> PQ=SQ .875, RQ 1
    assert m["PQ-car"] == pytest.approx(37.5) and m["SQ-car"] == pytest.approx(75.0) and m["RQ-car"] == pytest.approx(50.0)
    assert m["PQ-road"] == pytest.approx(87.5) and m["SQ-road"] == pytest.approx(87.5) and m["RQ-road"] == pytest.approx(100.0)
    assert (m["PQ_th"], m["SQ_th"], m["RQ_th"]) == pytest.approx((37.5, 75.0, 50.0))
    assert (m["PQ_st"], m["SQ_st"], m["RQ_st"]) == pytest.approx((87.5, 87.5, 100.0))
    assert (m["PQ"], m["SQ"], m["RQ"]) == pytest.approx((62.5, 81.25, 75.0))
    assert json.loads((tmp_path / "out" / "panoptic_metrics.json").read_text())["panoptic_seg"]["PQ"] == pytest.approx(62.5)

    # the library's own entry point on the same files
    import cityscapesscripts.evaluation.evalPanopticSemanticLabeling as cs_pan

    pred_folder = tmp_path / "pred"; pred_folder.mkdir()
    anns = []
    for name, (seg, info) in preds.items():
        Image.fromarray(id2rgb(seg.numpy())).save(pred_folder / f"{name}.png")
        anns.append({"image_id": name, "file_name": f"{name}.png",
                     "segments_info": [{"id": s["id"], "category_id": CATS[s["category_id"]]["id"]} for s in info]})
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": anns}))
    lib = cs_pan.evaluatePanoptic(gt_json, gt_folder, str(pred_json), str(pred_folder), str(tmp_path / "res.json"))
    for key, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for k in ("pq", "sq", "rq"):
            assert m[k.upper() + suffix] == pytest.approx(100 * lib[key][k])
    for cid, name in ((1, "car"), (2, "road")):
        assert m[f"PQ-{name}"] == pytest.approx(100 * lib["per_class"][cid]["pq"])


def test_pq_average_safe_group_without_categories():
    import cityscapesscripts.evaluation.evalPanopticSemanticLabeling as cs_pan

    stat = cs_pan.PQStat()
    stat[1].tp, stat[1].iou = 1, 0.8
    cats = {1: CATS[0]}  # things only
    with pytest.raises(ZeroDivisionError):  # why the shim exists
        stat.pq_average(cats, isthing=False)
    avg, per_class = pq_average_safe(stat, cats, False)
    assert avg["n"] == 0 and math.isnan(avg["pq"]) and per_class == {}
    avg, _ = pq_average_safe(stat, cats, True)
    assert avg == {"pq": pytest.approx(0.8), "sq": pytest.approx(0.8), "rq": 1.0, "n": 1}


def test_id2rgb_inverts_library_rgb2id():
    import cityscapesscripts.evaluation.evalPanopticSemanticLabeling as cs_pan

    ids = np.array([[0, 1, 255], [256, 65793, 256 ** 3 - 1]])
    assert np.array_equal(cs_pan.rgb2id(id2rgb(ids)), ids)
    with pytest.raises(ValueError, match="segment ids"):
        id2rgb(np.array([[-1]]))


def test_panoptic_evaluator_errors(tmp_path):
    gt_json, gt_folder, preds = _panoptic_case(tmp_path)
    ev = PanopticEvaluator(gt_json, gt_folder)
    seg, info = preds["img1"]
    with pytest.raises(ValueError, match="no annotation"):
        ev.process([{"image_id": "nope", "file_name": "/x/nope.png"}], [{"panoptic_seg": (seg, info)}])
    with pytest.raises(ValueError, match="differ"):
        ev.process([{"image_id": "img1"}], [{"panoptic_seg": (seg, info[:1])}])
    with pytest.raises(ValueError, match="category_id 5"):
        ev.process([{"image_id": "img1"}], [{"panoptic_seg": (seg, [dict(info[0]), dict(info[1], category_id=5)])}])
    with pytest.raises(FileNotFoundError):
        PanopticEvaluator(str(tmp_path / "missing.json"), gt_folder)
    assert ev.evaluate() == {}


def test_panoptic_inference_output_feeds_the_evaluator(tmp_path):
    """panoptic_inference's (seg, segments_info) goes into PanopticEvaluator unchanged."""
    gt_json, gt_folder, _ = _panoptic_case(tmp_path)
    cls = torch.stack([_cls(2, 0), _cls(2, 1)])
    car = torch.zeros(4, 4, dtype=torch.bool); car[:2, :2] = True
    road = torch.zeros(4, 4, dtype=torch.bool); road[2:] = True
    masks = torch.stack([torch.where(car, BIG, -BIG), torch.where(road, BIG, -BIG)])
    ev = PanopticEvaluator(gt_json, gt_folder)
    ev.process([{"image_id": "img1"}], [{"panoptic_seg": panoptic_inference(cls, masks, {0})}])
    m = ev.evaluate()["panoptic_seg"]
    assert m["PQ-car"] == pytest.approx(100.0) and m["PQ-road"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- model wiring
from instseg.modeling.panoptic import query_segmentation_outputs  # noqa: E402


def test_query_outputs_resize_then_infer_and_semantic_order():
    """Panoptic / semantic run on masks upsampled to the padded size, cropped to the image and
    resized to the output size (sem_seg_postprocess); semantic-only infers at the padded size and
    resizes the class map (Mask2Former's SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE False)."""
    torch.manual_seed(0)
    cls = torch.randn(4, 3)  # 2 classes + no object
    low = torch.randn(4, 6, 8)  # stride 4 of a padded 24 x 32 input
    padded, image, out = (24, 32), (20, 30), (40, 60)
    up = torch.nn.functional.interpolate(low[:, None], size=padded, mode="bilinear", align_corners=False)
    crop = up[:, :, :20, :30]
    final = torch.nn.functional.interpolate(crop, size=out, mode="bilinear", align_corners=False)[:, 0]
    before = query_segmentation_outputs(cls, low, padded, image, out, semantic_on=True, panoptic_on=True,
                                        postprocess_before_inference=True, thing_ids=[1],
                                        object_mask_threshold=0.0, overlap_threshold=0.0)
    assert torch.allclose(before["sem_seg"], semantic_inference(cls, final), atol=1e-6)
    seg, info = panoptic_inference(cls, final, [1], 0.0, 0.0)
    assert torch.equal(before["panoptic_seg"], seg) and before["segments_info"] == info
    assert before["sem_seg"].shape == (2, 40, 60) and before["panoptic_seg"].dtype == torch.int32
    after = query_segmentation_outputs(cls, low, padded, image, out, semantic_on=True, panoptic_on=False,
                                       postprocess_before_inference=False)
    sem_padded = semantic_inference(cls, up[:, 0])[:, None]  # (C, 1, 24, 32)
    expect = torch.nn.functional.interpolate(sem_padded[:, :, :20, :30], size=out, mode="bilinear",
                                             align_corners=False)[:, 0]
    assert set(after) == {"sem_seg"} and torch.allclose(after["sem_seg"], expect, atol=1e-6)
    assert not torch.allclose(after["sem_seg"], before["sem_seg"], atol=1e-3)  # the order matters
    with pytest.raises(ValueError, match="postprocess_before_inference must be True"):
        query_segmentation_outputs(cls, low, padded, image, out, semantic_on=False, panoptic_on=True,
                                   postprocess_before_inference=False, thing_ids=[1])
    with pytest.raises(ValueError, match="needs thing_ids"):
        query_segmentation_outputs(cls, low, padded, image, out, semantic_on=False, panoptic_on=True,
                                   postprocess_before_inference=True)


def _toy_panoptic_dataset(name):
    from instseg.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog:
        DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={5: 1, 6: 2},
                                  stuff_dataset_id_to_contiguous_id={1: 0})


def _fastinst(opts):
    import fastinst  # noqa: F401
    from instseg.config import setup_cfg
    from instseg.modeling import build_model

    cfg = setup_cfg(str(REPO / "configs" / "fastinst" / "R50_D1_576.yaml"), [
        "MODEL.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
        "MODEL.FASTINST.NUM_OBJECT_QUERIES", "4", "TEST.DETECTIONS_PER_IMAGE", "6", *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_fastinst_tasks_outputs_and_thing_only_instances(monkeypatch):
    """Hand-made decoder outputs through FastInst.inference with the three tasks on: the
    panoptic map has the known winners, the semantic map is class x mask summed, and the instance
    outputs keep only thing classes (official: top-k pairs, then the thing filter)."""
    _toy_panoptic_dataset("test_toy_panoptic")
    on = ["DATASETS.TRAIN", "('test_toy_panoptic',)", "MODEL.FASTINST.TEST.PANOPTIC_ON", "True",
          "MODEL.FASTINST.TEST.SEMANTIC_ON", "True"]
    model = _fastinst(on)
    assert model.output_tasks == ("instances", "sem_seg", "panoptic_seg") and model.thing_ids == [1, 2]
    logits = torch.stack([_cls(3, 0), _cls(3, 1), _cls(3, 2, score=0.5), _cls(3, 3)])[None]  # stuff, thing, weak, none
    masks = torch.full((1, 4, 8, 8), -BIG)
    masks[0, 0, :, :4] = BIG  # stuff: left half
    masks[0, 1, :, 4:] = BIG  # thing: right half
    masks[0, 2, :4, 4:] = BIG  # weak thing (score 0.5 < 0.8): not in the panoptic map
    res = model.inference({"pred_logits": logits, "pred_masks": masks}, [{"height": 32, "width": 32}],
                          [(32, 32)], (32, 32))[0]
    pan, info = res["panoptic_seg"], res["segments_info"]
    assert pan.shape == (32, 32) and pan.dtype == torch.int32
    assert [(s["category_id"], s["isthing"]) for s in info] == [(0, False), (1, True)]
    assert (pan[:, :14] == info[0]["id"]).all() and (pan[:, 18:] == info[1]["id"]).all()
    assert res["sem_seg"].shape == (3, 32, 32) and res["sem_seg"][:, 0, 0].argmax() == 0
    assert res["sem_seg"][:, 30, 30].argmax() == 1
    assert set(res["labels"].tolist()) <= {1, 2} and len(res["labels"]) < 6  # stuff pairs dropped
    # instance-only (default): the instance keys alone, the stuff class kept
    plain = _fastinst([])
    assert plain.output_tasks == ("instances",)
    res0 = plain.inference({"pred_logits": logits, "pred_masks": masks}, [{"height": 32, "width": 32}],
                           [(32, 32)], (32, 32))[0]
    assert set(res0) == {"scores", "labels", "masks", "boxes"} and len(res0["labels"]) == 6
    assert 0 in res0["labels"].tolist()
    # semantic only
    sem = _fastinst(["MODEL.FASTINST.TEST.SEMANTIC_ON", "True", "MODEL.FASTINST.TEST.INSTANCE_ON", "False"])
    res1 = sem.inference({"pred_logits": logits, "pred_masks": masks}, [{"height": 32, "width": 32}],
                         [(32, 32)], (32, 32))[0]
    assert set(res1) == {"sem_seg"} and not sem.sem_seg_postprocess_before_inference


def test_fastinst_task_switch_errors():
    with pytest.raises(ValueError, match="all False"):
        _fastinst(["MODEL.FASTINST.TEST.INSTANCE_ON", "False"])
    _toy_panoptic_dataset("test_toy_panoptic")
    from instseg.data import DatasetCatalog

    if "test_toy_no_things" not in DatasetCatalog:
        DatasetCatalog.register("test_toy_no_things", lambda: [])
    with pytest.raises(ValueError, match="test_toy_no_things.*thing_dataset_id_to_contiguous_id"):
        _fastinst(["DATASETS.TRAIN", "('test_toy_no_things',)", "MODEL.FASTINST.TEST.PANOPTIC_ON", "True"])


def test_engine_picks_evaluators_from_dataset_type_and_model_tasks(tmp_path):
    import types

    from instseg.config import get_cfg
    from instseg.data import DatasetCatalog, MetadataCatalog
    from instseg.engine.module import InstSegModule
    from instseg.evaluation import CityscapesSemSegEvaluator, DatasetEvaluators

    gt_json, gt_folder = _panoptic_case(tmp_path)[:2]
    for name, etype in (("test_toy_pan_eval", "cityscapes_panoptic_seg"), ("test_toy_sem_eval", "cityscapes_sem_seg"),
                        ("test_toy_generic_sem_eval", "sem_seg")):
        if name not in DatasetCatalog:
            DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(evaluator_type=etype, panoptic_json=str(gt_json), panoptic_root=str(gt_folder),
                                      stuff_classes=["a", "b", "c"], ignore_label=255)
    cfg = get_cfg()

    def fake(tasks):
        return types.SimpleNamespace(cfg=cfg, per_category=False, model=types.SimpleNamespace(output_tasks=tasks))

    assert isinstance(InstSegModule._make_evaluator(fake(("panoptic_seg",)), "test_toy_pan_eval"), PanopticEvaluator)
    both = InstSegModule._make_evaluator(fake(("sem_seg", "panoptic_seg")), "test_toy_pan_eval")
    assert isinstance(both, DatasetEvaluators)
    assert [type(e) for e in both._evaluators] == [PanopticEvaluator, CityscapesSemSegEvaluator]
    assert isinstance(InstSegModule._make_evaluator(fake(("sem_seg",)), "test_toy_sem_eval"), CityscapesSemSegEvaluator)
    assert isinstance(InstSegModule._make_evaluator(fake(("sem_seg",)), "test_toy_generic_sem_eval"), SemSegEvaluator)
    with pytest.raises(ValueError, match="test_toy_sem_eval.*cityscapes_sem_seg.*outputs \\['instances'\\]"):
        InstSegModule._make_evaluator(fake(("instances",)), "test_toy_sem_eval")


def test_cityscapes_semseg_evaluator_hand_computed_equals_ours(tmp_path):
    """cityscapesscripts' evalPixelLevelSemanticLabeling (through CityscapesSemSegEvaluator) and our
    SemSegEvaluator on one 4x4 Cityscapes-layout image, against hand-computed IoUs: GT rows 0-1
    road, row 2 car | car | sidewalk | sidewalk, row 3 unlabeled (void); prediction rows 0 road,
    row 1 road x3 + sidewalk, row 2 car | road | sidewalk | sidewalk, row 3 car (on void: ignored).
    road 7/9, sidewalk 2/3, car 1/2 -> mIoU 64.81; the car instance: iIoU 1/2."""
    pytest.importorskip("cityscapesscripts")
    from instseg.evaluation import CityscapesSemSegEvaluator

    city = tmp_path / "gtFine" / "val" / "x"
    city.mkdir(parents=True)
    stem = "x_000000_000001"
    label_ids = np.array([[7, 7, 7, 7], [7, 7, 7, 7], [26, 26, 8, 8], [0, 0, 0, 0]], np.uint8)
    train_ids = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [13, 13, 1, 1], [255] * 4], np.uint8)
    inst = label_ids.astype(np.uint16).copy()
    inst[2, :2] = 26000
    Image.fromarray(label_ids).save(city / f"{stem}_gtFine_labelIds.png")
    Image.fromarray(train_ids).save(city / f"{stem}_gtFine_labelTrainIds.png")
    Image.fromarray(inst).save(city / f"{stem}_gtFine_instanceIds.png")
    pred = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [13, 0, 1, 1], [13, 13, 13, 13]])
    sem = torch.nn.functional.one_hot(torch.as_tensor(pred), 19).permute(2, 0, 1).float()
    inp = {"file_name": str(tmp_path / f"{stem}_leftImg8bit.png"),
           "sem_seg_file_name": str(city / f"{stem}_gtFine_labelTrainIds.png")}
    lib = CityscapesSemSegEvaluator(output_dir=str(tmp_path / "out"))
    lib.reset()
    lib.process([inp], [{"sem_seg": sem}])
    res = lib.evaluate()["sem_seg"]
    assert res["IoU-road"] == pytest.approx(700 / 9) and res["IoU-sidewalk"] == pytest.approx(200 / 3)
    assert res["IoU-car"] == pytest.approx(50.0)
    assert res["mIoU"] == pytest.approx((700 / 9 + 200 / 3 + 50) / 3)
    assert res["iIoU"] == pytest.approx(50.0)
    ours = SemSegEvaluator(19)
    ours.process([inp], [{"sem_seg": sem}])
    assert ours.evaluate()["sem_seg"]["mIoU"] == pytest.approx(res["mIoU"])
    assert (tmp_path / "out" / "cityscapes_sem_seg_metrics.json").is_file()
    with pytest.raises(ValueError, match="'sem_seg' \\(19, H, W\\)"):
        lib.process([inp], [{"sem_seg": sem[:3]}])
