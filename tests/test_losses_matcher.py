"""Shared losses and matchers against hand-computed values and brute force."""
import itertools
import math

import pytest
import torch

from instseg.modeling.losses import (
    dice_coefficient_matrix,
    dice_loss,
    focal_classification_loss,
    focal_cost_matrix,
)
from instseg.modeling.matcher import NonFiniteCostError, hungarian_assign
from sparseinst.matcher import DiceScoreMatcher
from sparseinst.objectness import binarized_mask_iou


def test_dice_loss_hand_computed():
    # sigmoid(0) = 0.5 everywhere; target covers half of 4 pixels.
    logits = torch.zeros(1, 4)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # squared: 2 * (0.5 + 0.5) / (4 * 0.25 + 2 + 1e-4)
    expected = 1 - 2.0 / (3.0 + 1e-4)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # plain sums with +1 smoothing (Mask2Former / FastInst): (2 * 1 + 1) / (2 + 2 + 1)
    assert dice_loss(logits, target, squared=False, eps_num=1.0, eps_den=1.0).item() == pytest.approx(1 - 3 / 5, rel=1e-6)


def test_dice_matrix_matches_pairwise_loss():
    torch.manual_seed(0)
    p, t = torch.randn(5, 30), (torch.rand(3, 30) > 0.5).float()
    mat = dice_coefficient_matrix(p, t)
    for i in range(5):
        for j in range(3):
            loss = dice_loss(p[i : i + 1], t[j : j + 1]).item()
            assert mat[i, j].item() == pytest.approx(1 - loss, abs=1e-6)


def test_focal_loss_hand_computed():
    # logit 0 -> p = 0.5, CE = ln 2, (1 - p_t)^2 = 0.25
    logits = torch.zeros(2, 3)
    target = torch.tensor([1, 3])  # image 0: class 1; image 1: background (3 = K)
    fg = 0.25 * 0.25 * math.log(2)  # alpha * 0.25 * ln2 for the one positive entry
    bg = 0.75 * 0.25 * math.log(2)  # (1 - alpha) * 0.25 * ln2 for each negative entry
    expected = fg + 5 * bg
    assert focal_classification_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_classification_loss_rejects_bad_classes():
    with pytest.raises(ValueError):
        focal_classification_loss(torch.zeros(2, 3), torch.tensor([0, 4]))


def test_focal_cost_prefers_confident_correct_class():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    cost = focal_cost_matrix(logits, torch.tensor([0, 1]))
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]


def test_binarized_iou_hand_computed():
    pred = torch.tensor([[5.0, 5.0, -5.0, -5.0]])  # foreground pixels 0, 1
    tgt = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # foreground pixels 0, 2
    assert binarized_mask_iou(pred, tgt).item() == pytest.approx(1 / 3, abs=1e-5)


def _brute_force(score, maximize):
    n, m = score.shape
    best = None
    if n >= m:
        for perm in itertools.permutations(range(n), m):
            total = sum(score[perm[j], j].item() for j in range(m))
            if best is None or (total > best if maximize else total < best):
                best = total
    else:
        for perm in itertools.permutations(range(m), n):
            total = sum(score[i, perm[i]].item() for i in range(n))
            if best is None or (total > best if maximize else total < best):
                best = total
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("maximize", [True, False])
def test_hungarian_equals_brute_force(seed, maximize):
    g = torch.Generator().manual_seed(seed)
    n, m = [(5, 3), (4, 4), (3, 5)][seed % 3]
    score = torch.rand(n, m, generator=g)
    rows, cols = hungarian_assign(score, maximize=maximize)
    assert len(rows) == min(n, m) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    total = score[rows, cols].sum().item()
    assert total == pytest.approx(_brute_force(score, maximize), abs=1e-6)


def test_dice_score_matcher_equals_brute_force_on_eq1():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g)
    masks = torch.randn(5, 6, 6, generator=g)
    labels = torch.tensor([2, 0, 3])
    tmasks = (torch.rand(3, 6, 6, generator=g) > 0.5).float()
    matcher = DiceScoreMatcher(alpha=0.8, beta=0.2)
    (rows, cols), = matcher({"pred_logits": logits[None], "pred_masks": masks[None]}, [{"labels": labels, "masks": tmasks}])
    # Eq. 1 computed independently, element by element
    score = torch.zeros(5, 3)
    for i in range(5):
        for k in range(3):
            p = torch.sigmoid(masks[i]).flatten()
            t = tmasks[k].flatten()
            dice = 2 * (p * t).sum() / ((p * p).sum() + (t * t).sum() + 1e-4)
            score[i, k] = torch.sigmoid(logits[i, labels[k]]) ** 0.2 * dice ** 0.8
    assert score[rows, cols].sum().item() == pytest.approx(_brute_force(score, True), abs=1e-5)


def test_matcher_empty_targets():
    matcher = DiceScoreMatcher()
    out = matcher({"pred_logits": torch.randn(1, 4, 2), "pred_masks": torch.randn(1, 4, 3, 3)},
                  [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 3, 3)}])
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0


def test_non_finite_cost_is_named():
    cost = torch.rand(3, 2)
    cost[1, 1] = float("nan")
    with pytest.raises(NonFiniteCostError, match="dice-score matrix"):
        hungarian_assign(cost, name="dice-score matrix")


def test_matcher_costs_in_float32_under_half_inputs():
    # fp16 logits of large magnitude: the cost must still be finite (computed in float32)
    logits = torch.full((1, 3, 2), 60000.0, dtype=torch.float16)
    masks = torch.full((1, 3, 4, 4), -60000.0, dtype=torch.float16)
    out = DiceScoreMatcher()({"pred_logits": logits, "pred_masks": masks},
                             [{"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)}])
    assert out[0][0].numel() == 1


def test_num_instances_across_ranks_counts_and_caps():
    """Single process: the count is the plain sum of instances, at least 1; ``max_per_image``
    caps each image at N (one-to-one matching yields min(N, #GT) positives)."""
    from instseg.modeling.losses.normalizer import num_instances_across_ranks

    targets = [{"labels": torch.zeros(k, dtype=torch.int64)} for k in (3, 0, 150)]
    assert num_instances_across_ranks(targets, "cpu") == 153.0
    assert num_instances_across_ranks(targets, "cpu", max_per_image=100) == 103.0
    assert num_instances_across_ranks(targets, "cpu", max_per_image=2) == 4.0
    assert num_instances_across_ranks(targets[1:2], "cpu") == 1.0  # no instance: clamped at 1
    with pytest.raises(ValueError, match="max_per_image"):
        num_instances_across_ranks(targets, "cpu", max_per_image=0)


def test_box_cost_with_loc_cost_is_fassst_pre_refactor_expression_bit_for_bit():
    """FASSST matches with the shared box cost: its own location term (L1 on the unsorted
    (t, l, b, r), or the focal coordinate cost) through ``loc_cost``, GIoU on the sorted normalized
    boxes; the result equals the expression FASSST computed itself before, inverted slots included."""
    from torchvision.ops import generalized_box_iou

    from fassst.criterion import FASSSTCriterion, focal_coordinate_loss
    from fassst.instance_attention import tlbr_to_xyxy
    from instseg.modeling.matcher import box_cost_matrix

    g = torch.Generator().manual_seed(5)
    box_logits, cls_logits = torch.randn(7, 4, generator=g) * 2, torch.randn(7, 3, generator=g)
    assert bool(((box_logits[:, 2] < box_logits[:, 0]) | (box_logits[:, 3] < box_logits[:, 1])).any())  # inverted slots
    tl = torch.rand(4, 2, generator=g) * 0.5
    tgt = torch.cat([tl, tl + 0.1 + torch.rand(4, 2, generator=g) * 0.4], 1)  # (t, l, b, r)
    labels = torch.tensor([0, 2, 1, 2])
    for loc_cost in ("l1", "focal"):
        crit = FASSSTCriterion(num_classes=3, matcher_loc_cost=loc_cost, matcher_giou_weight=0.5)
        p = box_logits.sigmoid()
        if loc_cost == "l1":
            loc = torch.cdist(p, tgt, p=1)
        else:
            loc = focal_coordinate_loss(box_logits[:, None].expand(7, 4, 4), tgt[None].expand(7, 4, 4)).sum(-1)
        giou = generalized_box_iou(tlbr_to_xyxy(p, 1.0, 1.0), tlbr_to_xyxy(tgt, 1.0, 1.0))
        before = 1.25 * focal_cost_matrix(cls_logits, labels) + 3.0 * loc + 0.5 * -giou
        shared = box_cost_matrix(
            cls_logits, tlbr_to_xyxy(p, 1.0, 1.0), p.new_ones(4), labels, tlbr_to_xyxy(tgt, 1.0, 1.0),
            cost_class=1.25, cost_l1=3.0, cost_giou=0.5, loc_cost=crit._loc_cost(box_logits, tgt),
        )
        assert torch.equal(shared, before), loc_cost
    with pytest.raises(ValueError, match="loc_cost"):
        box_cost_matrix(cls_logits, p, p.new_ones(4), labels, tgt, loc_cost=torch.zeros(7, 3))


# ----------------------------------------------------------------- set-criterion helpers
def _two_image_match():
    """Image 0: 3 targets, predictions 4 and 1 matched to targets 2 and 0; image 1: no target;
    image 2: 1 target, prediction 3 matched to it."""
    targets = [
        {"labels": torch.tensor([7, 8, 9]), "boxes": torch.tensor([[0.0, 0, 1, 1], [1.0, 1, 2, 2], [2.0, 2, 3, 3]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[4.0, 4, 5, 5]])},
    ]
    e = torch.empty(0, dtype=torch.int64)
    indices = [(torch.tensor([4, 1]), torch.tensor([2, 0])), (e, e.clone()), (torch.tensor([3]), torch.tensor([0]))]
    return targets, indices


def test_matched_prediction_index_hand_computed():
    from instseg.modeling.losses import matched_prediction_index

    _, indices = _two_image_match()
    batch_idx, src_idx = matched_prediction_index(indices)
    assert batch_idx.tolist() == [0, 0, 2] and src_idx.tolist() == [4, 1, 3]
    assert batch_idx.dtype == src_idx.dtype == torch.int64
    x = torch.arange(3 * 5 * 2).view(3, 5, 2)  # (B, N, 2)
    assert x[batch_idx, src_idx].tolist() == [[8, 9], [2, 3], [26, 27]]
    empty_b, empty_s = matched_prediction_index([])
    assert empty_b.numel() == empty_s.numel() == 0


def test_gather_matched_targets_hand_computed():
    from instseg.modeling.losses import gather_matched_targets

    targets, indices = _two_image_match()
    assert gather_matched_targets(targets, indices, "labels").tolist() == [9, 7, 5]
    assert gather_matched_targets(targets, indices, "boxes").tolist() == [[2, 2, 3, 3], [0, 0, 1, 1], [4, 4, 5, 5]]
    with pytest.raises(ValueError, match="matched images"):
        gather_matched_targets(targets[:2], indices, "labels")


def test_matched_target_classes_hand_computed():
    from instseg.modeling.losses import matched_target_classes

    targets, indices = _two_image_match()
    out = matched_target_classes(targets, indices, (3, 5), background=80)
    assert out.dtype == torch.int64
    assert out.tolist() == [[80, 7, 80, 80, 9], [80] * 5, [80, 80, 80, 5, 80]]


# ----------------------------------------------------------------- shared conv stack
def test_conv_norm_relu_stack_keys_layout_and_rng_order():
    from torch import nn

    from instseg.modeling.layers import DeformConv, conv_norm_relu_stack
    from instseg.modeling.norm import get_norm

    gn = conv_norm_relu_stack(2, 16, 32, norm="GN")
    assert [type(m).__name__ for m in gn] == ["Conv2d", "GroupNorm", "ReLU", "Conv2d", "GroupNorm", "ReLU"]
    assert list(gn.state_dict()) == ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias"]
    plain = conv_norm_relu_stack(2, 16, 32, last_relu=False)
    assert list(plain.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"] and len(plain) == 3
    assert gn[0].padding == (1, 1) and gn[0].in_channels == 16 and gn[3].in_channels == 32
    assert conv_norm_relu_stack(1, 8, 8, kernel_size=1)[0].padding == (0, 0)
    assert len(conv_norm_relu_stack(0, 8, 8)) == 0
    deform = conv_norm_relu_stack(
        2, 8, 8, conv_layer=lambda i, a, b: DeformConv(a, b) if i == 1 else nn.Conv2d(a, b, 3, padding=1)
    )
    assert isinstance(deform[2], DeformConv) and "2.offset.weight" in deform.state_dict()
    with pytest.raises(ValueError):
        conv_norm_relu_stack(-1, 8, 8)

    # the same weights as the hand-written loops it replaces (RNG drawn conv by conv)
    def hand(num, cin, cout, norm, last_relu):
        layers = []
        for i in range(num):
            layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=not norm))
            n = get_norm(norm, cout)
            if n is not None:
                layers.append(n)
            if last_relu or i < num - 1:
                layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    for norm, last_relu in (("BN", True), ("", True), ("GN", False)):
        torch.manual_seed(0)
        a = hand(3, 16, 32, norm, last_relu)
        torch.manual_seed(0)
        b = conv_norm_relu_stack(3, 16, 32, 3, norm, last_relu=last_relu)
        assert repr(a) == repr(b)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fastinst_dice_cost_is_the_shared_dice_matrix_with_plus_one_smoothing():
    from fastinst.matcher import batch_dice_cost

    g = torch.Generator().manual_seed(2)
    logits, tgt = torch.randn(6, 50, generator=g), (torch.rand(4, 50, generator=g) > 0.5).float()
    p = logits.sigmoid()
    before = 1 - (2 * p @ tgt.t() + 1) / (p.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)  # the formula FastInst had
    assert torch.equal(batch_dice_cost(logits, tgt), before)
    # hand-computed: sigmoid(0) = 0.5 on 4 points, target on 2 of them: 1 - (2 * 1 + 1) / (2 + 2 + 1)
    assert batch_dice_cost(torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]])).item() == pytest.approx(0.4)
