"""``internals()`` of the four models (instseg.modeling.internals, each model's package), the grid
renderer (instseg.utils.visualize.draw_internals) and ``instseg-demo --show-internals``.

Each model runs with random weights on one real coco128-seg image (``../shared/data``; skipped
when missing) at a small test size. ``internals`` must return exactly the outputs of
``model(batch)`` and panels that equal a recomputation from the model's own outputs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instseg.modeling.internals import heatmaps_panel, points_panel, boxes_panel, select_kept

REPO = Path(__file__).resolve().parents[1]
# small: test size, and at most 8 instances (the RoI mask heads run on fewer boxes)
SMALL = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160", "TEST.DETECTIONS_PER_IMAGE", "8"]
CONFIGS = {
    "SparseInst": ("configs/sparseinst/R50_giam.yaml", ["MODEL.RESNETS.NORM", "BN"]),
    # E4 (1/16) must hold N_a = 100 query pixels: 160 x 224 -> 10 x 14
    "FastInst": ("configs/fastinst/R50_D3_640.yaml", ["MODEL.RESNETS.NORM", "BN", "INPUT.MIN_SIZE_TEST", "160",
                                                      "INPUT.MAX_SIZE_TEST", "224"]),
    # random weights score ~0.01 (the prior), below SCORE_THRESHOLD 0.05: keep every slot
    "FASSST": ("configs/fassst/MNv2_416.yaml", ["MODEL.FASSST.SCORE_THRESHOLD", "0.0"]),
    "QueryInst": ("configs/queryinst/R50_FPN_100q_1x.yaml", ["MODEL.RESNETS.NORM", "BN", "MODEL.QUERY_INST.NUM_PROPOSALS", "20"]),
}


def _predictor(name: str):
    from instseg.engine import Predictor

    cfg, extra = CONFIGS[name]
    return Predictor.from_config_file(str(REPO / cfg), SMALL + extra, weights="", allow_random=True)


def _run(name: str, image_path):
    """(model, input dict, model([inp])[0], internals of it, threshold): the threshold is the
    second-highest score, so that exactly the top rows are kept."""
    pred = _predictor(name)
    model = pred.model
    inp = pred.preprocess(str(image_path))
    with torch.no_grad():
        ref = model([inp])[0]
    scores = ref["scores"].sort(descending=True).values
    thr = float(scores[min(1, scores.numel() - 1)])
    out = model.internals([inp], score_threshold=thr)
    assert len(out) == 1
    return model, inp, ref, out[0], thr


def _same_result(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def _sizes(model, inp):
    images, sizes = model.preprocess_images([inp])
    return images, sizes[0], tuple(images.shape[-2:]), (inp["height"], inp["width"])


# ------------------------------------------------------------------------------------- core

def test_select_kept_threshold_cap_and_fallback():
    s = torch.tensor([0.2, 0.9, 0.5, 0.7, 0.1])
    assert select_kept(s, 0.5).tolist() == [1, 3, 2]
    assert select_kept(s, 0.5, max_instances=2).tolist() == [1, 3]
    assert select_kept(s, 0.95).tolist() == [1, 3, 2]  # none passes: the 3 highest
    assert select_kept(s, 0.95, min_instances=1).tolist() == [1]
    assert select_kept(torch.zeros(0), 0.5).numel() == 0
    with pytest.raises(ValueError):
        select_kept(s, 0.5, max_instances=0)


def test_base_internals_names_the_model():
    from instseg.modeling import MetaArchBase

    class Dummy(MetaArchBase):
        pass

    m = Dummy([0, 0, 0], [1, 1, 1], 32)
    assert not Dummy.has_internals()
    with pytest.raises(NotImplementedError, match="Dummy does not implement internals"):
        m.internals([])


def _handmade(h=40, w=60):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 5:20, 5:30] = True
    masks[1, 20:35, 30:55] = True
    result = {"scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([0, 1]), "masks": masks,
              "boxes": torch.tensor([[5.0, 5, 30, 20], [30, 20, 55, 35]])}
    maps = torch.stack([torch.ones(4, 6), torch.zeros(4, 6), torch.full((4, 6), 0.5)])
    panels = [
        heatmaps_panel("maps", maps, (w, h), instances=[0, 1, -1]),
        points_panel("points", torch.tensor([[10.0, 10], [50, 30], [500, 500]]), values=[0.1, 0.9, 0.5],
                     instances=[0, -1, -1]),
        boxes_panel("boxes", torch.tensor([[5.0, 5, 30, 20], [0, 0, 10, 10]]), instances=[0, -1]),
    ]
    return np.full((h, w, 3), 128, np.uint8), {"result": result, "panels": panels}


def test_draw_internals_tiles_layout_and_content(tmp_path):
    import cv2

    from instseg.utils.visualize import TILE_TITLE_PX, TILE_WIDTH_PX, draw_internals, internals_grid_shape

    image, internals = _handmade()
    # overlay + 3 maps + points + boxes = 6 tiles: 2 rows of 4
    assert internals_grid_shape(internals) == (6, 2, 4)
    assert internals_grid_shape(internals, ncols=3) == (6, 2, 3)
    assert internals_grid_shape(internals, ncols=10) == (6, 1, 6)
    path = draw_internals(image, internals, tmp_path / "g" / "grid.png")
    png = cv2.imread(path)
    tile_h = round(TILE_WIDTH_PX * 40 / 60) + TILE_TITLE_PX
    assert png.shape == (2 * tile_h, 4 * TILE_WIDTH_PX, 3)
    # tile k's image centre: a map of ones is blended (alpha 0.5) with jet's dark red (0.5, 0, 0)
    # over the gray 128, of zeros with dark blue (0, 0, 0.5): (127, 64, 64) and (64, 64, 127) RGB
    def centre(k, ncols=4):
        r, c = divmod(k, ncols)
        return png[r * tile_h + TILE_TITLE_PX + (tile_h - TILE_TITLE_PX) // 2, c * TILE_WIDTH_PX + TILE_WIDTH_PX // 2]
    b1, g1, r1 = (int(v) for v in centre(1))
    b0, g0, r0 = (int(v) for v in centre(2))
    assert abs(r1 - 127) <= 3 and abs(g1 - 64) <= 3 and abs(b1 - 64) <= 3, centre(1)
    assert abs(b0 - 127) <= 3 and abs(g0 - 64) <= 3 and abs(r0 - 64) <= 3, centre(2)
    # the last two tiles of row 2 (7th, 8th) are empty: white
    assert (png[tile_h + TILE_TITLE_PX:, 2 * TILE_WIDTH_PX:] == 255).all()
    # the gray image is left as it is outside drawn things (points/boxes tile corner far from them)
    assert np.abs(centre(4).astype(int) - 128).max() <= 2


def test_draw_internals_rejects_malformed_panels(tmp_path):
    from instseg.utils.visualize import draw_internals

    image, internals = _handmade()
    with pytest.raises(ValueError, match="unknown internals panel kind"):
        draw_internals(image, {"result": internals["result"], "panels": [{"kind": "nope"}]}, tmp_path / "x.png")
    with pytest.raises(KeyError, match="panels"):
        draw_internals(image, {"result": internals["result"]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 instance rows for 3"):
        heatmaps_panel("m", torch.zeros(3, 2, 2), (2, 2), instances=[0, 1])


# ------------------------------------------------------------------------------------- models

def test_sparseinst_internals_are_the_iam_of_the_kept_instances(coco128_three_images):
    model, inp, ref, it, thr = _run("SparseInst", coco128_three_images[0])
    _same_result(it["result"], ref)
    images, size, padded, out_size = _sizes(model, inp)
    model.decoder.output_iam = True
    try:
        with torch.no_grad():
            dec = model.flops_forward(images)
    finally:
        model.decoder.output_iam = False
    # the selection of inference, recomputed: rescored probabilities, > CLS_THRESHOLD, top-k
    probs = torch.sqrt(dec["pred_logits"].sigmoid() * dec["pred_scores"].sigmoid())[0]
    s, labels = probs.max(-1)
    keep = (s > model.cls_threshold).nonzero(as_tuple=True)[0]
    query = keep[s[keep].topk(min(model.detections_per_image, keep.numel())).indices]
    assert torch.equal(labels[query], ref["labels"])
    (panel,) = it["panels"]
    rows = panel["instances"]
    assert rows.tolist() == select_kept(ref["scores"], thr).tolist() and rows.numel() >= 1
    assert (ref["scores"][rows] >= thr).all()
    g = model.decoder.inst_branch.groups
    assert g == 4  # R50_giam: Group-IAM
    iam = dec["pred_iam"][0].sigmoid()  # (N*G, h, w)
    n = iam.shape[0] // g
    want = iam.view(g, n, *iam.shape[-2:]).mean(0)[query[rows]]
    hv, wv = -(-size[0] * iam.shape[-2] // padded[0]), -(-size[1] * iam.shape[-1] // padded[1])
    assert panel["maps"].shape == (rows.numel(), hv, wv)
    assert torch.allclose(panel["maps"], want[:, :hv, :wv], atol=1e-6)
    assert panel["extent"][0] >= out_size[1] - 1e-3 and panel["extent"][1] >= out_size[0] - 1e-3


def test_fastinst_internals_query_pixels_and_cross_attention(coco128_three_images):
    model, inp, ref, it, thr = _run("FastInst", coco128_three_images[0])
    _same_result(it["result"], ref)
    images, size, padded, out_size = _sizes(model, inp)
    dec = model.sem_seg_head.predictor
    captured = {}

    def grab(m, args, kwargs, out):
        captured["args"], captured["kwargs"] = args, kwargs

    hook = dec.transformer_query_cross_attention_layers[-1].multihead_attn.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            outputs = model.sem_seg_head(model.backbone(images))
    finally:
        hook.remove()
    points, attn_panel, aux_panel = it["panels"]
    assert (points["kind"], attn_panel["kind"], aux_panel["kind"]) == ("points", "heatmaps", "heatmaps")
    # IA-guided query pixels, recomputed by hand from the auxiliary classifier's score map
    p = outputs["proposal_logits"][0].softmax(0)
    fg = p[:-1]
    best = fg.argmax(0)
    score = fg.amax(0)
    planes = torch.zeros_like(fg).scatter_(0, best[None], score[None])
    local_max = ((planes >= F.max_pool2d(planes[None], 3, 1, 1)[0]) & (planes >= 1e-6)).any(0)
    idx = (score + local_max.float()).flatten().topk(dec.num_queries).indices
    h4, w4 = p.shape[-2:]
    sx, sy = out_size[1] / size[1], out_size[0] / size[0]
    want = torch.stack([((idx % w4) + 0.5) * padded[1] / w4 * sx, ((idx // w4) + 0.5) * padded[0] / h4 * sy], 1)
    assert torch.allclose(points["points"], want.float(), atol=1e-3)
    assert torch.allclose(points["values"], score.flatten()[idx], atol=1e-6)
    # the kept rows' queries (inference's top-k of (query, class) pairs, recomputed)
    probs = outputs["pred_logits"][0].softmax(-1)[:, :-1]
    k = probs.shape[1]
    queries = probs.flatten().topk(min(model.detections_per_image, probs.numel())).indices // k
    rows = attn_panel["instances"]
    assert rows.tolist() == select_kept(ref["scores"], thr).tolist()
    marked = points["instances"]
    for r in rows.tolist():
        assert queries[marked[queries[r]]] == queries[r] and marked[queries[r]] in rows.tolist()
    assert ((marked >= 0).sum()) == len(set(queries[rows].tolist()))
    # last dual-path layer's query-to-pixel cross-attention, recomputed per head and averaged
    mha = dec.transformer_query_cross_attention_layers[-1].multihead_attn
    with torch.no_grad():
        _, w_heads = mha(*captured["args"], **{**captured["kwargs"], "need_weights": True, "average_attn_weights": False})
    h3, w3 = outputs["pred_masks"].shape[-2:]
    attn = w_heads[0].mean(0).view(-1, h3, w3)
    attn = attn / attn.flatten(1).amax(1)[:, None, None]
    hv, wv = attn_panel["maps"].shape[-2:]
    assert (hv, wv) == (-(-size[0] * h3 // padded[0]), -(-size[1] * w3 // padded[1]))
    assert torch.allclose(attn_panel["maps"], attn[queries[rows]][:, :hv, :wv], atol=1e-5)
    assert aux_panel["maps"].shape[0] == dec.num_aux_queries == 8
    assert torch.allclose(aux_panel["maps"], attn[dec.num_queries:][:, :hv, :wv], atol=1e-5)
    assert (aux_panel["instances"] == -1).all()


def test_fassst_internals_slot_boxes(coco128_three_images):
    from fassst.instance_attention import tlbr_to_xyxy

    model, inp, ref, it, thr = _run("FASSST", coco128_three_images[0])
    _same_result(it["result"], ref)
    images, size, padded, out_size = _sizes(model, inp)
    with torch.no_grad():
        slots, _ = model._features(images)
    (panel,) = it["panels"]
    n = model.iam.num_slots
    assert panel["kind"] == "boxes" and panel["boxes"].shape == (n, 4)
    sx, sy = out_size[1] / size[1], out_size[0] / size[0]
    want = tlbr_to_xyxy(slots[0, :, :4].sigmoid(), padded[0], padded[1]) * torch.tensor([sx, sy, sx, sy])
    assert torch.allclose(panel["boxes"], want, atol=1e-3)
    # a kept slot's output box is its slot box clipped to the image
    slot_rows = panel["instances"]
    kept = select_kept(ref["scores"], thr)
    assert sorted(slot_rows[slot_rows >= 0].tolist()) == sorted(kept.tolist())
    for s in (slot_rows >= 0).nonzero().flatten().tolist():
        b = panel["boxes"][s].clone()
        b[0::2] = b[0::2].clamp(0, out_size[1])
        b[1::2] = b[1::2].clamp(0, out_size[0])
        assert torch.allclose(b, ref["boxes"][slot_rows[s]], atol=1e-3)


def test_queryinst_internals_boxes_per_stage(coco128_three_images):
    model, inp, ref, it, thr = _run("QueryInst", coco128_three_images[0])
    _same_result(it["result"], ref)
    images, size, padded, out_size = _sizes(model, inp)
    with torch.no_grad():
        stages = model.roi_head.forward_boxes(model._features(images), torch.tensor([list(size)]))
    s = len(stages)
    assert s == 6 and len(it["panels"]) == s + 1
    assert [p["title"] for p in it["panels"]][1:] == [f"stage {t} of {s} boxes" for t in range(1, s + 1)]
    rows = select_kept(ref["scores"], thr)
    k = stages[-1]["logits"].shape[-1]
    query = stages[-1]["logits"][0].sigmoid().flatten().topk(min(model.detections_per_image, k * 20)).indices // k
    scale = torch.tensor([out_size[1] / size[1], out_size[0] / size[0]] * 2)
    for t, panel in enumerate(it["panels"][1:]):
        assert panel["instances"].tolist() == rows.tolist()
        assert torch.allclose(panel["boxes"], stages[t]["boxes"][0][query[rows]] * scale, atol=1e-3)
    last = it["panels"][-1]["boxes"].clone()
    last[:, 0::2] = last[:, 0::2].clamp(0, out_size[1])
    last[:, 1::2] = last[:, 1::2].clamp(0, out_size[0])
    assert torch.allclose(last, ref["boxes"][rows], atol=1e-3)
    # the proposals are the learnable initial boxes, the whole image at initialization
    assert torch.allclose(it["panels"][0]["boxes"], torch.tensor([[0.0, 0, out_size[1], out_size[0]]]).expand(rows.numel(), 4), atol=1e-3)


# ------------------------------------------------------------------------------------- demo

# the demo tests run FASSST MNv2 (the fastest model): overlay + the slot-boxes tile
DEMO_OPTS = [*SMALL, *CONFIGS["FASSST"][1]]
FASSST = str(REPO / CONFIGS["FASSST"][0])
SPARSEINST = str(REPO / CONFIGS["SparseInst"][0])


def test_demo_show_internals_on_images(coco128_three_images, tmp_path):
    import cv2

    from instseg.tools.demo import run
    from instseg.utils.visualize import TILE_TITLE_PX, TILE_WIDTH_PX

    out = tmp_path / "out"
    written = run(["--config-file", FASSST, "--random-weights", "--show-internals", "--output", str(out),
                   "--input", *[str(p) for p in coco128_three_images], *DEMO_OPTS])
    for p in coco128_three_images:
        grid, overlay = out / f"{p.stem}_internals.png", out / f"{p.stem}.png"
        assert str(grid) in written and str(overlay) in written
        img, png = cv2.imread(str(p)), cv2.imread(str(grid))
        h, w = img.shape[:2]
        tile_h = round(TILE_WIDTH_PX * h / w) + TILE_TITLE_PX
        # one row: the prediction overlay and the slot-boxes tile
        assert png.shape == (tile_h, 2 * TILE_WIDTH_PX, 3)
        assert png.std() > 10  # a picture, not a blank page


def test_demo_show_internals_on_a_video_every_period_frames(coco128_three_images, tmp_path):
    import cv2

    from instseg.tools.demo import run

    frames = [cv2.resize(cv2.imread(str(p)), (160, 120)) for p in coco128_three_images]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (160, 120))
    for i in range(5):
        writer.write(frames[i % 3])
    writer.release()
    out = tmp_path / "out"
    written = run(["--config-file", FASSST, "--random-weights", "--show-internals", "--internals-period", "2",
                   "--output", str(out), "--input", str(video), *DEMO_OPTS])
    grids = sorted((out / "clip_internals").iterdir())
    assert [g.name for g in grids] == ["frame_000000.png", "frame_000002.png", "frame_000004.png"]
    assert all(cv2.imread(str(g)) is not None for g in grids)
    assert str(out / "clip.mp4") in written and all(str(g) in written for g in grids)


def test_demo_show_internals_errors(monkeypatch, capsys, tmp_path):
    import instseg.modeling
    from instseg.modeling import MetaArchBase
    from instseg.tools.demo import run
    from sparseinst.sparseinst import SparseInst

    with pytest.raises(SystemExit):
        run(["--config-file", FASSST, "--random-weights", "--show-internals", "--input", "x.jpg", *DEMO_OPTS])
    assert "--show-internals writes PNG files: give --output" in capsys.readouterr().err
    # a model without internals: a clear error before the model is built
    monkeypatch.setattr(SparseInst, "internals", MetaArchBase.internals)

    def no_build(cfg):
        raise AssertionError("the model was built")

    monkeypatch.setattr(instseg.modeling, "build_model", no_build)
    with pytest.raises(SystemExit):
        run(["--config-file", SPARSEINST, "--random-weights", "--show-internals", "--output", str(tmp_path),
             "--input", "x.jpg", *SMALL])
    assert "SparseInst does not implement internals()" in capsys.readouterr().err
