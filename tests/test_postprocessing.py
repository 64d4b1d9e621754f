"""The one post-processing of the four models (instseg/modeling/postprocessing.py): the batched
RoI paste against hand-computed cases and grid_sample, the '>' threshold rule, top-k, and
TEST.DETECTIONS_PER_IMAGE meaning the same in every model and in the COCO evaluator."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instseg.config import setup_cfg
from instseg.engine.models import import_model_packages
from instseg.modeling import (
    binarize,
    build_model,
    dense_masks_to_instances,
    paste_masks_in_boxes,
    roi_masks_to_instances,
    select_top,
)
from instseg.modeling import postprocessing

REPO = Path(__file__).resolve().parents[1]


def _grid_sample_paste(masks, boxes, size):
    """Reference: mmdetection's _do_paste_mask over the whole image, one instance at a time."""
    h, w = size
    xs, ys = torch.arange(w) + 0.5, torch.arange(h) + 0.5
    out = []
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist()):
        gx = (xs - x1) / (x2 - x1) * 2 - 1
        gy = (ys - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        out.append(F.grid_sample(m[None, None], grid, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


def test_paste_equals_grid_sample_inside_and_across_the_border():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 28, 28, generator=g)
    xy = torch.rand(12, 2, generator=g) * torch.tensor([90.0, 70.0]) - 10
    boxes = torch.cat([xy, xy + 5 + torch.rand(12, 2, generator=g) * 60], dim=1)
    boxes[0] = torch.tensor([-30.0, -20.0, 130.0, 95.0])  # larger than the image on every side
    out = paste_masks_in_boxes(masks, boxes, (80, 100))
    assert out.dtype == torch.float32 and out.shape == (12, 80, 100)
    assert torch.allclose(out, _grid_sample_paste(masks, boxes, (80, 100)), atol=1e-5)


def test_paste_hand_computed_box_edges():
    # a 28x28 mask of ones into an 80x80 box at (20, 40): an edge pixel centre lies 0.5 px inside
    # the box, i.e. at cell coordinate 0.5 / 80 * 28 - 0.5 = -0.325, which reads 0.675 of cell 0
    # (zero padding outside); a corner pixel reads 0.675^2 = 0.456 < 0.5: exactly the 4 corners drop
    full = torch.ones(1, 28, 28)
    box = torch.tensor([[20.0, 40.0, 100.0, 120.0]])
    probs = paste_masks_in_boxes(full, box, (200, 200))
    assert float(probs[0, 40, 60]) == pytest.approx(0.675, abs=1e-6)
    assert float(probs[0, 40, 20]) == pytest.approx(0.675 ** 2, abs=1e-6)
    # the pixel just outside (centre 0.5 px out, coordinate -0.675) still reads 0.325 of cell 0;
    # two pixels out (coordinate -1.025) reads nothing
    assert float(probs[0, 39, 60]) == pytest.approx(0.325, abs=1e-6)
    assert float(probs[0, 38, 60]) == 0.0 and float(probs[0, 80, 101]) == 0.0
    expected = torch.zeros(200, 200, dtype=torch.bool)
    expected[40:120, 20:100] = True
    for y, x in ((40, 20), (40, 99), (119, 20), (119, 99)):
        expected[y, x] = False
    assert torch.equal(paste_masks_in_boxes(full, box, (200, 200), threshold=0.5)[0], expected)


def test_paste_uses_the_box_as_predicted_not_clipped():
    # right half of the mask is foreground; the box [-40, 10, 40, 50] sticks out on the left, so
    # the right half lands on x in [0, 40): columns 0..39, rows 10..49 (all at least 0.675 * 0.85).
    # Pasting into the clipped box [0, 10, 40, 50] would squash the mask and leave x < 20 empty.
    right = torch.zeros(1, 28, 28)
    right[:, :, 14:] = 1
    res = roi_masks_to_instances(right, torch.tensor([0.9]), torch.tensor([3]), torch.tensor([[-40.0, 10.0, 40.0, 50.0]]),
                                 (60, 80), (60, 80), mask_threshold=0.5)
    expected = torch.zeros(60, 80, dtype=torch.bool)
    expected[10:50, 0:40] = True
    assert torch.equal(res["masks"][0], expected)
    assert res["boxes"].tolist() == [[0.0, 10.0, 40.0, 50.0]]  # only the returned box is clipped


def test_roi_results_are_scaled_to_the_original_size():
    full = torch.ones(1, 14, 14)
    # a 20x20 box at (10, 10) of a 50x50 network input; the original image is 100x100
    res = roi_masks_to_instances(full, torch.tensor([0.5]), torch.tensor([0]), torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
                                 (50, 50), (100, 100), mask_threshold=0.5)
    assert res["boxes"].tolist() == [[20.0, 20.0, 60.0, 60.0]]
    m = res["masks"][0]
    assert m.shape == (100, 100) and m[21:59, 21:59].all() and not m[:19].any() and not m[:, 61:].any()


def test_paste_chunks_give_the_same_masks(monkeypatch):
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(9, 14, 14, generator=g)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 30.0]]).repeat(9, 1) + torch.arange(9.0)[:, None]
    whole = paste_masks_in_boxes(masks, boxes, (50, 60), threshold=0.5)
    monkeypatch.setattr(postprocessing, "_PASTE_CHUNK_BYTES", 1)  # one instance per chunk
    assert torch.equal(paste_masks_in_boxes(masks, boxes, (50, 60), threshold=0.5), whole)


def test_degenerate_and_non_finite_boxes_paste_nothing():
    masks = torch.ones(3, 7, 7)
    boxes = torch.tensor([[10.0, 10.0, 10.0, 20.0], [5.0, 5.0, float("nan"), 9.0], [30.0, 5.0, 20.0, 9.0]])
    assert not paste_masks_in_boxes(masks, boxes, (40, 40), threshold=0.5).any()
    assert paste_masks_in_boxes(torch.ones(0, 7, 7), torch.zeros(0, 4), (4, 5)).shape == (0, 4, 5)
    with pytest.raises(ValueError, match="masks"):
        paste_masks_in_boxes(torch.ones(2, 7, 7), torch.zeros(3, 4), (4, 5))


def test_threshold_rule_is_strictly_greater_everywhere():
    assert binarize(torch.tensor([0.44, 0.45, 0.46]), 0.45).tolist() == [False, False, True]
    # a constant 0.5 mask pasted inside its box stays exactly 0.5: background at threshold 0.5
    inside = paste_masks_in_boxes(torch.full((1, 8, 8), 0.5), torch.tensor([[0.0, 0.0, 16.0, 16.0]]), (16, 16))
    assert float(inside[0, 8, 8]) == 0.5
    assert not paste_masks_in_boxes(torch.full((1, 8, 8), 0.5), torch.tensor([[0.0, 0.0, 16.0, 16.0]]), (16, 16), 0.5).any()
    res = dense_masks_to_instances(torch.full((1, 4, 4), 0.45), torch.ones(1), torch.zeros(1, dtype=torch.long),
                                   (16, 16), (16, 16), (16, 16), mask_threshold=0.45, maps_are_logits=False)
    assert not res["masks"].any() and res["boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_dense_results_rescore_and_reuse_duplicate_queries():
    logits = torch.full((2, 4, 4), -8.0)
    logits[0, :2, :2] = 8.0  # top-left quarter, probability ~1
    logits[1] = 0.0  # probability 0.5 everywhere: nothing above 0.5
    index = torch.tensor([0, 0, 1])  # query 0 kept with two classes
    res = dense_masks_to_instances(logits, torch.tensor([0.8, 0.4, 0.9]), torch.tensor([1, 2, 1]), (16, 16), (16, 16),
                                   (32, 32), mask_threshold=0.5, maps_are_logits=True, rescore_with_mask=True, index=index)
    assert res["masks"].shape == (3, 32, 32)
    assert torch.equal(res["masks"][0], res["masks"][1]) and not res["masks"][2].any()
    assert res["boxes"][0].tolist() == [0.0, 0.0, 16.0, 16.0]
    # score x mean probability inside the mask (< 1: the bilinear edge of the quarter is softer)
    assert 0.8 * 0.9 < float(res["scores"][0]) < 0.8 and float(res["scores"][2]) == 0.0
    assert float(res["scores"][1]) == pytest.approx(float(res["scores"][0]) / 2)  # same mask, score 0.4


def test_select_top_sorted_and_capped():
    scores, idx = select_top(torch.tensor([[0.1, 0.7], [0.9, 0.3]]), 3)
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.3]) and idx.tolist() == [2, 1, 3]
    assert select_top(torch.tensor([0.5]), 100)[1].tolist() == [0]
    with pytest.raises(ValueError, match="DETECTIONS_PER_IMAGE"):
        select_top(torch.ones(3), 0)


@pytest.mark.parametrize("config,opts", [
    ("sparseinst/R50_giam.yaml", ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.0"]),
    ("fastinst/R50_D1_576.yaml", []),
    ("queryinst/R50_FPN_100q_1x.yaml", []),
    ("fassst/MNv2_416.yaml", ["MODEL.FASSST.SCORE_THRESHOLD", "0.0"]),
])
def test_detections_per_image_caps_every_model(config, opts):
    import_model_packages()
    cfg = setup_cfg(str(REPO / "configs" / config), ["MODEL.NUM_CLASSES", "5", "MODEL.DEVICE", "cpu",
                                                    "TEST.DETECTIONS_PER_IMAGE", "7", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 192, 256), dtype=torch.uint8)  # FastInst: E4 has >= 100 pixels
    with torch.no_grad():
        (res,) = model([{"image": image, "height": 48, "width": 64}])
    assert res["scores"].shape == (7,) and res["masks"].shape == (7, 48, 64) and res["boxes"].shape == (7, 4)
    if config.startswith(("queryinst", "fassst")):  # SparseInst and FastInst rescore after the top-k (official)
        assert torch.all(res["scores"][:-1] >= res["scores"][1:])


def test_coco_evaluator_scores_at_most_detections_per_image(tmp_path):
    from instseg.evaluation import COCOEvaluator

    gt = {"images": [{"id": 1, "width": 20, "height": 20, "file_name": "a.jpg"}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 6], "area": 36, "iscrowd": 0,
                           "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    ev = COCOEvaluator(str(path), max_dets_per_image=7, tasks=("bbox",))
    ev.reset()
    scores = torch.linspace(0.1, 0.95, 12)
    boxes = torch.tensor([[2.0, 2.0, 8.0, 8.0]]).repeat(12, 1) + torch.arange(12.0)[:, None]
    ev.process([{"image_id": 1, "height": 20, "width": 20}],
               [{"scores": scores, "labels": torch.zeros(12, dtype=torch.long), "boxes": boxes}])
    kept = ev._predictions[0]["instances"]
    assert len(kept) == 7
    assert sorted(round(d["score"], 4) for d in kept) == sorted(round(float(s), 4) for s in scores.topk(7).values)
    assert "AP" in ev.evaluate()["bbox"]


def test_export_check_pairs_final_instances_by_label_score_and_mask():
    """instseg.export._match_instances (the export check's final comparison; no onnx needed): equal
    scores sorted in another order pair by mask overlap, a near-tie at the top-k cut is a tie, a
    changed label or score is unmatched."""
    from instseg.export import _match_instances

    def res(scores, labels, cols):
        masks = torch.zeros(len(scores), 4, 6, dtype=torch.bool)
        for k, c in enumerate(cols):
            masks[k, :, c] = True
        return {"scores": torch.tensor(scores), "labels": torch.tensor(labels), "masks": masks}

    ref = res([0.9, 0.5, 0.5, 0.3001], [1, 2, 2, 0], [0, 1, 2, 3])
    got = res([0.9, 0.5, 0.5, 0.3], [1, 2, 2, 0], [0, 2, 1, 3])  # the tied pair in the other order
    assert _match_instances(ref, got, 1e-3) == ([(0, 0), (1, 2), (2, 1), (3, 3)], 0, 0)
    # the last kept instance differs, both at the cut (0.3 vs 0.3005): ties, not failures
    got = res([0.9, 0.5, 0.5, 0.3005], [1, 2, 2, 4], [0, 1, 2, 5])
    assert _match_instances(ref, got, 1e-3) == ([(0, 0), (1, 1), (2, 2)], 0, 2)
    # a label changed above the cut, and a score off by 0.01: unmatched on both sides
    got = res([0.9, 0.51, 0.5, 0.3], [3, 2, 2, 0], [0, 1, 2, 3])
    pairs, unmatched, tied = _match_instances(ref, got, 1e-3)
    assert pairs == [(2, 2), (3, 3)] and unmatched == 4 and tied == 0
    # the same rank is not taken when its mask disagrees: equal scores, masks swapped
    got = res([0.9, 0.5, 0.5, 0.3001], [1, 2, 2, 0], [0, 2, 1, 3])
    assert _match_instances(ref, got, 1e-3)[0] == [(0, 0), (1, 2), (2, 1), (3, 3)]
    assert _match_instances(ref, res([], [], []), 1e-3) == ([], 4, 0)
