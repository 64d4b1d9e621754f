"""FASSST: RFF against Eq. 4 by hand, slot tensor shapes for every n of Table 7, ROI -> pyramid
level mapping (spatial_scale), the network head's stages, the losses / matcher / mask targets /
pasting against hand-computed values, the inference contract and a short real-data training run
whose loss falls."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import fassst  # noqa: F401  (registers FASSST, its backbone and MODEL.FASSST)
from fassst.criterion import FASSSTCriterion, focal_coordinate_loss, mask_targets_in_boxes, normalized_tlbr
from fassst.instance_attention import InstanceAttentionModule, slot_grid_size, slot_reference_boxes, tlbr_to_xyxy
from fassst.mask_tail import MaskTail
from fassst.network_head import build_fassst_mobilenet_v2_backbone, head_feature_index
from fassst.rff import RoIFeatureFusion, fuse_roi_features
from instseg.config import setup_cfg
from instseg.modeling import build_model
from instseg.modeling.backbone.mobilenet import MobileNetV2Backbone

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs" / "fassst"
SLOT_COUNTS = (16, 25, 36, 49, 64, 81)  # Table 7


def _cfg(config="MNv2_416.yaml", extra=(), num_classes=5):
    return setup_cfg(str(CFG / config), ["MODEL.NUM_CLASSES", str(num_classes), "MODEL.DEVICE", "cpu", *extra])


# Small widths so that whole models build and run fast on the CPU.
SMALL = ["MODEL.FASSST.IAM.DIM", "32", "MODEL.FASSST.PYRAMID.DIM", "32", "MODEL.FASSST.TAIL.DIM", "32"]


# ----------------------------------------------------------------------------- RFF (Eq. 3-4)
def _up2(x):
    """Bilinear x2 with half-pixel centres (align_corners=False) written out by hand for a 2x2
    map: output rows/cols are (in0, .75 in0 + .25 in1, .25 in0 + .75 in1, in1)."""
    u = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    return u @ x @ u.t()


def test_rff_equals_eq4_on_hand_made_tensors():
    r3 = torch.tensor([[[[2.0]]]])  # (1, 1, 1, 1): up(R3) is the constant 2
    r2 = torch.tensor([[[[1.0, 5.0], [-3.0, 9.0]]]])
    r1 = torch.tensor([[[[0.0, -10.0, 1.0, 2.0], [3.0, 4.0, -20.0, 5.0], [6.0, 7.0, 8.0, 9.0], [-1.0, 0.0, 0.0, -30.0]]]])
    s2 = torch.tensor([[3.0, 7.0], [-1.0, 11.0]])  # R2 + up(R3)
    expected = torch.clamp(r1[0, 0] + _up2(s2), min=0.0)  # ReLU(R1 + up(R2 + up(R3)))
    # a few entries by hand: (0,0): 0 + 3 = 3; (0,1): -10 + (.75*3 + .25*7) = -6 -> 0
    assert expected[0, 0].item() == pytest.approx(3.0) and expected[0, 1].item() == 0.0
    out = fuse_roi_features([r1, r2, r3], mode="bilinear")
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], expected)


def test_rff_module_with_and_without_fusion():
    # Constant feature maps: each ROI feature is that level's constant, so R = ReLU(c1 + c2 + c3).
    feats = [torch.full((1, 2, 16, 16), 1.5), torch.full((1, 2, 8, 8), -4.0), torch.full((1, 2, 4, 4), 0.5)]
    rois = torch.tensor([[0.0, 16.0, 16.0, 80.0, 96.0]])
    on = RoIFeatureFusion([8, 16, 32], roi_size=8)(feats, rois)
    assert on.shape == (1, 2, 8, 8)
    torch.testing.assert_close(on, torch.zeros_like(on))  # ReLU(1.5 - 4 + 0.5) = 0
    feats[1].fill_(1.0)
    torch.testing.assert_close(RoIFeatureFusion([8, 16, 32], roi_size=8)(feats, rois), torch.full((1, 2, 8, 8), 3.0))
    off = RoIFeatureFusion([8, 16, 32], roi_size=8, enabled=False)
    assert off.num_levels == 1
    torch.testing.assert_close(off(feats, rois), torch.full((1, 2, 8, 8), 1.5))  # R = R1 (no ReLU, Table 9)
    with pytest.raises(ValueError, match="double"):
        RoIFeatureFusion([8, 16, 64])
    with pytest.raises(ValueError, match="ROI_SIZE"):
        RoIFeatureFusion([8, 16, 32], roi_size=14)
    with pytest.raises(ValueError, match="double the size"):
        fuse_roi_features([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3)])


def test_roi_coordinates_map_to_the_right_cells_of_each_level():
    """A box in image pixels is sampled at the right cells of each stride's map.

    Level k holds f(x, y) = x + 100 y at cell (x, y) (cell centres). RoIAlign (aligned) of a
    linear map is exact: bin (i, j) of a box [x1, x2] x [y1, y2] pooled at S_k x S_k equals f at
    the bin centre in cell coordinates, x = x1 / s + (j + 0.5) (x2 - x1) / (s S_k) - 0.5.
    """
    strides, roi = [8, 16, 32], 8
    hp, wp = 256, 320
    feats = []
    for s in strides:
        h, w = hp // s, wp // s
        feats.append((torch.arange(w, dtype=torch.float32)[None, :] + 100 * torch.arange(h, dtype=torch.float32)[:, None])[None, None])
    box = (72.0, 40.0, 200.0, 168.0)  # inside the image, away from the borders
    rff = RoIFeatureFusion(strides, roi_size=roi, sampling_ratio=2)
    outs = rff.roi_features(feats, torch.tensor([[0.0, *box]]))
    for k, (s, out) in enumerate(zip(strides, outs)):
        size = roi >> k
        assert out.shape == (1, 1, size, size)
        j = torch.arange(size, dtype=torch.float32)
        cx = box[0] / s + (j + 0.5) * (box[2] - box[0]) / (s * size) - 0.5
        cy = box[1] / s + (j + 0.5) * (box[3] - box[1]) / (s * size) - 0.5
        torch.testing.assert_close(out[0, 0], cx[None, :] + 100 * cy[:, None], atol=1e-4, rtol=0)
    # the stride-8 scale applied to the stride-16 map would land elsewhere
    wrong = RoIFeatureFusion([8], roi_size=4, enabled=False).roi_features([feats[1]], torch.tensor([[0.0, *box]]))[0]
    assert not torch.allclose(wrong, outs[1], atol=1.0)


def test_model_pyramid_levels_and_strides():
    for config, names in (("MNv2_416.yaml", ["res3", "res4", "res5"]), ("R50_FPN_416.yaml", ["p3", "p4", "p5"])):
        extra = SMALL
        model = build_model(_cfg(config, extra)).eval()
        assert model.pyramid_features == names and model.rff.strides == [8, 16, 32]
        feats = model.backbone(torch.zeros(1, 3, 128, 192))
        for name, s in zip(names, model.rff.strides):
            assert tuple(feats[name].shape[-2:]) == (128 // s, 192 // s)
    model = build_model(_cfg("ablations/table9_without_rff.yaml", SMALL))
    assert model.pyramid_features == ["res3"] and len(model.mask_layers.layers) == 1 and not model.rff.enabled


# ----------------------------------------------------------------------------- IAM (Eq. 2)
@pytest.mark.parametrize("n", SLOT_COUNTS)
def test_slot_tensor_shape_for_every_n(n):
    g = slot_grid_size(n)
    assert g * g == n
    for confidence in (False, True):
        iam = InstanceAttentionModule(24, num_classes=7, num_slots=n, dim=16, confidence=confidence)
        slots = iam(torch.randn(2, 24, 13, 11))
        assert slots.shape == (2, n, 4 + 7 + int(confidence))
        parts = iam.split(slots)
        assert parts["box_logits"].shape == (2, n, 4) and parts["class_logits"].shape == (2, n, 7)
        assert (parts["confidence_logits"] is not None) == confidence
    assert sum(isinstance(m, torch.nn.Conv2d) for m in iam.modules()) == 9  # Sec. 4.3.1
    # whole model: the table-7 config gives (B, n, 4 + K) slots and one 32x32 mask per slot
    model = build_model(_cfg(f"ablations/table7_n{n}.yaml", SMALL, num_classes=3)).eval()
    with torch.no_grad():
        out = model.flops_forward(torch.randn(1, 3, 96, 128))
    assert out["slots"].shape == (1, n, 4 + 3) and out["pred_masks"].shape == (1, n, 32, 32)


def test_non_square_slot_count_is_rejected():
    with pytest.raises(ValueError, match="perfect square"):
        InstanceAttentionModule(8, num_classes=2, num_slots=30)
    with pytest.raises(KeyError, match="MODEL.FASSST.NOT_A_KEY"):
        _cfg(extra=["MODEL.FASSST.NOT_A_KEY", "1"])


def test_cell_reference_boxes_start_in_their_cells():
    ref = slot_reference_boxes(3)
    assert ref.shape == (9, 4)
    torch.testing.assert_close(ref[5], torch.tensor([1.25 / 3, 2.25 / 3, 1.75 / 3, 2.75 / 3]))  # slot 5 = row 1, col 2
    iam = InstanceAttentionModule(8, num_classes=2, num_slots=9, dim=8)
    torch.nn.init.zeros_(iam.predictor.weight)  # raw outputs = bias = 0 for the box channels
    slots = iam(torch.randn(1, 8, 6, 6))
    torch.testing.assert_close(slots[0, :, :4].sigmoid(), ref, atol=1e-6, rtol=0)
    # (t, l, b, r) -> xyxy pixels; swapped top/bottom still gives a valid box
    xyxy = tlbr_to_xyxy(torch.tensor([[0.5, 0.25, 0.1, 0.75]]), 100.0, 200.0)
    torch.testing.assert_close(xyxy, torch.tensor([[50.0, 10.0, 150.0, 50.0]]))


# ----------------------------------------------------------------------------- network head
def test_network_head_depths_and_backbone_extra_outputs():
    assert [head_feature_index(d) for d in (4, 5, 6)] == [13, 17, 18]
    assert [head_feature_index(d, "mobilenetv2_table") for d in (4, 5, 6)] == [6, 10, 13]
    with pytest.raises(ValueError, match="HEAD_DEPTH"):
        head_feature_index(7)
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        for depth, (ch, stride) in {4: (96, 16), 5: (320, 32), 6: (1280, 32)}.items():
            bb = build_fassst_mobilenet_v2_backbone(_cfg(extra=["MODEL.FASSST.HEAD_DEPTH", str(depth)])).eval()
            spec = bb.output_shape()["head"]
            e = bb(x)["head"]
            assert (spec.channels, spec.stride) == (ch, stride) and e.shape == (1, ch, 64 // stride, 96 // stride)
        bb = build_fassst_mobilenet_v2_backbone(_cfg(extra=["MODEL.FASSST.HEAD_STAGES", "mobilenetv2_table"])).eval()
        assert bb.output_shape()["head"].channels == 64 and bb(x)["head"].shape[-1] == 96 // 16
    # the IAM of the model reads E: its first conv takes E's channels
    model = build_model(_cfg(extra=SMALL + ["MODEL.FASSST.HEAD_DEPTH", "6"]))
    assert model.iam.pre_pool[0][0].in_channels == 1280
    with pytest.raises(ValueError, match="clashes"):
        MobileNetV2Backbone(norm="BN", extra_outputs={"res4": 3})
    with pytest.raises(ValueError, match="0..18"):
        MobileNetV2Backbone(norm="BN", extra_outputs={"x": 19})


# ----------------------------------------------------------------------------- losses, matcher
def test_focal_coordinate_loss_is_focal_loss_for_binary_targets_and_zero_at_target():
    logits = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0])
    for y in (0.0, 1.0):
        t = torch.full_like(logits, y)
        ref = sigmoid_focal_loss(logits, t, alpha=-1, gamma=2.0, reduction="none")  # no alpha weighting
        torch.testing.assert_close(focal_coordinate_loss(logits, t, 2.0), ref)
    p = torch.tensor([0.1, 0.35, 0.8])
    assert focal_coordinate_loss(torch.logit(p), p).abs().max() < 1e-6
    # it grows with the distance from the target
    losses = focal_coordinate_loss(torch.logit(torch.tensor([0.3, 0.5, 0.7, 0.9])), torch.full((4,), 0.3))
    assert (losses.diff() > 0).all()


def test_hungarian_assignment_picks_the_slots_that_fit():
    crit = FASSSTCriterion(num_classes=3)
    n = 9
    box = torch.full((1, n, 4), 0.0)
    box[0, :] = torch.logit(torch.tensor([0.4, 0.4, 0.6, 0.6]))  # every slot: a central box
    gt = torch.tensor([[0.1, 0.2, 0.3, 0.5], [0.6, 0.5, 0.9, 0.8]])  # (t, l, b, r)
    box[0, 7] = torch.logit(gt[0])
    box[0, 2] = torch.logit(gt[1])
    cls = torch.full((1, n, 3), -4.0)
    (src, tgt), = crit.match(box, cls, [{"labels": torch.tensor([1, 2]), "tlbr": gt}])
    assert dict(zip(src.tolist(), tgt.tolist())) == {2: 1, 7: 0}
    # a confident class wins over a slightly better box
    cls[0, 4, 1] = 6.0
    box[0, 4] = torch.logit(gt[0] + 0.02)
    (src, tgt), = crit.match(box, cls, [{"labels": torch.tensor([1, 2]), "tlbr": gt}])
    assert dict(zip(src.tolist(), tgt.tolist())) == {2: 1, 4: 0}
    # the "focal" location cost still finds exact boxes when the classes do not differ
    crit = FASSSTCriterion(num_classes=3, matcher_loc_cost="focal")
    cls = torch.full((1, n, 3), -4.0)
    (src, tgt), = crit.match(box, cls, [{"labels": torch.tensor([1, 2]), "tlbr": gt}])
    assert dict(zip(src.tolist(), tgt.tolist())) == {2: 1, 7: 0}
    with pytest.raises(ValueError, match="LOC_COST"):
        FASSSTCriterion(num_classes=3, matcher_loc_cost="l2")


def test_normalized_tlbr_and_mask_targets_in_boxes():
    torch.testing.assert_close(
        normalized_tlbr(torch.tensor([[16.0, 8.0, 48.0, 40.0]]), (64, 128)), torch.tensor([[0.125, 0.125, 0.625, 0.375]])
    )
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:48, 8:40] = True  # x 8..40, y 16..48
    t = mask_targets_in_boxes(masks, torch.tensor([0]), torch.tensor([[8.0, 16.0, 40.0, 48.0]]), 8)
    torch.testing.assert_close(t, torch.ones(1, 8, 8))
    # a box twice as wide to the right: the left half of the target is the object
    t = mask_targets_in_boxes(masks, torch.tensor([0]), torch.tensor([[8.0, 16.0, 72.0, 48.0]]), 8)
    assert t[0, :, :4].min() == 1 and t[0, :, 4:].max() == 0


def test_mask_tail_layouts_count_five_convs_and_one_deconv():
    for layout in ("mask_rcnn", "deconv_last"):
        tail = MaskTail(16, 16, layout=layout)
        convs = [m for m in tail.modules() if type(m) is torch.nn.Conv2d]
        deconvs = [m for m in tail.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
        assert len(convs) == 5 and len(deconvs) == 1
        assert tail(torch.randn(3, 16, 16, 16)).shape == (3, 32, 32)


def _toy_batch():
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 10:50, 20:70] = True
    masks[1, 50:90, 80:120] = True
    boxes = torch.tensor([[20.0, 10.0, 70.0, 50.0], [80.0, 50.0, 120.0, 90.0]])
    return [{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), "height": 96, "width": 128, "image_id": 1,
             "instances": {"labels": torch.tensor([0, 2]), "masks": masks, "boxes": boxes}}]


def test_training_losses_for_every_train_boxes_mode_and_empty_images():
    torch.manual_seed(0)
    model = build_model(_cfg(extra=SMALL, num_classes=3)).train()
    for train_boxes in ("predicted", "gt", "predicted+gt"):
        model.criterion.train_boxes = train_boxes
        model.zero_grad()
        losses = model(_toy_batch())
        assert set(losses) == {"loss_mask", "loss_loc", "loss_cls"}
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert model.mask_tail.predictor.weight.grad.abs().sum() > 0 and model.iam.predictor.weight.grad.abs().sum() > 0
    # an image without instances: mask and loc losses are 0, classification finite
    empty = _toy_batch()
    empty[0]["instances"] = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 96, 128, dtype=torch.bool),
                             "boxes": torch.zeros(0, 4)}
    losses = model(empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_loc"].item() == 0 and losses["loss_cls"].item() > 0


def test_loss_weights_come_from_the_config():
    torch.manual_seed(0)
    model = build_model(_cfg(extra=SMALL, num_classes=3)).eval()  # eval: BN fixed, same net twice

    def run(weights):
        model.criterion.weights.update(weights)
        images, _ = model.preprocess_images(_toy_batch())
        slots, pyramid = model._features(images)
        inst = _toy_batch()[0]["instances"]
        return model.criterion(model.iam.split(slots), [inst], tuple(images.shape[-2:]), lambda r: model.predict_masks(pyramid, r))

    a = run({"loss_mask": 5.75, "loss_loc": 3.0, "loss_cls": 1.25})
    b = run({"loss_mask": 1.0, "loss_loc": 1.0, "loss_cls": 1.0})
    for k, w in (("loss_mask", 5.75), ("loss_loc", 3.0), ("loss_cls", 1.25)):
        assert a[k].item() == pytest.approx(w * b[k].item(), rel=1e-5)


# ----------------------------------------------------------------------------- inference contract
def test_inference_contract_original_size():
    torch.manual_seed(0)
    model = build_model(_cfg(extra=SMALL + ["MODEL.FASSST.SCORE_THRESHOLD", "0.0", "MODEL.FASSST.NUM_SLOTS", "16"], num_classes=4)).eval()
    batch = [{"image": torch.randint(0, 255, (3, 96, 130), dtype=torch.uint8), "height": 200, "width": 270, "image_id": 1},
             {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64, "image_id": 2}]
    with torch.no_grad():
        outs = model(batch)
    for out, x in zip(outs, batch):
        k = out["scores"].shape[0]
        assert k == 16  # every slot passes a 0 threshold
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        assert out["labels"].dtype == torch.int64 and out["labels"].max() < 4
        assert out["masks"].dtype == torch.bool and out["masks"].shape == (k, x["height"], x["width"])
        b = out["boxes"]
        assert b.shape == (k, 4) and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
        assert b[:, 2].max() <= x["width"] + 1e-3 and b[:, 3].max() <= x["height"] + 1e-3
        # masks stay inside their boxes
        for m, bb in zip(out["masks"], b):
            if m.any():
                ys, xs = m.nonzero(as_tuple=True)
                assert xs.min() >= bb[0].floor() - 1 and xs.max() <= bb[2].ceil() and ys.max() <= bb[3].ceil()
    model.score_threshold = 1.1  # nothing passes: empty but well-formed
    with torch.no_grad():
        out = model(batch[:1])[0]
    assert out["masks"].shape == (0, 200, 270) and out["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------- real data
def test_short_real_data_training_loss_falls(shared_data):
    """FASSST from scratch (MobileNetV2 with BN) on 2 real fruits_nuts training images."""
    from instseg.data.coco import load_coco_json
    from instseg.data.mapper import DatasetMapper

    root = shared_data / "fruits_nuts"
    if not (root / "annotations_train.json").is_file():
        pytest.skip("fruits_nuts missing")
    cfg = _cfg(extra=SMALL + ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.RANDOM_FLIP", "none",
                              "MODEL.FASSST.NUM_SLOTS", "16", "MODEL.FASSST.RFF.ROI_SIZE", "8"], num_classes=3)
    dicts = load_coco_json(str(root / "annotations_train.json"), str(root / "images"))[:2]
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in dicts]
    assert all(len(x["instances"]["labels"]) > 0 for x in batch)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(20):
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    print("FASSST real-data losses:", [round(t, 3) for t in totals])
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < 0.8 * first, (first, last, totals)
