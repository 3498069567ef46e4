"""RoI samplers: random (+ bg_iou_lo), OHEM and PISA against hand-computed cases."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder
from torchvision.ops import box_iou

from ltdet.models.roi_heads import LTRoIHeads
from ltdet.models.roi_samplers import (
    PISARoISampler,
    RandomRoISampler,
    RoICandidates,
    RoISamples,
    build_roi_sampler,
    hierarchical_rank,
    importance_weights,
    iou_hlr,
    ohem_select,
    score_hlr,
)


def _candidates(labels, ious):
    labels = torch.tensor(labels)
    boxes = torch.arange(labels.numel(), dtype=torch.float32)[:, None].repeat(1, 4) + torch.tensor(
        [0, 0, 5, 5.0]
    )
    return RoICandidates(
        boxes, labels, torch.zeros_like(labels), torch.tensor(ious), torch.zeros(1, 4)
    )


@pytest.fixture
def make_head(tiny_roi_heads):
    """`make_head(sampler=None, cls_loss=None, **roi_heads_settings)`: LTRoIHeads in train mode."""

    def _head(sampler=None, cls_loss=None, **kwargs):
        return LTRoIHeads.from_roi_heads(
            tiny_roi_heads(**kwargs), cls_loss=cls_loss, sampler=sampler
        ).train()

    return _head


# ----------------------------------------------------------------------------- random


def test_random_sampler_draws_like_torchvision(make_head):
    head = make_head({"type": "random"}, batch_size_per_image=8, positive_fraction=0.25)
    g = torch.Generator().manual_seed(3)
    labels = [torch.randint(-1, 4, (40,), generator=g), torch.randint(-1, 2, (25,), generator=g)]
    cands = [
        RoICandidates(
            torch.zeros(n.numel(), 4),
            n,
            torch.zeros_like(n),
            torch.rand(n.numel()),
            torch.zeros(1, 4),
        )
        for n in labels
    ]
    torch.manual_seed(7)
    ours = [s.indices for s in head.sampler(head.roi_scorer(), cands)]
    torch.manual_seed(7)
    pos, neg = BalancedPositiveNegativeSampler(8, 0.25)(labels)
    theirs = [torch.where(p | n)[0] for p, n in zip(pos, neg)]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_random_sampler_bg_iou_lo_never_picks_lower_negatives(make_head):
    # 3 positives, negatives with IoU 0.0 .. 0.45; batch 8, at most 2 positives
    ious = [0.7, 0.8, 0.9] + [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]
    cand = _candidates([1, 2, 1] + [0] * 10, ious)
    head = make_head(batch_size_per_image=8, positive_fraction=0.25)
    for lo, expected_neg in ((0.1, 6), (0.3, 4), (0.0, 6)):
        sampler = RandomRoISampler(bg_iou_lo=lo)
        for _ in range(5):
            idx = sampler(head.roi_scorer(), [cand])[0].indices
            labels, chosen_ious = cand.labels[idx], cand.ious[idx]
            assert (labels > 0).sum() == 2
            assert (labels == 0).sum() == expected_neg  # min(available in [lo, 0.5), 8 - 2)
            assert (chosen_ious[labels == 0] >= lo).all()


def test_random_sampler_bg_iou_lo_in_a_training_step(head_inputs, make_head):
    head = make_head({"type": "random", "bg_iou_lo": 0.1}, batch_size_per_image=32)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2), num_proposals=80)
    samples = head.select_training_samples(proposals, targets, features, shapes)
    labels, ious = torch.cat(samples.labels), torch.cat(samples.ious)
    assert (labels == 0).any() and (labels > 0).any()
    assert (ious[labels == 0] >= 0.1).all() and (ious[labels == 0] < 0.5).all()
    # the recorded IoU is the candidate's IoU with its matched ground truth
    for p, m, i, t in zip(samples.proposals, samples.matched_idxs, samples.ious, targets):
        assert torch.allclose(box_iou(p, t["boxes"]).max(1).values, i)
        pos = i >= 0.5
        assert torch.equal(box_iou(p, t["boxes"]).argmax(1)[pos], m[pos])


def test_random_sampler_rejects_bg_iou_lo_above_threshold(make_head):
    with pytest.raises(ValueError, match="bg_iou_lo"):
        make_head({"type": "random", "bg_iou_lo": 0.5})


def test_build_roi_sampler_errors_list_valid_choices():
    with pytest.raises(ValueError, match=r"valid values: \['ohem', 'pisa', 'random'\]"):
        build_roi_sampler({"type": "hard"})
    with pytest.raises(ValueError, match="nms_thresh"):
        build_roi_sampler({"type": "ohem", "nms": 0.7})
    with pytest.raises(ValueError, match="iou"):
        build_roi_sampler({"type": "pisa", "iou": "gt"})


# ----------------------------------------------------------------------------- OHEM


def test_ohem_select_hand_built():
    loss = torch.tensor([0.5, 2.0, 0.1, 1.5, 3.0, 0.7, 9.0, 0.2])
    labels = torch.tensor([0, 1, 0, 2, 0, 1, -1, 0])
    boxes = torch.tensor([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(8)])
    # by loss: 4(neg) 1(pos) 3(pos) 5(pos) 0 7 2; index 6 is ignored despite its loss
    assert ohem_select(loss, labels, boxes, 4, 1, None).tolist() == [0, 1, 4, 7]
    assert ohem_select(loss, labels, boxes, 4, 2, None).tolist() == [0, 1, 3, 4]
    assert ohem_select(loss, labels, boxes, 20, 20, None).tolist() == [0, 1, 2, 3, 4, 5, 7]
    # box 0 overlaps box 4 (IoU 0.82 > 0.7): NMS keeps the harder one (4) only
    boxes[0] = torch.tensor([81.0, 0, 91, 10])
    assert ohem_select(loss, labels, boxes, 4, 1, 0.7).tolist() == [1, 2, 4, 7]
    assert ohem_select(loss, labels, boxes, 4, 1, None).tolist() == [0, 1, 4, 7]
    # empty image
    assert ohem_select(loss[:0], labels[:0], boxes[:0], 4, 1, 0.7).numel() == 0


def test_ohem_keeps_top_loss_rois_of_the_box_head(head_inputs, make_head):
    head = make_head(
        {"type": "ohem", "nms_thresh": None}, batch_size_per_image=12, positive_fraction=0.25
    )
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 1))
    gt = [t["boxes"] for t in targets]
    cands = head.assign_candidates(
        head.add_gt_proposals(proposals, gt), gt, [t["labels"] for t in targets]
    )
    chosen = [s.indices for s in head.sampler(head.roi_scorer(features, shapes), cands)]
    # independent: box head on all candidates, CE + smooth L1 (beta 1/9) of each RoI
    with torch.no_grad():
        x = head.box_head(head.box_roi_pool(features, [c.boxes for c in cands], shapes))
        logits, deltas = head.box_predictor(x)
    offset = 0
    for c, idx in zip(cands, chosen):
        n = c.boxes.shape[0]
        lab = c.labels.clamp(min=0)
        loss = F.cross_entropy(logits[offset : offset + n], lab, reduction="none")
        pos = torch.where(lab > 0)[0]
        d = deltas[offset : offset + n].reshape(n, -1, 4)[pos, lab[pos]]
        tgt = head.box_coder.encode_single(c.gt_boxes[c.matched_idxs[pos]], c.boxes[pos])
        loss[pos] += F.smooth_l1_loss(d, tgt, beta=1 / 9, reduction="none").sum(1)
        loss[c.labels < 0] = -1.0
        order = torch.argsort(loss, descending=True)
        expected, num_pos = [], 0
        for i in order.tolist():  # the definition, element by element
            if loss[i] < 0 or len(expected) == 12:
                continue
            if c.labels[i] > 0:
                if num_pos == 3:
                    continue
                num_pos += 1
            expected.append(i)
        assert sorted(expected) == idx.tolist()
        offset += n


def test_ohem_scoring_pass_leaves_state_untouched(head_inputs, make_head):
    head = make_head({"type": "ohem"}, cls_loss={"type": "eqlv2"}, batchnorm=True)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    features, proposals, shapes, targets = head_inputs()
    head.select_training_samples(proposals, targets, features, shapes)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("loss", ["ce", "focal", "eqlv2"])
@pytest.mark.parametrize("sampler", ["ohem", "pisa"])
def test_mining_samplers_train_with_any_cls_loss(sampler, loss, head_inputs, make_head):
    head = make_head({"type": sampler}, cls_loss={"type": loss})
    features, proposals, shapes, targets = head_inputs()
    _, losses = head(features, proposals, shapes, targets)
    total = losses["loss_classifier"] + losses["loss_box_reg"]
    total.backward()
    assert torch.isfinite(total) and losses["loss_classifier"] > 0
    assert head.box_predictor.cls_score.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- PISA


def test_hierarchical_rank_orders_within_groups():
    groups = torch.tensor([2, 0, 2, 0, 2])
    scores = torch.tensor([0.1, 0.5, 0.9, 0.7, 0.9])
    # group 0: 0.7 (idx 3) then 0.5 (idx 1); group 2: 0.9 (2), 0.9 (4, later), 0.1 (0)
    assert hierarchical_rank(groups, [(scores, True)]).tolist() == [2, 1, 0, 0, 1]
    assert hierarchical_rank(groups[:0], [(scores[:0], True)]).numel() == 0


def test_iou_hlr_and_isr_p_weights_hand_computed():
    labels = torch.tensor([1, 1, 2, 1, 1, 1])
    gt = torch.tensor([0, 1, 2, 0, 0, 1])
    ious = torch.tensor([0.6, 0.8, 0.65, 0.9, 0.7, 0.55])
    # local ranks: gt0 .9->0 .7->1 .6->2, gt1 .8->0 .55->1, gt2 .65->0
    # class 1 by (local, -iou): .9 .8 .7 .55 .6 ; class 2: .65
    rank, n_max = iou_hlr(labels, gt, ious)
    assert rank.tolist() == [4, 1, 0, 0, 2, 3] and n_max == 5
    w = importance_weights(rank, n_max, gamma=2.0, beta=0.0)
    assert torch.allclose(w, torch.tensor([0.2, 0.8, 1.0, 1.0, 0.6, 0.4]) ** 2)
    w = importance_weights(rank, n_max, gamma=1.0, beta=0.5)
    assert torch.allclose(w, 0.5 * torch.tensor([0.2, 0.8, 1.0, 1.0, 0.6, 0.4]) + 0.5)


def test_score_hlr_hand_computed():
    a1, a2, a3 = [0, 0, 10, 10.0], [1, 0, 11, 10.0], [0, 1, 10, 11.0]  # a2, a3 overlap a1 > 0.5
    b1, b2 = [50, 50, 60, 60.0], [51, 51, 61, 61.0]
    c1 = [100, 100, 110, 110.0]
    boxes = torch.tensor([a2, c1, a1, b2, a3, b1])
    scores = torch.tensor([0.6, 0.5, 0.9, 0.4, 0.3, 0.8])
    # groups {a1 .9, a2 .6, a3 .3}, {b1 .8, b2 .4}, {c1 .5};
    # by (local rank, -score): a1 b1 c1 a2 b2 a3
    assert score_hlr(boxes, scores, 0.5).tolist() == [3, 2, 0, 4, 5, 1]
    assert score_hlr(boxes[:0], scores[:0], 0.5).numel() == 0


def test_isr_n_selection_and_weights_hand_computed(tiny_num_classes):
    a1, a2, a3 = [0, 0, 10, 10.0], [1, 0, 11, 10.0], [0, 1, 10, 11.0]
    b1, b2 = [50, 50, 60, 60.0], [51, 51, 61, 61.0]
    c1, low1, low2 = [100, 100, 110, 110.0], [20, 20, 30, 30.0], [70, 20, 80, 30.0]
    boxes = torch.tensor([a2, c1, a1, b2, a3, b1, low1, low2])
    max_fg = torch.tensor([0.6, 0.5, 0.9, 0.4, 0.3, 0.8, 0.01, 0.02])
    scores = torch.zeros(8, tiny_num_classes + 1)
    scores[torch.arange(8), torch.tensor([1, 2, 3, 1, 2, 5, 4, 1])] = max_fg
    deltas = torch.zeros(8, (tiny_num_classes + 1) * 4)  # predicted boxes = proposals
    loss = torch.tensor([1.0, 2.0, 0.5, 0.3, 0.2, 0.7, 0.05, 0.04])
    stub = SimpleNamespace(decode_boxes=BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single)
    sampler = PISARoISampler(neg_gamma=0.5, neg_beta=0.0)
    rank_order = [2, 5, 1, 0, 3, 4]  # a1 b1 c1 a2 b2 a3

    chosen, weight = sampler._isr_n(stub, boxes, scores, deltas, loss, 4)
    assert chosen.tolist() == rank_order[:4]
    w = (torch.tensor([6.0, 5, 4, 3]) / 6).sqrt()  # n_max = max(4 expected, 6 valid)
    w = w * loss[chosen].sum() / (loss[chosen] * w).sum()
    assert torch.allclose(weight, w)

    chosen, weight = sampler._isr_n(stub, boxes, scores, deltas, loss, 7)
    assert chosen[:6].tolist() == rank_order and chosen[6].item() in (6, 7)
    w = (torch.tensor([7.0, 6, 5, 4, 3, 2, 2]) / 7).sqrt()  # random fill takes the lowest weight
    w = w * loss[chosen].sum() / (loss[chosen] * w).sum()
    assert torch.allclose(weight, w)
    assert torch.allclose((weight * loss[chosen]).sum(), loss[chosen].sum())


def _pisa_samples():
    """Two images; image 0: 5 positives of class 1 on gts 0/1 and a negative; image 1: one
    positive of class 2 (IoU 0.95) on its gt 0 and a negative."""
    labels = [torch.tensor([1, 1, 1, 1, 1, 0]), torch.tensor([2, 0])]
    matched = [torch.tensor([0, 1, 0, 0, 1, 0]), torch.tensor([0, 0])]
    ious = [torch.tensor([0.6, 0.8, 0.9, 0.7, 0.55, 0.1]), torch.tensor([0.95, 0.2])]
    boxes = [torch.rand(6, 4), torch.rand(2, 4)]
    return RoISamples(
        proposals=boxes,
        labels=labels,
        matched_idxs=matched,
        ious=ious,
        regression_targets=[torch.zeros(6, 4), torch.zeros(2, 4)],
        matched_gt_boxes=boxes,
        gt_boxes=[torch.rand(2, 4), torch.rand(1, 4)],
    )


def test_pisa_isr_p_and_carl_weights_hand_computed(make_head, tiny_num_classes):
    head = make_head(
        {"type": "pisa", "iou": "proposal", "gamma": 2.0, "beta": 0.0, "k": 1.0, "bias": 0.2}
    )
    samples = _pisa_samples()
    logits = torch.randn(8, tiny_num_classes + 1, requires_grad=True)
    cls_w, box_w = head.sampler.loss_weights(
        head.roi_scorer(), logits, torch.zeros(8, (tiny_num_classes + 1) * 4), samples
    )
    labels = torch.cat(samples.labels)
    pos = torch.tensor([0, 1, 2, 3, 4, 6])
    # class 1 order .9 .8 .7 .55 .6 (gt 1 of image 1 is a different gt); class 2: .95 alone
    u = (5 - torch.tensor([4.0, 1, 0, 2, 3, 0])) / 5
    ce = F.cross_entropy(logits.detach()[pos], labels[pos], reduction="none")
    w = u**2 * ce.sum() / (u**2 * ce).sum()
    assert torch.allclose(cls_w[pos], w)
    assert torch.equal(cls_w[torch.tensor([5, 7])], torch.ones(2))
    p = logits.softmax(1)[pos, labels[pos]]
    c = 0.8 * p + 0.2
    assert torch.allclose(box_w, c * 6 / c.sum())
    (box_w * torch.arange(6.0)).sum().backward()  # box_w sums to 6: weight it to see a gradient
    assert logits.grad.abs().sum() > 0  # CARL's weight is differentiable in the scores


def test_pisa_regressed_iou_equals_proposal_iou_for_zero_deltas(
    head_inputs, make_head, tiny_num_classes
):
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    weights = {}
    for mode in ("regressed", "proposal"):
        head = make_head({"type": "pisa", "iou": mode, "isr_n": False}, batch_size_per_image=32)
        torch.manual_seed(0)
        samples = head.select_training_samples(proposals, targets, features, shapes)
        n = sum(len(x) for x in samples.labels)
        logits = torch.randn(n, tiny_num_classes + 1, generator=torch.Generator().manual_seed(1))
        weights[mode] = head.sampler.loss_weights(
            head.roi_scorer(), logits, torch.zeros(n, (tiny_num_classes + 1) * 4), samples
        )[0]
    assert torch.allclose(weights["regressed"], weights["proposal"], atol=1e-6)
    assert not torch.allclose(weights["proposal"], torch.ones_like(weights["proposal"]))


def test_carl_gradient_reaches_the_classifier(head_inputs, make_head):
    grads = {}
    for carl in (True, False):
        torch.manual_seed(0)
        head = make_head({"type": "pisa", "carl": carl})
        features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
        _, losses = head(features, proposals, shapes, targets)
        assert losses["loss_box_reg"] > 0
        # CARL is its own term, added to the unweighted box loss (mmdetection's PISARoIHead)
        assert ("loss_carl" in losses) == carl
        (losses["loss_box_reg"] + losses.get("loss_carl", 0)).backward()
        grads[carl] = head.box_predictor.cls_score.weight.grad
    assert grads[True].abs().sum() > 0
    assert grads[False] is None or grads[False].abs().sum() == 0


@pytest.mark.parametrize("gt", [(0, 0), (2, 0)])
def test_pisa_images_without_ground_truth(gt, head_inputs, make_head):
    head = make_head({"type": "pisa"}, cls_loss={"type": "focal"})
    features, proposals, shapes, targets = head_inputs(gt_per_image=gt)
    _, losses = head(features, proposals, shapes, targets)
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_classifier"] > 0
    if gt == (0, 0):
        assert losses["loss_box_reg"] == 0
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    assert head.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_pisa_negatives_are_top_score_hlr(head_inputs, make_head):
    head = make_head({"type": "pisa", "score_thresh": 0.0}, batch_size_per_image=16)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(0, 0), num_proposals=40)
    cands = head.assign_candidates(
        proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets]
    )
    selections = head.sampler(head.roi_scorer(features, shapes), cands)
    with torch.no_grad():
        logits, deltas = head.box_predictor(
            head.box_head(head.box_roi_pool(features, proposals, shapes))
        )
    for i, (cand, sel) in enumerate(zip(cands, selections)):
        rows = slice(40 * i, 40 * (i + 1))
        score, cls = logits[rows].softmax(1)[:, 1:].max(1)
        d = deltas[rows].reshape(40, -1, 4)[torch.arange(40), cls + 1]
        rank = score_hlr(head.box_coder.decode_single(d, cand.boxes), score, 0.5)
        assert sel.indices.tolist() == sorted(torch.argsort(rank)[:16].tolist())
        assert sel.cls_weight.shape == (16,) and (sel.cls_weight > 0).all()
