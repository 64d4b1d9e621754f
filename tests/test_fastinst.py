"""FastInst: local-maximum-first query selection on a hand-made probability map, the location cost,
GT-mask-guided attention masks, shared point sampling / PPM-FPN, output shapes and loss terms of
D1/D3 and every supplement Table I column, parameter counts and official checkpoint conversion
(tests/refs), and a short real-data training run whose loss falls."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from init_checks import assert_pytorch_default_conv_init
import torch
import torch.nn.functional as F

import fastinst  # noqa: F401  (registers the meta-architecture and config keys)
from fastinst.criterion import FastInstCriterion
from fastinst.matcher import MaskLocationMatcher, location_cost
from fastinst.point_sample import point_sample, uncertain_point_coords_with_randomness
from fastinst.ppm_fpn import PPMFPN
from fastinst.query_proposal import QueryProposal, select_query_pixels
from fastinst.transformer_decoder import FastInstDecoder, Mask2FormerLightDecoder, sine_position_embedding
from instseg.checkpoint import load_state_dict_with_report
from instseg.config import setup_cfg
from instseg.convert import convert_official_state_dict, convert_with_report, official_keys_from_ref
from instseg.modeling import build_model

REPO = Path(__file__).resolve().parents[1]
REFS = Path(__file__).resolve().parent / "refs"
CFG = REPO / "configs" / "fastinst"


def _n(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------ local-maximum-first selection
def _hand_made_probs():
    """(1, 3, 6, 8): two foreground classes + background; each pixel has one foreground class.

    class 0 "salient object": (1,1)=.9 (1,2)=.85 (2,1)=.8 (2,2)=.75
    class 1: (2,3)=.6 (touches the class-0 object but is the maximum of its own plane),
             weak object (4,6)=.5 (4,5)=.45
    class 0: (5,0)=.3 (background is this pixel's most likely class, its best foreground is 0.3)
    """
    fg = torch.zeros(2, 6, 8)
    for (y, x), p in {(1, 1): 0.9, (1, 2): 0.85, (2, 1): 0.8, (2, 2): 0.75, (5, 0): 0.3}.items():
        fg[0, y, x] = p
    for (y, x), p in {(2, 3): 0.6, (4, 6): 0.5, (4, 5): 0.45}.items():
        fg[1, y, x] = p
    bg = 1 - fg.sum(0, keepdim=True)
    return torch.cat([fg, bg])[None]


def _flat(*yx, w=8):
    return [y * w + x for y, x in yx]


def test_local_maximum_first_selection_hand_made_map():
    probs = _hand_made_probs()
    # local maxima of each pixel's own class plane first, by foreground probability
    assert select_query_pixels(probs, 3, True)[0].tolist() == _flat((1, 1), (2, 3), (4, 6))
    assert select_query_pixels(probs, 5, True)[0].tolist() == _flat((1, 1), (2, 3), (4, 6), (5, 0), (1, 2))
    # without it the salient object takes every query
    assert select_query_pixels(probs, 3, False)[0].tolist() == _flat((1, 1), (1, 2), (2, 1))
    with pytest.raises(ValueError, match="fewer than NUM_OBJECT_QUERIES"):
        select_query_pixels(probs, 49, True)


def test_query_proposal_gathers_features_positions_locations():
    torch.manual_seed(0)
    qp = QueryProposal(in_channels=4, num_queries=3, num_classes=2)
    probs = _hand_made_probs()
    x = probs.log().clamp(min=-30)  # softmax(log p) = p (up to the clamp of log 0)
    x = torch.cat([x, torch.randn(1, 1, 6, 8)], dim=1)  # 4 channels: 3 logits + 1 extra
    qp.conv_proposal_cls_logits = _FirstChannels(3)  # feed the hand-made map as the classifier's logits
    pos = torch.randn(1, 4, 6, 8)
    out = qp(x, pos)
    yx = [(1, 1), (2, 3), (4, 6)]
    assert out["indices"][0].tolist() == _flat(*yx)
    for i, (y, xx) in enumerate(yx):
        torch.testing.assert_close(out["features"][0, i], x[0, :, y, xx])
        torch.testing.assert_close(out["pos"][0, i], pos[0, :, y, xx])
        torch.testing.assert_close(out["locations"][0, i], torch.tensor([xx / 7, y / 5]))
    assert out["logits"].shape == (1, 3, 6, 8)


class _FirstChannels(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x[:, : self.n]


# ------------------------------------------------------------------ location cost
def _gt(masks, labels):
    return {"masks": masks, "labels": torch.tensor(labels)}


def test_location_cost_values():
    m = torch.zeros(2, 16, 16, dtype=torch.bool)
    m[0, :8, :8] = True
    m[1, 8:, 8:] = True
    # pixel centres of the 16x16 map
    loc = torch.tensor([[2.5 / 16, 3.5 / 16], [12.5 / 16, 10.5 / 16], [12.5 / 16, 2.5 / 16]])
    assert location_cost(loc, m).tolist() == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]


def test_query_outside_every_gt_mask_is_never_matched():
    torch.manual_seed(0)
    h = w = 32
    gt = torch.zeros(2, h, w, dtype=torch.bool)
    gt[0, 4:14, 2:12] = True
    gt[1, 18:30, 4:14] = True
    n_q = 5
    logits = torch.zeros(n_q, 4)  # K = 3 + no-object
    masks = torch.full((n_q, h // 4, w // 4), -5.0)  # poor masks
    # queries 0 and 1 lie inside GT 0 / GT 1 but predict poorly
    loc = torch.tensor([[7 / 32, 9 / 32], [9 / 32, 24 / 32], [0.8, 0.2], [0.9, 0.9], [0.7, 0.5]])
    # queries 2-4 lie outside every GT mask but predict both instances perfectly
    for q in (2, 3, 4):
        logits[q, :3] = torch.tensor([10.0, 10.0, -10.0])
        masks[q] = torch.where(F.interpolate(gt[(q % 2)][None, None].float(), size=(8, 8))[0, 0] > 0, 10.0, -10.0)
    tgt = [_gt(gt, [0, 1])]
    with_loc = MaskLocationMatcher(num_points=500)
    (src, tgt_idx), = with_loc(logits[None], masks[None], tgt, loc[None])
    assert sorted(src.tolist()) == [0, 1]
    assert dict(zip(src.tolist(), tgt_idx.tolist())) == {0: 0, 1: 1}
    # the location cost is what keeps them out: without it the better outside queries win
    (src, _), = MaskLocationMatcher(cost_location=0.0, num_points=500)(logits[None], masks[None], tgt, loc[None])
    assert set(src.tolist()) <= {2, 3, 4}


def test_proposal_matching_picks_a_pixel_inside_the_mask():
    gt = torch.zeros(1, 32, 32, dtype=torch.bool)
    gt[0, 0:12, 0:12] = True  # E4 (4x4 here) pixels (0,0), (0,1), (1,0), (1,1) are inside
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 0, 3, 3] = 8.0  # a confident pixel outside the object
    logits[0, 0, 1, 1] = 1.0
    (pix, t), = MaskLocationMatcher().match_pixels(logits, [_gt(gt, [0])])
    assert pix.tolist() == [5] and t.tolist() == [0]  # (1, 1)
    (pix, _), = MaskLocationMatcher(cost_location=0.0).match_pixels(logits, [_gt(gt, [0])])
    assert pix.tolist() == [15]  # (3, 3) without the location cost


# ------------------------------------------------------------------ GT-mask-guided attention
def _record_memory_masks(decoder, layers):
    calls = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        orig = layer.forward

        def fwd(tgt, memory, memory_mask=None, pos=None, query_pos=None, _i=i, _orig=orig):
            calls[_i].append(None if memory_mask is None else memory_mask.clone())
            return _orig(tgt, memory, memory_mask=memory_mask, pos=pos, query_pos=query_pos)

        layer.forward = fwd
    return calls


def _small_targets():
    gt = torch.zeros(2, 64, 64, dtype=torch.bool)
    gt[0, 0:32, 16:48] = True  # aligned to the 8-pixel grid of E3, non-empty down to E5 (2x2)
    gt[1, 32:64, 0:32] = True
    return [{"labels": torch.tensor([0, 2]), "masks": gt}]


@pytest.mark.parametrize("dual_path", [True, False])
def test_gt_mask_guided_attention_masks_equal_matched_gt_masks(dual_path):
    torch.manual_seed(0)
    nq, naux, heads, d = 6, 2, 4, 2
    kw = dict(num_classes=3, hidden_dim=32, num_queries=nq, num_aux_queries=naux, nheads=heads, dim_feedforward=64,
              dec_layers=d, mask_dim=32, gt_mask_guided=True, ia_guided_queries=True)
    dec = (FastInstDecoder if dual_path else Mask2FormerLightDecoder)(
        **kw, criterion=FastInstCriterion(3, MaskLocationMatcher(num_points=300))).train()
    layers = dec.transformer_query_cross_attention_layers if dual_path else dec.transformer_cross_attention_layers
    calls = _record_memory_masks(dec, layers)
    feats = [torch.randn(1, 32, 2, 2), torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8)]  # E5, E4, E3 of 64x64
    targets = _small_targets()
    out = dec(feats, targets)
    (src, tgt), = out["aux_outputs"][0]["pred_matching_indices"]  # the decoder's matching for the guidance
    assert len(src) == 2
    sizes = [(8, 8)] * d if dual_path else [(2, 2), (4, 4)]  # Mask2Former: layer i on level i % 3
    for i in range(d):
        assert len(calls[i]) == 2  # the regular pass, then the GT-guided pass
        guided = calls[i][1].view(1, heads, nq + naux, -1)
        assert all(torch.equal(guided[:, 0], guided[:, h]) for h in range(heads))
        blocked = guided[0, 0]
        step = 64 // sizes[i][0]
        for q in range(nq + naux):
            if q in src.tolist():
                gt_small = targets[0]["masks"][tgt[src.tolist().index(q)], ::step, ::step]
                assert gt_small.any() and not gt_small.all()
                assert torch.equal(~blocked[q], gt_small.flatten()), (i, q)
            else:  # unmatched and auxiliary queries attend everywhere
                assert not blocked[q].any(), (i, q)
        # the guided predictions reuse the last layer's matching; the final output carries none
        assert out["aux_outputs"][i]["pred_matching_indices"] is out["aux_outputs"][0]["pred_matching_indices"]
    assert out["pred_matching_indices"] is None
    assert all(a["pred_matching_indices"] is None for a in out["aux_outputs"][d:])
    # regular pass: layer 1 masks what the previous head predicted (logit < 0), aux never masked
    prev = out["aux_outputs"][d + 1]["pred_masks"].detach()  # layer 0's prediction
    if not dual_path:
        prev = F.interpolate(prev, size=sizes[1], mode="bilinear", align_corners=False)
    expect = (prev[0] < 0).flatten(1)
    expect[expect.all(-1)] = False
    regular = calls[1][0].view(1, heads, nq + naux, -1)[0, 0]
    assert torch.equal(regular[:nq], expect) and not regular[nq:].any()


class _CountingMatcher(MaskLocationMatcher):
    """Records every query matching (its inputs and the indices it returned) and every pixel matching."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls, self.pixel_calls = [], 0

    def forward(self, pred_logits, pred_masks, targets, query_locations=None):
        indices = super().forward(pred_logits, pred_masks, targets, query_locations)
        self.calls.append({"logits": pred_logits.detach().clone(), "masks": pred_masks.detach().clone(),
                           "locations": None if query_locations is None else query_locations.clone(),
                           "indices": indices})
        return indices

    def match_pixels(self, pixel_logits, targets):
        self.pixel_calls += 1
        return super().match_pixels(pixel_logits, targets)


def _official_reference_losses(crit, out, targets):
    """Official ``SetCriterion.forward`` assembled by hand from the criterion's parts: proposals
    first; the final output is matched anew (its ``pred_matching_indices`` is None); each
    auxiliary output reuses its ``pred_matching_indices`` if it has them, else is matched; per
    output: match, class loss, mask losses (that order of random draws)."""
    w, loc = crit.weights, out["query_locations"]
    ref = {}
    if out["proposal_logits"] is not None:
        proposal = crit.loss_proposals(out["proposal_logits"], targets) * w["loss_proposal"]
    num_masks = float(sum(len(t["labels"]) for t in targets))
    groups = [("", out, None)] + [(f"_{i}", a, a["pred_matching_indices"]) for i, a in enumerate(out["aux_outputs"])]
    for suffix, o, given in groups:
        indices = given if given is not None else MaskLocationMatcher.forward(
            crit.matcher, o["pred_logits"].detach(), o["pred_masks"].detach(), targets, loc)
        ref["loss_cls" + suffix] = crit.loss_labels(o["pred_logits"], targets, indices) * w["loss_cls"]
        for k, v in crit.loss_masks(o["pred_masks"], targets, indices, num_masks).items():
            ref[k + suffix] = v * w[k]
    if out["proposal_logits"] is not None:
        ref["loss_proposal"] = proposal
    return ref


@pytest.mark.parametrize("dual_path", [True, False])
def test_matcher_calls_and_losses_follow_the_official_flow(dual_path):
    """Official flow (fastinst_decoder.py forward / forward_prediction_heads, criterion.py
    SetCriterion.forward): the decoder matches the last layer once for the GT guidance; the
    criterion matches the proposals, then the final output again, then every unguided auxiliary
    output; the D guided outputs reuse the decoder's matching. D + 2 query matchings in all."""
    nq, naux, d = 6, 2, 3
    matcher = _CountingMatcher(num_points=300)
    crit = FastInstCriterion(3, matcher, num_points=200)
    dec = (FastInstDecoder if dual_path else Mask2FormerLightDecoder)(
        num_classes=3, hidden_dim=32, num_queries=nq, num_aux_queries=naux, nheads=4, dim_feedforward=64,
        dec_layers=d, mask_dim=32, gt_mask_guided=True, ia_guided_queries=True, criterion=crit).train()
    torch.manual_seed(1)
    feats = [torch.randn(1, 32, 2, 2), torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8)]
    targets = _small_targets()

    torch.manual_seed(5)
    out = dec(feats, targets)
    assert len(matcher.calls) == 1 and matcher.pixel_calls == 0  # the guidance matching
    guide = matcher.calls[0]
    torch.testing.assert_close(guide["logits"], out["pred_logits"].detach(), rtol=0, atol=0)  # the last layer
    torch.testing.assert_close(guide["masks"], out["pred_masks"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(guide["locations"], out["query_locations"], rtol=0, atol=0)
    assert out["pred_matching_indices"] is None
    assert all(a["pred_matching_indices"] is guide["indices"] for a in out["aux_outputs"][:d])
    assert all(a["pred_matching_indices"] is None for a in out["aux_outputs"][d:])
    losses = crit(out, targets)
    rng_after = torch.get_rng_state()
    assert matcher.pixel_calls == 1
    assert len(matcher.calls) == 1 + 1 + d  # guidance + final + (initial and first D - 1 layers)
    # the criterion's first query matching is the final output again (the last layer matched twice)
    expect_inputs = [out] + out["aux_outputs"][d:]
    for call, o in zip(matcher.calls[1:], expect_inputs):
        torch.testing.assert_close(call["logits"], o["pred_logits"].detach(), rtol=0, atol=0)
        torch.testing.assert_close(call["masks"], o["pred_masks"].detach(), rtol=0, atol=0)
        torch.testing.assert_close(call["locations"], out["query_locations"], rtol=0, atol=0)

    # same weights, same seed: the hand-assembled official reference gives the same losses
    matcher.calls.clear()
    torch.manual_seed(5)
    out2 = dec(feats, targets)
    ref = _official_reference_losses(crit, out2, targets)
    assert torch.equal(torch.get_rng_state(), rng_after)  # the same number of random draws
    assert set(ref) == set(losses)
    for k in losses:
        torch.testing.assert_close(losses[k], ref[k], rtol=0, atol=0, msg=k)
    # an output that carries pred_matching_indices is not matched again (how the guided ones are kept)
    matcher.calls.clear()
    crit(dict(out2, pred_matching_indices=out2["aux_outputs"][0]["pred_matching_indices"]), targets)
    assert len(matcher.calls) == d


def test_model_matcher_call_count_equals_official():
    """Whole model, D3: per iteration the matcher runs D + 2 = 5 times on queries and once on
    the proposal pixels (official: 1 in the decoder, 1 + D in SetCriterion.forward)."""
    torch.manual_seed(0)
    cfg = setup_cfg(str(CFG / "R50_D3_640.yaml"), [
        "MODEL.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
        "MODEL.FASTINST.NUM_OBJECT_QUERIES", "20", "MODEL.FASTINST.TRAIN_NUM_POINTS", "256"])
    model = build_model(cfg).train()
    counting = _CountingMatcher(num_points=256)
    model.criterion.matcher = counting
    assert model.sem_seg_head.predictor.criterion.matcher is counting  # one criterion, two names
    losses = model(_batch())
    assert len(counting.calls) == 3 + 2 and counting.pixel_calls == 1
    assert len([k for k in losses if k.startswith("loss_mask")]) == 1 + 2 * 3


# ------------------------------------------------------------------ shared pieces
def test_point_sample_pixel_centres_and_importance_sampling():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    coords = torch.stack([(xs.flatten() + 0.5) / 7, (ys.flatten() + 0.5) / 5], -1)[None].expand(2, -1, -1)
    torch.testing.assert_close(point_sample(x, coords), x.flatten(2))
    # importance sampling: with beta = 1 the kept points are the most uncertain of the k * P
    # oversampled ones; here ~51% of the map (x < 16.5 / 32) has |logit| < 8, i.e. ~309 of the 600
    # candidates, so all 200 kept points lie there; uniform sampling (beta = 0) puts about half there
    logits = torch.full((1, 1, 32, 32), 8.0)
    logits[..., :, :16] = 0.0
    pts = uncertain_point_coords_with_randomness(logits, lambda v: -v.abs(), 200, 3.0, 1.0)
    assert pts.shape == (1, 200, 2)
    assert (pts[0, :, 0] < 16.5 / 32).all()
    pts = uncertain_point_coords_with_randomness(logits, lambda v: -v.abs(), 200, 3.0, 0.0)
    assert 0.35 < (pts[0, :, 0] < 16.5 / 32).float().mean() < 0.7
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertain_point_coords_with_randomness(logits, lambda v: -v.abs(), 10, 0.5, 0.5)


def test_ppm_fpn_init_follows_the_official_code():
    """Official ``fastinst/modeling/pixel_decoder/fastinst_encoder.py``: adapters and output convs
    ``c2_xavier_fill``-ed (no bias under GN); the PPM's branch convs and bottleneck keep PyTorch's
    default init (kaiming-uniform a=sqrt(5): std 1/sqrt(3 fan_in), biases uniform in +-1/sqrt(fan_in))."""
    torch.manual_seed(0)
    dec = PPMFPN([512, 1024, 2048], channels=256, ppm_channels=64)
    ppm_convs = [s[1] for s in dec.ppm.stages] + [dec.ppm.bottleneck]
    assert [c.in_channels for c in ppm_convs] == [256] * 4 + [512]
    assert_pytorch_default_conv_init(ppm_convs)
    # c2_msra_fill would give std sqrt(2 / fan_out): 0.18 on the branches, 0.09 on the bottleneck
    assert float(ppm_convs[0].weight.detach().std()) < 0.05 and float(dec.ppm.bottleneck.weight.detach().std()) < 0.03
    for i in (1, 2, 3):  # c2_xavier_fill: kaiming-uniform a=1, std 1/sqrt(fan_in)
        for conv in (getattr(dec, f"adapter_{i}"), getattr(dec, f"layer_{i}")):
            fan_in = conv.weight[0].numel()
            assert float(conv.weight.detach().std()) == pytest.approx(fan_in ** -0.5, rel=0.05)
            assert float(conv.weight.detach().abs().max()) <= (3 / fan_in) ** 0.5
            assert conv.bias is None


def test_ppm_fpn_shapes_keys_and_sine_embedding():
    dec = PPMFPN([32, 64, 128], channels=32, ppm_channels=8)
    feats = {"res3": torch.randn(1, 32, 16, 20), "res4": torch.randn(1, 64, 8, 10), "res5": torch.randn(1, 128, 4, 5)}
    e5, e4, e3 = dec(feats)
    assert e5.shape == (1, 32, 4, 5) and e4.shape == (1, 32, 8, 10) and e3.shape == (1, 32, 16, 20)
    assert (e3 >= 0).all()  # ReLU after the GN output convs
    keys = set(dec.state_dict())
    assert {"adapter_1.weight", "adapter_1.norm.weight", "layer_3.norm.bias", "ppm.stages.3.1.weight", "ppm.bottleneck.bias"} <= keys
    assert "adapter_1.bias" not in keys  # GroupNorm convs have no bias
    with pytest.raises(ValueError, match="norm"):
        PPMFPN([32, 64, 128], channels=32, norm="LN")
    pos = sine_position_embedding(3, 4, 8)
    assert pos.shape == (1, 8, 3, 4)
    # y channels vary along rows only, x channels along columns only
    assert torch.allclose(pos[0, :4, :, 0:1].expand(-1, -1, 4), pos[0, :4])
    assert torch.allclose(pos[0, 4:, 0:1, :].expand(-1, 3, -1), pos[0, 4:])


# ------------------------------------------------------------------ configs: shapes and losses
TABLE1 = {  # column config -> (printed Param.(M), decoder layers, GT-guided, IA-guided)
    "table1_col1_baseline": (40.9, 9, False, False),
    "table1_col2_B": (41.4, 9, False, True),
    "table1_col3_C": (40.9, 9, True, False),
    "table1_col4_BC": (41.4, 9, True, True),
    "table1_col5_A": (33.5, 3, False, False),
    "table1_col6_AB": (34.1, 3, False, True),
    "table1_col7_AC": (33.5, 3, True, False),
    "table1_col8_ABC": (34.1, 3, True, True),
    "table1_col9_ABCE": (34.2, 3, True, True),
}
SHAPE_CASES = [("R50_D1_576.yaml", None, 1, True, True), ("R50_D3_640.yaml", None, 3, True, True)] + [
    (f"ablations/{k}.yaml", v[0], v[1], v[2], v[3]) for k, v in TABLE1.items()
]


def _batch(h=96, w=128, with_instances=True):
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:50, 20:70] = True
    masks[1, 50:90, 60:120] = True
    x = {"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8), "height": 150, "width": 200, "image_id": 1}
    if with_instances:
        x["instances"] = {"labels": torch.tensor([0, 2]), "masks": masks, "boxes": torch.zeros(2, 4)}
    return [x]


@pytest.mark.parametrize("config,printed,layers,guided,ia", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_output_shapes_losses_and_table1_params(config, printed, layers, guided, ia):
    cfg80 = setup_cfg(str(CFG / config), ["MODEL.NUM_CLASSES", "80", "MODEL.DEVICE", "cpu"])
    assert cfg80.MODEL.FASTINST.DEC_LAYERS == layers
    if printed is not None:  # supplement Table I Param.(M), within 1 %
        assert abs(_n(build_model(cfg80)) / 1e6 - printed) / printed < 0.01
    torch.manual_seed(0)
    cfg = setup_cfg(str(CFG / config), [
        "MODEL.NUM_CLASSES", "4", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
        "MODEL.FASTINST.NUM_OBJECT_QUERIES", "20", "MODEL.FASTINST.TRAIN_NUM_POINTS", "256"])
    model = build_model(cfg)
    with torch.no_grad():
        out = model.sem_seg_head(model.backbone(torch.randn(1, 3, 96, 128)))
    assert out["pred_logits"].shape == (1, 20, 5) and out["pred_masks"].shape == (1, 20, 12, 16)
    assert (out["proposal_logits"] is not None) == ia
    model.train()
    losses = model(_batch())
    n_aux = layers + (layers if guided else 0)  # initial + D - 1 layers, plus D GT-guided
    expect = {f"{k}{s}" for k in ("loss_cls", "loss_mask", "loss_dice") for s in [""] + [f"_{i}" for i in range(n_aux)]}
    if ia:
        expect.add("loss_proposal")
    assert set(losses) == expect
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (res,) = model(_batch(with_instances=False))
    assert res["scores"].shape == (80,) and res["labels"].dtype == torch.int64  # top-100 capped at N x K = 80
    assert res["masks"].shape == (80, 150, 200) and res["masks"].dtype == torch.bool
    assert res["boxes"].shape == (80, 4) and int(res["labels"].max()) < 4


def test_inference_top_k_pairs_and_mask_rescoring():
    torch.manual_seed(0)
    cfg = setup_cfg(str(CFG / "R50_D1_576.yaml"), ["MODEL.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu",
                                                   "MODEL.RESNETS.NORM", "BN", "MODEL.FASTINST.NUM_OBJECT_QUERIES", "4",
                                                   "TEST.DETECTIONS_PER_IMAGE", "5"])
    model = build_model(cfg).eval()
    logits = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 2.9, 0.0], [0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 1.0, 1.0]]])
    masks = torch.full((1, 4, 4, 4), -6.0)
    masks[0, 1, :2, :2] = 6.0  # query 1: a clean top-left square
    masks[0, 0, :, :] = 0.5  # query 0: everything, probability ~0.62
    res = model.inference({"pred_logits": logits, "pred_masks": masks}, [{"height": 32, "width": 32}], [(32, 32)], (32, 32))[0]
    probs = logits.softmax(-1)[0, :, :3]
    top = probs.flatten().topk(5)
    assert res["labels"].tolist() == (top.indices % 3).tolist()
    q1 = (top.indices // 3).tolist().index(1)
    assert res["masks"][q1, :12, :12].all() and not res["masks"][q1, 16:].any() and not res["masks"][q1, :, 16:].any()
    assert 0.9 * top.values[q1] < res["scores"][q1] < top.values[q1]  # mean mask probability inside < 1
    q3 = (top.indices // 3).tolist().index(3)
    assert not res["masks"][q3].any() and res["scores"][q3] == 0  # empty mask -> score 0
    # top-2 = two different queries (no duplicate): same masks and scores as in the top-5
    model.detections_per_image = 2
    res2 = model.inference({"pred_logits": logits, "pred_masks": masks}, [{"height": 32, "width": 32}], [(32, 32)], (32, 32))[0]
    assert torch.equal(res2["masks"], res["masks"][:2]) and torch.allclose(res2["scores"], res["scores"][:2])
    q0 = (top.indices // 3).tolist().index(0)
    assert abs(res["scores"][q0] / top.values[q0] - torch.sigmoid(torch.tensor(0.5))) < 0.02


# ------------------------------------------------------------------ official parity
REF_CASES = [
    ("R50_D1_576.yaml", "fastinst_R50_ppm-fpn_x1_576"),
    ("R50_D3_640.yaml", "fastinst_R50_ppm-fpn_x3_640"),
    ("R101_D3_640.yaml", "fastinst_R101_ppm-fpn_x3_640"),
    ("R50vd_dcn_D3_640.yaml", "fastinst_R50-vd-dcn_ppm-fpn_x3_640"),
]


@pytest.mark.parametrize("config,ref", REF_CASES, ids=[r for _, r in REF_CASES])
def test_parameter_counts_and_official_checkpoint_conversion(config, ref):
    path = REFS / f"{ref}.json"
    r = json.loads(path.read_text())
    model = build_model(setup_cfg(str(CFG / config), ["MODEL.NUM_CLASSES", "80", "MODEL.DEVICE", "cpu"]))
    assert _n(model) == r["params"]
    assert _n(model.backbone) == r["per_module"]["backbone"]
    assert _n(model.sem_seg_head) == r["per_module"]["sem_seg_head"]
    ours_head = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert ours_head == {k: v for k, v in r["state_dict"].items() if not k.startswith("backbone.")}

    # a fake official checkpoint with exactly the ref's keys and shapes, each tensor a distinct value
    shapes = official_keys_from_ref(str(path))
    official = {k: torch.full(tuple(s), float(i % 997) / 997) for i, (k, s) in enumerate(shapes.items())}
    converted = convert_official_state_dict(official, "fastinst")
    ours = model.state_dict()
    assert set(converted) <= set(ours), sorted(set(converted) - set(ours))[:10]  # every key lands
    assert all(tuple(converted[k].shape) == tuple(ours[k].shape) for k in converted)
    params = {k for k, _ in model.named_parameters()}
    assert params <= set(converted), sorted(params - set(converted))[:10]  # every parameter filled
    report = load_state_dict_with_report(model, converted)
    assert report["skipped_shape"] == [] and report["unexpected"] == []
    sd = model.state_dict()
    for off, mine in [("sem_seg_head.predictor.query_proposal.conv_proposal_cls_logits.2.bias",
                       "sem_seg_head.predictor.query_proposal.conv_proposal_cls_logits.2.bias"),
                      ("sem_seg_head.pixel_decoder.adapter_3.norm.weight", "sem_seg_head.pixel_decoder.adapter_3.norm.weight"),
                      ("backbone.res5.2.conv3.weight" if "vd" not in ref else "backbone.layer4.2.conv3.weight",
                       "backbone.body.layer4.2.conv3.weight")]:
        torch.testing.assert_close(sd[mine], official[off])


@pytest.mark.parametrize("config,ref", REF_CASES, ids=[r for _, r in REF_CASES])
def test_converted_official_weights_load_strictly(config, ref):
    """A state dict with exactly the official keys and shapes converts and loads with
    ``strict=True``: every official key is converted (none dropped or unmatched), every tensor
    of ours is filled with its official value, none is left over. The criterion is one module
    under two names (``criterion``, ``sem_seg_head.predictor.criterion``) in both layouts, so
    both ``empty_weight`` keys are kept (dropping ``criterion.*`` failed the strict load)."""
    shapes = official_keys_from_ref(str(REFS / f"{ref}.json"))
    assert {"criterion.empty_weight", "sem_seg_head.predictor.criterion.empty_weight"} <= set(shapes)
    official = {k: torch.full(tuple(s), float(i % 997) / 997 + 1) for i, (k, s) in enumerate(shapes.items())}
    # one tensor in the official model too, saved under both names
    official["criterion.empty_weight"] = official["sem_seg_head.predictor.criterion.empty_weight"].clone()
    converted, report = convert_with_report(official, "fastinst")
    assert report.dropped == [] and report.unmatched == [] and len(report.converted) == len(official)
    model = build_model(setup_cfg(str(CFG / config), ["MODEL.NUM_CLASSES", "80", "MODEL.DEVICE", "cpu"]))
    n_params = _n(model)
    assert set(converted) == set(model.state_dict())
    incompatible = model.load_state_dict(converted, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, converted[k].to(v.dtype)), k
    assert model.criterion.empty_weight is model.sem_seg_head.predictor.criterion.empty_weight
    assert _n(model) == n_params


# ------------------------------------------------------------------ real data
@pytest.mark.slow
def test_training_on_real_images_loss_falls(shared_data, tmp_path):
    fruits = shared_data / "fruits_nuts"
    if not (fruits / "annotations_train.json").is_file():
        pytest.skip("fruits_nuts sample missing")
    args = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CFG / "R50_D3_640.yaml"),
        "--dataset", "fruits_train_fi", str(fruits / "annotations_train.json"), str(fruits / "images"),
        "DATASETS.TRAIN", "('fruits_train_fi',)", "DATASETS.TEST", "()",
        "MODEL.RESNETS.NORM", "BN", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.AMP.ENABLED", "False",
        "SOLVER.MAX_ITER", "12", "SOLVER.BASE_LR", "0.0002", "SOLVER.BACKBONE_MULTIPLIER", "1.0",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "176", "INPUT.CROP.ENABLED", "False",
        "MODEL.FASTINST.NUM_OBJECT_QUERIES", "50", "MODEL.FASTINST.TRAIN_NUM_POINTS", "3136",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "3", "LOG_PERIOD", "1", "OUTPUT_DIR", str(tmp_path),
    ]
    p = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [r for f in sorted((tmp_path / "csv").glob("version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    losses = {int(r["step"]): float(r["train/total_loss"]) for r in rows if r.get("train/total_loss")}
    steps = sorted(losses)
    assert len(steps) == 12
    first3 = sum(losses[s] for s in steps[:3]) / 3
    last3 = sum(losses[s] for s in steps[-3:]) / 3
    assert last3 < 0.7 * losses[steps[0]] and last3 < first3, (losses[steps[0]], first3, last3)
    assert (tmp_path / "model_final.ckpt").is_file()
