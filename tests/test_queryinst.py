"""QueryInst: DynConv (shapes, hand-checked case), box refinement, the box matcher against brute
force, mask pasting at the original size, the Table 6 (shared query / MSA) and Table 4 (DynConv^mask,
mask flow) wiring, parameter parity with the official module definitions, the data contract and a
short real-data training run."""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import queryinst  # noqa: F401  (registers the meta-architecture and config keys)
from instseg.config import setup_cfg
from instseg.modeling import build_model
from instseg.modeling.matcher import box_cost_matrix
from queryinst import (
    DIIHead,
    DynamicMaskHead,
    DynConv,
    QueryInstCriterion,
    QueryRoIHead,
    assign_fpn_levels,
    crop_mask_targets,
    decode_box_deltas,
    encode_box_deltas,
)
from queryinst.matcher import BoxSetMatcher

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs/queryinst/R50_FPN_100q_1x.yaml")
REFS = Path(__file__).resolve().parent / "refs"


def _n(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- DynConv
def test_dynconv_shapes():
    box = DynConv(32, 8, 32, input_size=7, with_proj=True)
    assert box(torch.randn(5, 32), torch.randn(5, 32, 7, 7)).shape == (5, 32)
    mask = DynConv(32, 8, 16, input_size=14, with_proj=False)
    assert mask(torch.randn(3, 32), torch.randn(3, 32, 14, 14)).shape == (3, 196, 16)
    with pytest.raises(ValueError, match="roi_feats"):
        box(torch.randn(5, 32), torch.randn(5, 32, 14, 14))
    with pytest.raises(ValueError, match="query"):
        box(torch.randn(5, 16), torch.randn(5, 32, 7, 7))


def test_dynconv_hand_checked_tiny_case():
    """C = D = C_out = 2, one position. The query q = (a, b) generates W1 = diag(a, b) and W2 = I.
    x = (3, 1): q = (1, 1) -> xW1 = (3, 1) -> LN (1, -1) -> ReLU (1, 0) -> W2 -> LN -> ReLU (1, 0);
    q = (1, 4) -> xW1 = (3, 4) -> LN (-1, 1) -> ... -> (0, 1). The query decides the output."""
    dc = DynConv(2, 2, 2, input_size=1, with_proj=False)
    with torch.no_grad():
        dc.dynamic_layer.weight.zero_()
        dc.dynamic_layer.bias.zero_()
        dc.dynamic_layer.weight[0, 0] = 1.0  # W1[0, 0] = a
        dc.dynamic_layer.weight[3, 1] = 1.0  # W1[1, 1] = b
        dc.dynamic_layer.bias[4:] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # W2 = I
    x = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1).repeat(2, 1, 1, 1)
    out = dc(torch.tensor([[1.0, 1.0], [1.0, 4.0]]), x)
    assert out.shape == (2, 1, 2)
    assert torch.allclose(out[:, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-4)


def test_dynconv_is_a_per_roi_1x1_convolution():
    """Each RoI is convolved with its own generated 1x1 kernels (checked with F.conv2d per RoI)."""
    torch.manual_seed(0)
    dc = DynConv(6, 4, 5, input_size=3, with_proj=False)
    q, x = torch.randn(2, 6), torch.randn(2, 6, 3, 3)
    out = dc(q, x)
    params = dc.dynamic_layer(q)
    for r in range(2):
        w1 = params[r, :24].view(6, 4).t()[:, :, None, None]  # (D, C, 1, 1)
        w2 = params[r, 24:].view(4, 5).t()[:, :, None, None]  # (C_out, D, 1, 1)
        h = torch.nn.functional.conv2d(x[r : r + 1], w1)  # (1, D, 3, 3)
        h = torch.relu(torch.nn.functional.layer_norm(h.permute(0, 2, 3, 1), (4,), dc.norm_in.weight, dc.norm_in.bias))
        y = torch.nn.functional.conv2d(h.permute(0, 3, 1, 2), w2)
        y = torch.relu(torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (5,), dc.norm_out.weight, dc.norm_out.bias))
        assert torch.allclose(out[r], y.reshape(9, 5), atol=1e-5)


# ----------------------------------------------------------------------------- boxes
def test_box_delta_decoding_hand_checked_and_inverse():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    # dx = 1 with std 0.5: the centre moves by 0.5 * width = 5 px
    assert torch.allclose(decode_box_deltas(box, torch.tensor([[1.0, 0, 0, 0]])), torch.tensor([[5.0, 0, 15, 20]]))
    # dw = 1 with std 1: width x e, centre kept
    w = 10 * math.e
    assert torch.allclose(decode_box_deltas(box, torch.tensor([[0, 0, 1.0, 0]])), torch.tensor([[5 - w / 2, 0, 5 + w / 2, 20]]))
    torch.manual_seed(0)
    a = torch.rand(20, 2) * 50
    boxes = torch.cat([a, a + 1 + torch.rand(20, 2) * 50], 1)
    b = torch.rand(20, 2) * 50
    targets = torch.cat([b, b + 1 + torch.rand(20, 2) * 50], 1)
    assert torch.allclose(decode_box_deltas(boxes, encode_box_deltas(boxes, targets)), targets, atol=1e-4)


def test_box_refinement_keeps_boxes_inside_the_image():
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 10, 50, 40], [0, 0, 64, 48], [60, 40, 64, 48]]).repeat(50, 1)
    deltas = torch.randn(150, 4) * 20  # wild deltas; dw/dh clamp keeps them finite
    hw = torch.tensor([[48, 64]]).repeat(150, 1)
    out = decode_box_deltas(boxes, deltas, clip_size=hw)
    assert torch.isfinite(out).all()
    assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] <= 64).all()
    assert (out[:, 1::2] >= 0).all() and (out[:, 1::2] <= 48).all()
    unclipped = decode_box_deltas(boxes, deltas)
    assert (unclipped[:, 0::2] < 0).any() or (unclipped[:, 0::2] > 64).any()  # the clip did something
    # and through the stages of the head (CLIP_BOXES on), per image size
    head = _tiny_head(clip_boxes=True, num_stages=3)
    with torch.no_grad():
        for h in head.box_heads:
            torch.nn.init.normal_(h.fc_reg.weight, std=5.0)  # large deltas
        sizes = torch.tensor([[48, 64], [30, 40]])
        outs = head.forward_boxes(_feats(2, 64, 64), sizes)
    for o in outs:
        for i, (h, w) in enumerate(sizes.tolist()):
            bx = o["boxes"][i]
            assert (bx[:, 0::2] >= 0).all() and (bx[:, 0::2] <= w).all()
            assert (bx[:, 1::2] >= 0).all() and (bx[:, 1::2] <= h).all()


def test_initial_proposals_cover_each_image_and_levels():
    head = _tiny_head()
    boxes, q = head.initial_proposals(torch.tensor([[48, 64], [30, 40]]))
    assert torch.equal(boxes[0], torch.tensor([[0.0, 0, 64, 48]]).expand(8, 4))
    assert torch.equal(boxes[1], torch.tensor([[0.0, 0, 40, 30]]).expand(8, 4))
    assert q.shape == (2, 8, 32)
    # level mapping (mmdetection finest_scale 56): <112 -> P2, 112-224 -> P3, 224-448 -> P4, else P5
    sq = torch.tensor([[0, 0, s, s] for s in (50.0, 111.0, 113.0, 223.0, 225.0, 447.0, 449.0, 2000.0)])
    assert assign_fpn_levels(sq, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ----------------------------------------------------------------------------- matcher
def _giou(a, b):
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(ix2 - ix1, 0) * max(iy2 - iy1, 0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _focal_cost(logit, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    return alpha * (1 - p) ** gamma * -math.log(p) - (1 - alpha) * p**gamma * -math.log(1 - p)


@pytest.mark.parametrize("n,m,seed", [(4, 3, 0), (5, 5, 1), (6, 2, 2), (3, 3, 3)])
def test_box_matcher_against_brute_force(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    w, h = 80.0, 60.0
    logits = torch.randn(n, 3, generator=g) * 2
    xy = torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], 1)
    txy = torch.rand(m, 2, generator=g) * 40
    tgt = torch.cat([txy, txy + 5 + torch.rand(m, 2, generator=g) * 30], 1)
    labels = torch.randint(0, 3, (m,), generator=g)
    whwh = torch.tensor([w, h, w, h])
    cost = box_cost_matrix(logits, boxes, whwh, labels, tgt)
    # every entry from the hand formulas
    for i in range(n):
        for k in range(m):
            l1 = sum(abs(float(boxes[i, j] - tgt[k, j])) / float(whwh[j]) for j in range(4))
            ref = 2.0 * _focal_cost(float(logits[i, labels[k]])) + 5.0 * l1 - 2.0 * _giou(boxes[i].tolist(), tgt[k].tolist())
            assert float(cost[i, k]) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # the Hungarian assignment reaches the brute-force minimum over all injective assignments
    best = min(
        sum(float(cost[p[k], k]) for k in range(m)) for p in itertools.permutations(range(n), m)
    ) if n >= m else min(sum(float(cost[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(m), n))
    matcher = BoxSetMatcher()
    (src, tgt_idx), = matcher(logits[None], boxes[None], whwh[None], [{"labels": labels, "boxes": tgt}])
    assert len(src) == min(n, m) and len(set(src.tolist())) == len(src) and len(set(tgt_idx.tolist())) == len(tgt_idx)
    assert float(cost[src, tgt_idx].sum()) == pytest.approx(best, abs=1e-4)


def test_box_matcher_empty_targets_and_bad_labels():
    matcher = BoxSetMatcher()
    (src, tgt), = matcher(torch.randn(1, 4, 3), torch.tensor([[[0.0, 0, 5, 5]]]).expand(1, 4, 4), torch.ones(1, 4),
                          [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert src.numel() == 0 and tgt.numel() == 0
    with pytest.raises(ValueError, match="target labels"):
        box_cost_matrix(torch.randn(4, 3), torch.rand(4, 4), torch.ones(4), torch.tensor([3]), torch.rand(1, 4))


# ----------------------------------------------------------------------------- masks
def test_mask_targets_crop_to_the_box():
    gt = torch.zeros(2, 60, 80, dtype=torch.bool)
    gt[0, 10:30, 20:60] = True  # a 40 x 20 rectangle
    gt[1, 40:60, 0:10] = True
    boxes = torch.tensor([[20.0, 10, 60, 30], [20.0, 10, 40, 30]])
    t = crop_mask_targets(gt, boxes, torch.tensor([0, 0]), 28)
    assert t.shape == (2, 28, 28)
    assert torch.equal(t[0], torch.ones(28, 28))  # box == object
    assert torch.equal(t[1], torch.ones(28, 28))  # box inside the object
    t = crop_mask_targets(gt, torch.tensor([[0.0, 0, 80, 60]]), torch.tensor([1]), 28)
    assert t[0, -1, 0] == 1 and t[0, 0, 0] == 0 and t[0, -1, -1] == 0


def test_mask_targets_clip_the_box_to_the_padded_mask_hand_checked():
    """mmdetection's mask_target_single clips each box to [0, W] x [0, H] of the (padded) GT mask
    before RoIAlign (aligned, sampling_ratio 0 = ceil(bin size) samples per bin side)."""
    gt = torch.ones(1, 4, 4, dtype=torch.bool)  # the object fills the 4 x 4 image
    idx = torch.tensor([0])
    # Box half outside on the left. Clipped: [0, 0, 4, 4] = the whole mask -> every bin is 1.
    # Unclipped it would be: x from -4.5 to 3.5 (aligned), 2 bins of 4 px, 4 samples each at
    # x = -4, -3, -2, -1 (bin 0: -4..-2 lie beyond -1 and read 0, -1 reads column 0 -> mean 0.25,
    # target 0) and x = 0..3 (bin 1: 1).
    t = crop_mask_targets(gt, torch.tensor([[-4.0, 0, 4, 4]]), idx, 2)
    assert torch.equal(t[0], torch.ones(2, 2))
    # Zero-padded to the batch's (4, 8): the box [-4, 0, 12, 4] is clipped to [0, 0, 8, 4]; x from
    # -0.5 to 7.5, bins of 4 px with samples at x = 0..3 (the object: 1) and x = 4..7 (padding: 0);
    # y samples at 0, 1 and 2, 3 (all inside). Target [[1, 0], [1, 0]].
    t = crop_mask_targets(gt, torch.tensor([[-4.0, 0, 12, 4]]), idx, 2, pad_size=(4, 8))
    assert torch.equal(t[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # the same box without the padding is clipped to the 4 x 4 mask: all 1
    t = crop_mask_targets(gt, torch.tensor([[-4.0, 0, 12, 4]]), idx, 2)
    assert torch.equal(t[0], torch.ones(2, 2))
    # Box reaching below the image (no padding): clipped to [0, 0, 4, 4] -> all 1. Unclipped,
    # y from -0.5 to 7.5 would put bin 1's samples at y = 4 (edge row, 1), 5, 6, 7 (0): mean 0.25.
    t = crop_mask_targets(gt, torch.tensor([[0.0, 0, 4, 8]]), idx, 2)
    assert torch.equal(t[0], torch.ones(2, 2))
    # Box above the image, mask padded to (8, 4): clipped to [0, 0, 4, 4] -> all 1.
    t = crop_mask_targets(gt, torch.tensor([[0.0, -4, 4, 4]]), idx, 2, pad_size=(8, 4))
    assert torch.equal(t[0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="smaller"):
        crop_mask_targets(gt, torch.tensor([[0.0, 0, 4, 4]]), idx, 2, pad_size=(2, 8))


def test_dice_eps_on_both_sums_as_mmdetection():
    """mmdetection dice_loss (naive_dice=False): 1 - 2 sum(pt) / ((sum(p^2) + eps) + (sum(t^2) + eps)).
    One pixel, logit 0 (p = 0.5), target 1, eps 0.5 (large so that it shows):
    1 - 2 * 0.5 / ((0.25 + 0.5) + (1 + 0.5)) = 1 - 1 / 2.25 = 5 / 9 (eps once would give 3 / 7)."""
    crit = QueryInstCriterion(2, BoxSetMatcher(), dice_eps=0.5)
    loss = crit.mask_loss(torch.zeros(1, 2, 1, 1), torch.tensor([1]), torch.ones(1, 1, 1), 1.0)
    assert float(loss) == pytest.approx(5 / 9, abs=1e-7)
    # summed over matched queries, divided by num_pos
    loss = crit.mask_loss(torch.zeros(2, 2, 1, 1), torch.tensor([1, 0]), torch.ones(2, 1, 1), 4.0)
    assert float(loss) == pytest.approx(2 * (5 / 9) / 4, abs=1e-7)


# ----------------------------------------------------------------------------- wiring (Tables 4, 6)
def _tiny_head(**kw):
    args = dict(num_classes=3, strides=(4, 8), num_proposals=8, dim=32, num_stages=2, num_heads=4, dim_feedforward=64,
                dynamic_dim=8, mask_num_convs=2, mask_conv_dim=16, mask_norm="GN" if False else "")
    args.update(kw)
    return QueryRoIHead(**args)


def _feats(b, h, w, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, dim, h // 4, w // 4, generator=g), torch.randn(b, dim, h // 8, w // 8, generator=g)]


def test_shared_msa_switch_changes_the_wiring():
    """Table 6: with the MSA shared (default) the mask branch's DynConv is driven by the box
    branch's q* (the same tensor), and the mask loss trains the box branch's MSA; without sharing
    there is one extra MSA per stage, its output drives the mask branch, and the box MSA of the
    last stage gets no gradient from the mask."""
    torch.manual_seed(0)
    shared, separate = _tiny_head(), _tiny_head(shared_msa=False)
    msa = shared.box_heads[0].attention
    assert _n(separate) - _n(shared) == 2 * _n(msa) and separate.mask_attentions is not None and shared.mask_attentions is None

    sizes = torch.tensor([[64, 64]])
    for head, is_shared in ((shared, True), (separate, False)):
        seen = {}
        h1 = head.box_heads[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("q_star", o["queries_msa"]))
        h2 = head.mask_heads[-1].dynconv.register_forward_hook(lambda m, i, o: seen.__setitem__("mask_q", i[0]))
        feats = _feats(1, 64, 64)
        outs = head.forward_boxes(feats, sizes)
        idx = [torch.arange(8)]
        logits = head.forward_masks(1, feats, [outs[1]["boxes"][0]], idx, outs)
        h1.remove()
        h2.remove()
        assert logits.shape == (8, 3, 28, 28)
        same = torch.equal(seen["mask_q"], seen["q_star"].reshape(8, 32))
        assert same == is_shared
        head.zero_grad()
        logits.sum().backward()
        g = head.box_heads[-1].attention.attn.in_proj_weight.grad
        assert (g is not None and g.abs().sum() > 0) == is_shared
        if not is_shared:
            assert head.mask_attentions[-1].attn.in_proj_weight.grad.abs().sum() > 0


def test_shared_query_switch():
    """Table 6, shared query off: the mask branch runs on its own learnable queries, which never
    see the image (identical for two different images); shared on: they are image dependent."""
    torch.manual_seed(0)
    sizes = torch.tensor([[64, 64], [64, 64]])
    feats = _feats(2, 64, 64)
    sep = _tiny_head(shared_query=False)
    assert sep.init_mask_queries is not None and _tiny_head().init_mask_queries is None
    outs = sep.forward_boxes(feats, sizes)
    assert torch.allclose(outs[1]["mask_queries"][0], outs[1]["mask_queries"][1])
    outs = _tiny_head().forward_boxes(feats, sizes)
    assert not torch.allclose(outs[1]["mask_queries"][0], outs[1]["mask_queries"][1])


def test_mask_information_flow_switch_table4():
    torch.manual_seed(0)
    sizes = torch.tensor([[64, 64]])
    feats = _feats(1, 64, 64)
    for flow in (False, True):
        head = _tiny_head(num_stages=3, mask_flow=flow)
        assert [m.flow_conv is not None for m in head.mask_heads] == [False, flow, flow]
        calls = []
        for j, m in enumerate(head.mask_heads):
            m.register_forward_hook(lambda mod, i, o, j=j: calls.append((j, i[2] is not None)))
        outs = head.forward_boxes(feats, sizes)
        head.forward_masks(2, feats, [outs[2]["boxes"][0][:3]], [torch.arange(3)], outs)
        # HTC flow: heads 0, 1, 2 in turn, each after the first receiving the previous features
        assert calls == ([(0, False), (1, True), (2, True)] if flow else [(2, False)])
    # vanilla mask head (Fig. 2(b)): no DynConv^mask, the query does not matter
    head = DynamicMaskHead(3, dim=8, dynamic_dim=4, pooler_resolution=6, num_convs=1, conv_dim=8, norm="", use_dynamic_conv=False)
    x = torch.randn(2, 8, 6, 6)
    assert head.dynconv is None
    assert torch.equal(head(x, torch.randn(2, 8))[0], head(x, torch.randn(2, 8))[0])
    dyn = DynamicMaskHead(3, dim=8, dynamic_dim=4, pooler_resolution=6, num_convs=1, conv_dim=8, norm="")
    assert not torch.allclose(dyn(x, torch.randn(2, 8))[0], dyn(x, torch.randn(2, 8))[0])


# ----------------------------------------------------------------------------- initialization
def test_box_head_init_as_mmdetection():
    """DIIHead.init_weights: BBoxHead's init_cfg first (Normal std 0.001 on fc_reg, bias 0), then
    Xavier-uniform on every matrix and the class bias at prior 0.01: fc_reg.bias is 0."""
    torch.manual_seed(0)
    h = DIIHead(80)
    assert torch.equal(h.fc_reg.bias, torch.zeros(4))
    assert torch.allclose(h.fc_cls.bias, torch.full((80,), -math.log(99.0)))
    bound = math.sqrt(6.0 / (256 + 4))  # Xavier-uniform bound of the (4, 256) fc_reg weight
    assert h.fc_reg.weight.abs().max() <= bound and h.fc_reg.weight.std() > 0.5 * bound / math.sqrt(3)
    assert torch.equal(h.ffn_norm.weight, torch.ones(256)) and torch.equal(h.ffn_norm.bias, torch.zeros(256))


def test_mask_head_init_as_the_official_code_ends_up():
    """Officially DynamicMaskHead.init_weights (Xavier) is never reached (the mask heads are in a
    plain nn.ModuleList): the convs keep ConvModule's own init (Kaiming-normal fan_out, norm 1/0),
    the rest PyTorch's defaults (uniform within 1/sqrt(fan_in), non-zero biases)."""
    torch.manual_seed(0)
    h = DynamicMaskHead(80).requires_grad_(False)
    conv = h.convs[0]
    assert conv.bias is None and isinstance(h.convs[1], torch.nn.BatchNorm2d)
    assert abs(float(conv.weight.std()) - math.sqrt(2.0 / (256 * 9))) < 0.002  # fan_out = 256 x 3 x 3
    assert torch.equal(h.convs[1].weight, torch.ones(256)) and torch.equal(h.convs[1].bias, torch.zeros(256))
    for lin, fan_in in ((h.predictor, 256), (h.deconv, 256 * 4), (h.dynconv.dynamic_layer, 256)):
        bound = 1.0 / math.sqrt(fan_in)
        assert float(lin.weight.abs().max()) <= bound and float(lin.bias.abs().max()) <= bound
        assert float(lin.bias.abs().max()) > 0.5 * bound  # PyTorch's default bias, not zero
    # without a norm the convs have a bias, zero as ConvModule's kaiming_init sets it
    h = DynamicMaskHead(3, dim=16, dynamic_dim=4, pooler_resolution=4, num_convs=2, conv_dim=16, norm="")
    assert torch.equal(h.convs[0].bias, torch.zeros(16))


# ----------------------------------------------------------------------------- full model
def test_parameter_count_matches_the_official_module_definitions():
    """Per-module counts from the official definitions (mmcv/mmdetection DynamicConv, DIIHead,
    DynamicMaskHead with 80 classes), written out as formulas; the whole model adds R-50 conv
    weights (FrozenBN: 23,454,912), the FPN and the proposal embeddings."""
    c, d, k, s_box, s_mask, ffn = 256, 64, 80, 7, 14, 2048
    ln = 2 * c
    dyn = c * 2 * c * d + 2 * c * d + 2 * d + ln  # generator + LN(64) + LN(256)
    dyn_box = dyn + (c * s_box * s_box * c + c) + ln  # + projection + LN
    msa = 4 * c * c + 4 * c + ln  # in/out projections with biases + LN
    dii = msa + dyn_box + ln + (c * ffn + ffn + ffn * c + c) + ln + 4 * (c * c + ln) + (c * k + k) + (c * 4 + 4)
    mask = dyn + 4 * (9 * c * c + 2 * c) + (4 * c * c + c) + (c * k + k)  # convs without bias + BN, deconv, logits
    assert _n(DIIHead(k)) == dii == 13_235_412
    assert _n(DynamicMaskHead(k)) == mask == 11_066_320
    cfg = setup_cfg(CFG, ["MODEL.NUM_CLASSES", "80"])
    model = build_model(cfg)
    fpn = sum(ci * c + c for ci in (256, 512, 1024, 2048)) + 4 * (9 * c * c + c)
    assert _n(model.backbone.fpn) == fpn == 3_344_384
    assert _n(model) == 23_454_912 + fpn + 100 * (4 + c) + 6 * (dii + mask) == 172_635_688
    # mmdetection's ResNet keeps the affine of its 53 BN layers (26,560 channels) as parameters:
    # with BN everywhere (nothing frozen into FrozenBN) the counts are equal, 172,688,808.
    bn_model = build_model(setup_cfg(CFG, ["MODEL.NUM_CLASSES", "80", "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"]))
    assert _n(bn_model) == _n(model) + 2 * 26_560 == 172_688_808
    # mmdetection's ResNet default zero_init_residual=True (not overridden by the QueryInst config):
    # from random weights with BN, every bottleneck's bn3 scale starts at 0; FrozenBN keeps 1
    assert cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL
    body, fbody = bn_model.backbone.bottom_up.body, model.backbone.bottom_up.body
    assert not bn_model.backbone.bottom_up.body.layer3[5].bn3.weight.any()
    assert all(not blk.bn3.weight.any() for layer in (body.layer1, body.layer4) for blk in layer)
    assert bool((fbody.layer1[0].bn3.weight == 1).all())


def test_parameter_count_matches_mmdetection_per_module():
    """mmdetection 3.3's QueryInst R-50 1x built with random weights (tests/refs/README.md): with
    BN everywhere our model has its count, module by module (mmdetection's ``rpn_head`` holds the
    proposal boxes and features, which live in our ``roi_head``)."""
    r = json.loads((REFS / "queryinst_mmdet_r50_fpn_1x.json").read_text())
    model = build_model(setup_cfg(CFG, ["MODEL.NUM_CLASSES", "80", "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"]))
    per = r["per_module"]
    assert _n(model) == r["params"]
    assert _n(model.backbone.bottom_up) == per["backbone"]
    assert _n(model.backbone.fpn) == per["neck"]
    assert _n(model.roi_head) == per["roi_head"] + per["rpn_head"]
    tracked = [k.split(".")[0] for k in r["state_dict"] if k.endswith("num_batches_tracked")]
    assert (tracked.count("backbone"), tracked.count("roi_head")) == (53, 6 * 4)  # R-50 BNs; 4 per mask head


def test_num_classes_from_one_place():
    cfg = setup_cfg(CFG, ["MODEL.NUM_CLASSES", "3", "MODEL.QUERY_INST.NUM_STAGES", "2", "MODEL.QUERY_INST.NUM_PROPOSALS", "10"])
    model = build_model(cfg)
    assert [h.fc_cls.out_features for h in model.roi_head.box_heads] == [3, 3]
    assert [h.predictor.out_channels for h in model.roi_head.mask_heads] == [3, 3]
    assert model.criterion.num_classes == 3
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(setup_cfg(CFG, []))


def _small_cfg(extra=()):
    return setup_cfg(CFG, [
        "MODEL.NUM_CLASSES", "3", "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.QUERY_INST.NUM_STAGES", "2", "MODEL.QUERY_INST.NUM_PROPOSALS", "12", *extra,
    ])


def test_training_losses_and_inference_contract():
    torch.manual_seed(0)
    model = build_model(_small_cfg(["TEST.DETECTIONS_PER_IMAGE", "12"]))  # official max_per_img = N
    h, w = 70, 90
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 5:30, 10:50] = True
    masks[1, 40:65, 50:85] = True
    inst = {"labels": torch.tensor([0, 2]), "masks": masks, "boxes": torch.tensor([[10.0, 5, 50, 30], [50.0, 40, 85, 65]])}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w, dtype=torch.bool), "boxes": torch.zeros(0, 4)}
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    model.train()
    losses = model([{"image": img, "height": h, "width": w, "instances": inst},
                    {"image": img, "height": h, "width": w, "instances": empty}])
    assert sorted(losses) == sorted(f"stage{t}_loss_{n}" for t in range(2) for n in ("cls", "bbox", "giou", "mask"))
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_head.mask_heads[1].predictor.weight.grad.abs().sum() > 0
    assert model.roi_head.init_proposal_boxes.weight.grad.abs().sum() > 0  # learnable boxes train
    model.eval()
    with torch.no_grad():
        out = model([{"image": img, "height": 2 * h, "width": 3 * w, "image_id": 1}])[0]
    assert out["masks"].shape == (12, 2 * h, 3 * w) and out["masks"].dtype == torch.bool
    assert out["labels"].dtype == torch.int64 and out["scores"].shape == (12,) and out["boxes"].shape == (12, 4)
    assert (out["boxes"][:, 0::2] <= 3 * w).all() and (out["boxes"][:, 1::2] <= 2 * h).all() and (out["boxes"] >= 0).all()
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    # masks never leave their (scaled) box
    for m, b in zip(out["masks"], out["boxes"]):
        ys, xs = m.nonzero(as_tuple=True)
        if len(ys):
            assert xs.min() >= math.floor(b[0]) - 1 and xs.max() <= math.ceil(b[2]) and ys.min() >= math.floor(b[1]) - 1


def test_flops_forward_runs_every_stage_and_the_last_mask_head():
    model = build_model(_small_cfg()).eval()
    with torch.no_grad():
        out = model.flops_forward(torch.randn(1, 3, 64, 96))
    assert out["pred_logits"].shape == (1, 12, 3) and out["pred_boxes"].shape == (1, 12, 4)
    assert out["pred_masks"].shape == (12, 3, 28, 28)


def test_missing_fpn_levels_is_a_clear_error():
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_model(_small_cfg(["MODEL.BACKBONE.NAME", "build_resnet_backbone"]))


# ----------------------------------------------------------------------------- mmdetection checkpoints
MMDET_REF = REFS / "queryinst_mmdet_r50_fpn_1x.json"


def _fake_mmdet_state_dict(shapes):
    """One distinct value per official key, as a zero-memory expanded scalar (key i -> i + 1)."""
    return {k: torch.tensor(float(i + 1)).expand(torch.Size(s)) for i, (k, s) in enumerate(shapes.items())}


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_mmdetection_checkpoint_fills_every_tensor_of_ours(norm):
    """The mmdetection 3.3 layout (tests/refs, 780 entries) converts onto our model: every tensor
    of ours is filled with the right shape, nothing is left over, only the 77
    num_batches_tracked counters are dropped, and the converted dict loads with nothing missing."""
    from instseg.checkpoint import load_state_dict_with_report
    from instseg.convert import convert_with_report, official_keys_from_ref

    shapes = official_keys_from_ref(str(MMDET_REF))
    assert len(shapes) == 780
    converted, report = convert_with_report(_fake_mmdet_state_dict(shapes), "queryinst")
    assert report.unmatched == []
    assert sorted(report.dropped) == sorted(k for k in shapes if k.endswith("num_batches_tracked")) and len(report.dropped) == 77
    opts = ["MODEL.NUM_CLASSES", "80"] + (["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"] if norm == "BN" else [])
    model = build_model(setup_cfg(CFG, opts))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(converted) == set(ours), (sorted(set(ours) - set(converted))[:5], sorted(set(converted) - set(ours))[:5])
    assert all(tuple(converted[k].shape) == ours[k] for k in ours)
    rep = load_state_dict_with_report(model, converted, strict_shapes=True)
    assert not any(rep.get(k) for k in ("missing", "unexpected", "skipped_shape")), rep
    assert len(rep["loaded"]) == len(ours) == 703


def test_mmdetection_key_table_by_hand():
    """Where single official tensors land (values follow the keys: no two same-shape tensors swapped)."""
    from instseg.convert import convert_official_state_dict, official_keys_from_ref

    shapes = official_keys_from_ref(str(MMDET_REF))
    sd = _fake_mmdet_state_dict(shapes)
    out = convert_official_state_dict(sd, "queryinst")
    expect = {
        "backbone.layer3.5.bn3.running_var": "backbone.bottom_up.body.layer3.5.bn3.running_var",
        "backbone.layer1.0.downsample.1.weight": "backbone.bottom_up.body.layer1.0.downsample.1.weight",
        "neck.lateral_convs.2.conv.weight": "backbone.fpn.inner_blocks.2.0.weight",
        "neck.fpn_convs.3.conv.bias": "backbone.fpn.layer_blocks.3.0.bias",
        "rpn_head.init_proposal_bboxes.weight": "roi_head.init_proposal_boxes.weight",
        "rpn_head.init_proposal_features.weight": "roi_head.init_proposal_features.weight",
        "roi_head.bbox_head.4.attention.attn.in_proj_weight": "roi_head.box_heads.4.attention.attn.in_proj_weight",
        "roi_head.bbox_head.4.attention_norm.bias": "roi_head.box_heads.4.attention.norm.bias",
        "roi_head.bbox_head.1.instance_interactive_conv.dynamic_layer.weight": "roi_head.box_heads.1.dynconv.dynamic_layer.weight",
        "roi_head.bbox_head.1.instance_interactive_conv.norm_out.weight": "roi_head.box_heads.1.dynconv.norm_out.weight",
        "roi_head.bbox_head.1.instance_interactive_conv.fc_layer.weight": "roi_head.box_heads.1.dynconv.proj.weight",
        "roi_head.bbox_head.1.instance_interactive_conv.fc_norm.bias": "roi_head.box_heads.1.dynconv.proj_norm.bias",
        "roi_head.bbox_head.1.instance_interactive_conv_norm.weight": "roi_head.box_heads.1.dynconv_norm.weight",
        "roi_head.bbox_head.5.ffn.layers.0.0.weight": "roi_head.box_heads.5.ffn.0.weight",
        "roi_head.bbox_head.5.ffn.layers.1.bias": "roi_head.box_heads.5.ffn.3.bias",
        "roi_head.bbox_head.5.ffn_norm.weight": "roi_head.box_heads.5.ffn_norm.weight",
        "roi_head.bbox_head.0.reg_fcs.7.bias": "roi_head.box_heads.0.reg_fcs.7.bias",
        "roi_head.bbox_head.0.fc_reg.bias": "roi_head.box_heads.0.fc_reg.bias",
        "roi_head.mask_head.3.instance_interactive_conv.norm_in.weight": "roi_head.mask_heads.3.dynconv.norm_in.weight",
        "roi_head.mask_head.3.convs.0.conv.weight": "roi_head.mask_heads.3.convs.0.weight",
        "roi_head.mask_head.3.convs.3.conv.weight": "roi_head.mask_heads.3.convs.9.weight",
        "roi_head.mask_head.3.convs.3.bn.running_mean": "roi_head.mask_heads.3.convs.10.running_mean",
        "roi_head.mask_head.2.convs.1.bn.weight": "roi_head.mask_heads.2.convs.4.weight",
        "roi_head.mask_head.2.upsample.weight": "roi_head.mask_heads.2.deconv.weight",
        "roi_head.mask_head.5.conv_logits.bias": "roi_head.mask_heads.5.predictor.bias",
    }
    for official, ours in expect.items():
        assert torch.equal(out[ours], sd[official]), (official, ours)
    assert len(out) == 703 and len(set(float(v.flatten()[0]) for v in out.values())) == 703  # a bijection
    # the FrozenBN backbone takes the BN statistics and affine as its buffers
    model = build_model(setup_cfg(CFG, ["MODEL.NUM_CLASSES", "80"]))
    model.load_state_dict({k: v for k, v in out.items()}, strict=False)
    bn = model.backbone.bottom_up.body.layer2[1].bn2
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert bool((getattr(bn, name) == sd[f"backbone.layer2.1.bn2.{name}"][0]).all()), name


def test_convert_cli_queryinst(tmp_path):
    """instseg-convert --model queryinst on a small mmdetection-layout file (a few real keys)."""
    import subprocess
    import sys

    from instseg.convert import official_keys_from_ref

    shapes = official_keys_from_ref(str(MMDET_REF))
    keep = [k for k in shapes if k.startswith(("neck.", "rpn_head.", "backbone.layer1.0.", "roi_head.mask_head.0.convs."))]
    src, dst = tmp_path / "mmdet.pth", tmp_path / "ours.pth"
    torch.save({"state_dict": {k: torch.zeros(shapes[k]) for k in keep}, "meta": {}}, src)
    res = subprocess.run([sys.executable, str(REPO / "tools" / "convert_official_weights.py"), "--model", "queryinst", str(src), str(dst)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    obj = torch.load(dst, weights_only=True)
    assert obj["__converted_from__"] == "official-queryinst"
    n_nbt = sum(k.endswith("num_batches_tracked") for k in keep)
    n_backbone = sum(k.startswith("backbone.") and not k.endswith("num_batches_tracked") for k in keep)
    assert len(obj["model"]) == len(keep) - n_nbt
    assert f"{n_backbone} of them backbone" in res.stdout and "0 matched no rule" in res.stdout
    assert "backbone.fpn.inner_blocks.0.0.weight" in obj["model"] and "roi_head.mask_heads.0.convs.4.running_var" in obj["model"]


@pytest.mark.slow
def test_short_real_data_training_loss_falls(shared_data):
    """12 iterations on two fruits_nuts images at 96 px: the loss of the last iterations is below
    that of the first (real images and masks through the mapper, loader, matcher and all losses)."""
    from instseg.data import DatasetCatalog, MetadataCatalog, build_train_loader, register_coco_instances

    root = shared_data / "fruits_nuts"
    name = "qi_test_fruits"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, str(root / "annotations_train.json"), str(root / "images"))
    cfg = _small_cfg(["DATASETS.TRAIN", f"('{name}',)", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
                      "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.RANDOM_FLIP", "none"])
    assert MetadataCatalog.get(name).thing_classes == ["date", "fig", "hazelnut"]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    batch = next(iter(build_train_loader(cfg)))
    totals = []
    for _ in range(12):  # overfit one fixed batch
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-3:]) / 3 < 0.8 * sum(totals[:3]) / 3, totals
