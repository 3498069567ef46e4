"""LTRoIHeads: losses, weights and hooks against formulas computed here; torchvision parity."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from ltdet.losses import build_loss
from ltdet.models.roi_heads import LTRoIHeads


@pytest.fixture
def lt_heads(tiny_roi_heads):
    """`lt_heads(rh=None, **patch_kwargs)`: LTRoIHeads (train mode) from `rh`, else from a fresh
    `tiny_roi_heads()`."""

    def _lt(rh=None, **kwargs):
        rh = rh if rh is not None else tiny_roi_heads()
        return LTRoIHeads.from_roi_heads(rh, **kwargs).train()

    return _lt


def _independent_losses(head, samples, logits, deltas, roi_weight=None, box_weight=None):
    """torchvision's Fast R-CNN loss written out: mean CE over sampled RoIs, smooth L1 (beta 1/9)
    summed over positives / number of sampled RoIs; optional per-RoI / per-positive weights."""
    labels = torch.cat(samples.labels)
    n = labels.numel()
    ce = F.cross_entropy(logits, labels, reduction="none")
    cls = (ce * (roi_weight if roi_weight is not None else 1)).sum() / n
    pos = torch.where(labels > 0)[0]
    d = deltas.reshape(n, -1, 4)[pos, labels[pos]]
    targets = head.box_coder.encode_single(
        torch.cat(samples.matched_gt_boxes)[pos], torch.cat(samples.proposals)[pos]
    )
    sl1 = F.smooth_l1_loss(d, targets, beta=1 / 9, reduction="none").sum(1)
    box = (sl1 * (box_weight if box_weight is not None else 1)).sum() / n
    return cls, box


def test_default_losses_equal_torchvision_roi_heads(head_inputs, lt_heads, tiny_roi_heads):
    vanilla = tiny_roi_heads().train()
    patched = lt_heads(copy.deepcopy(vanilla))
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 1))
    torch.manual_seed(5)
    _, ref = vanilla(features, proposals, shapes, targets)
    torch.manual_seed(5)
    _, ours = patched(features, proposals, shapes, targets)
    assert ref.keys() == ours.keys() == {"loss_classifier", "loss_box_reg"}
    for k in ref:
        assert torch.allclose(ref[k], ours[k], rtol=1e-6, atol=1e-7), k
    sum(ref.values()).backward()
    sum(ours.values()).backward()
    for a, b in zip(vanilla.parameters(), patched.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_box_losses_formula_with_mixup_weights(head_inputs, lt_heads, tiny_num_classes):
    head = lt_heads()
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    targets[0]["weights"] = torch.tensor([0.2, 0.5, 0.9])
    targets[1]["weights"] = torch.tensor([0.3, 0.6])
    samples = head.select_training_samples(proposals, targets, features, shapes)
    logits = torch.randn(sum(map(len, samples.labels)), tiny_num_classes + 1, requires_grad=True)
    deltas = torch.randn(logits.shape[0], (tiny_num_classes + 1) * 4) * 0.1
    losses = head.box_losses(logits, deltas, samples)
    labels = torch.cat(samples.labels)
    gt_w = torch.cat([t["weights"][m] for t, m in zip(targets, samples.matched_idxs)])
    roi_w = torch.where(labels > 0, gt_w, torch.ones_like(gt_w))
    assert (roi_w < 1).any() and (roi_w == 1).any()
    cls, box = _independent_losses(head, samples, logits, deltas, roi_w, roi_w[labels > 0])
    assert torch.allclose(losses["loss_classifier"], cls)
    assert torch.allclose(losses["loss_box_reg"], box)


def test_mixup_weights_shape_is_checked(head_inputs, lt_heads):
    head = lt_heads()
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    targets[0]["weights"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"targets\[0\]\['weights'\]"):
        head.select_training_samples(proposals, targets, features, shapes)


class RecordingLDS(nn.Module):
    def __init__(self):
        super().__init__()
        self.updates = []

    def update(self, ious):
        self.updates.append(ious.clone())

    def weights(self, ious):
        return 2.0 * ious


def test_lds_hook_weights_positive_box_loss(head_inputs, lt_heads, tiny_num_classes):
    lds = RecordingLDS()
    head = lt_heads(lds=lds)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    samples = head.select_training_samples(proposals, targets, features, shapes)
    n = sum(map(len, samples.labels))
    logits = torch.randn(n, tiny_num_classes + 1)
    deltas = torch.randn(n, (tiny_num_classes + 1) * 4) * 0.1
    losses = head.box_losses(logits, deltas, samples)
    labels = torch.cat(samples.labels)
    pos_ious = torch.cat(
        [box_iou(p, t["boxes"]).max(1).values for p, t in zip(samples.proposals, targets)]
    )
    pos_ious = pos_ious[labels > 0]
    assert len(lds.updates) == 1 and torch.allclose(lds.updates[0], pos_ious)
    cls, box = _independent_losses(head, samples, logits, deltas, None, 2.0 * pos_ious)
    assert torch.allclose(losses["loss_box_reg"], box) and torch.allclose(
        losses["loss_classifier"], cls
    )


def test_lds_delta_target_bins_the_regression_target_norm(head_inputs, lt_heads, tiny_num_classes):
    lds = RecordingLDS()
    lds.target = "delta"
    head = lt_heads(lds=lds)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    samples = head.select_training_samples(proposals, targets, features, shapes)
    n = sum(map(len, samples.labels))
    logits = torch.randn(n, tiny_num_classes + 1)
    deltas = torch.randn(n, (tiny_num_classes + 1) * 4) * 0.1
    head.box_losses(logits, deltas, samples)
    labels = torch.cat(samples.labels)
    pos = labels > 0
    expected = head.box_coder.encode_single(
        torch.cat(samples.matched_gt_boxes)[pos], torch.cat(samples.proposals)[pos]
    ).norm(dim=1)
    assert len(lds.updates) == 1 and torch.allclose(lds.updates[0], expected)


class RecordingFDS(nn.Module):
    """Zeroes the regressor input and records what it saw."""

    def __init__(self):
        super().__init__()
        self.seen, self.updated = [], []

    def forward(self, features, ious):
        self.seen.append((features.clone(), ious.clone()))
        return features * 0

    def update(self, features, ious):
        self.updated.append(ious.clone())


def test_fds_hook_only_touches_the_regressor_in_training(head_inputs, lt_heads):
    fds = RecordingFDS()
    head = lt_heads(fds=fds)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    torch.manual_seed(0)
    samples = head.select_training_samples(proposals, targets, features, shapes)
    x = head.box_head(head.box_roi_pool(features, samples.proposals, shapes))
    ious = torch.cat(samples.ious)
    logits, deltas = head.predict_boxes(x, ious)
    ref_logits, _ = head.box_predictor(x)
    assert torch.equal(logits, ref_logits)
    assert torch.allclose(deltas, head.box_predictor.bbox_pred.bias.expand_as(deltas))
    assert torch.equal(fds.seen[0][1], ious) and torch.equal(fds.updated[0], ious)
    # full training step passes the sampled RoIs' IoUs; inference never calls FDS
    fds.seen.clear()
    head(features, proposals, shapes, targets)
    assert len(fds.seen) == 1 and fds.seen[0][0].shape[0] == fds.seen[0][1].shape[0]
    head.eval()
    with torch.no_grad():
        head(features, proposals, shapes)
    assert len(fds.seen) == 1


def test_ltdet_lds_and_fds_modules_train_in_the_head(head_inputs, lt_heads):
    from ltdet.imbalance import RoIFDS, RoILDS

    lds, fds = RoILDS(), RoIFDS(32, start_smooth=0)
    head = lt_heads(lds=lds, fds=fds)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    for _ in range(2):
        _, losses = head(features, proposals, shapes, targets)
        (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    assert int(fds.steps) == 2 and int(lds.counts.sum()) > 0
    assert torch.isfinite(losses["loss_box_reg"]) and losses["loss_box_reg"] > 0


def test_fds_requires_predictor_layout(lt_heads, tiny_roi_heads):
    rh = tiny_roi_heads()
    rh.box_predictor = nn.Sequential(nn.Linear(32, 6))
    with pytest.raises(TypeError, match="cls_score"):
        lt_heads(rh, fds=RecordingFDS())


class RecordingBoxLoss(nn.Module):
    needs_boxes = True

    def forward(self, pred, target, weight=None, reduction="mean", avg_factor=None):
        self.pred, self.target = pred.detach().clone(), target.clone()
        return (pred - target).abs().sum() / avg_factor


def test_needs_boxes_loss_gets_decoded_boxes(head_inputs, lt_heads, tiny_num_classes):
    box_loss = RecordingBoxLoss()
    head = lt_heads(box_loss=box_loss)
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    samples = head.select_training_samples(proposals, targets, features, shapes)
    n = sum(map(len, samples.labels))
    deltas = torch.randn(n, (tiny_num_classes + 1) * 4) * 0.1
    head.box_losses(torch.randn(n, tiny_num_classes + 1), deltas, samples)
    labels = torch.cat(samples.labels)
    pos = torch.where(labels > 0)[0]
    expected = head.box_coder.decode_single(
        deltas.reshape(n, -1, 4)[pos, labels[pos]], torch.cat(samples.proposals)[pos]
    )
    gt = torch.cat([t["boxes"][m] for t, m in zip(targets, samples.matched_idxs)])[pos]
    assert torch.allclose(box_loss.pred, expected) and torch.equal(box_loss.target, gt)


def test_postprocess_scores_with_the_loss_activation(lt_heads, tiny_roi_heads):
    rh = tiny_roi_heads(score_thresh=0.3, detections_per_img=3)
    head = lt_heads(rh, cls_loss={"type": "focal"}).eval()
    proposals = [torch.tensor([[10.0, 10, 50, 60]]), torch.tensor([[5.0, 5, 30, 30]])]
    logits = torch.tensor([[0.0, 2.0, -1.0, 0.5, -3.0, 1.0], [4.0, -2.0, -2.0, -2.0, -2.0, -2.0]])
    boxes, scores, labels = head.postprocess_detections(
        logits, torch.zeros(2, 24), proposals, [(64, 64), (64, 64)]
    )
    fg = logits[0, 1:].sigmoid()  # 0.88, 0.27, 0.62, 0.05, 0.73: three above 0.3
    assert torch.allclose(scores[0], torch.sort(fg[fg > 0.3], descending=True).values)
    assert labels[0].tolist() == [1, 5, 3]
    assert torch.equal(boxes[0], proposals[0].expand(3, 4))
    assert scores[1].numel() == 0  # sigmoid(-2) = 0.12 < 0.3 (a softmax would give 0.002 too)
    softmax_head = lt_heads(tiny_roi_heads(score_thresh=0.3, detections_per_img=3)).eval()
    _, sm_scores, _ = softmax_head.postprocess_detections(
        logits, torch.zeros(2, 24), proposals, [(64, 64), (64, 64)]
    )
    assert torch.allclose(sm_scores[0], logits[0].softmax(0)[1:][logits[0].softmax(0)[1:] > 0.3])


def test_images_without_ground_truth_train(head_inputs, lt_heads):
    head = lt_heads(cls_loss={"type": "focal"})
    features, proposals, shapes, targets = head_inputs(gt_per_image=(0, 0))
    _, losses = head(features, proposals, shapes, targets)
    assert losses["loss_box_reg"] == 0 and losses["loss_classifier"] > 0
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    assert head.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_no_sampled_rois_gives_zero_loss_with_graph(head_inputs, lt_heads):
    head = lt_heads(sampler={"type": "random", "bg_iou_lo": 0.1})
    features, proposals, shapes, targets = head_inputs(gt_per_image=(0, 0))
    _, losses = head(features, proposals, shapes, targets)  # no IoU >= 0.1 without gt
    assert losses["loss_classifier"] == 0 and losses["loss_box_reg"] == 0
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()


def test_scoring_pass_keeps_batchnorm_and_loss_state(head_inputs, lt_heads, tiny_roi_heads):
    head = lt_heads(tiny_roi_heads(batchnorm=True), cls_loss={"type": "eqlv2"})
    features, proposals, shapes, targets = head_inputs()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    scorer = head.roi_scorer(features, shapes)
    logits, _ = scorer.roi_logits(proposals)
    scorer.cls_loss_per_roi(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert head.training and head.cls_loss.training
    head(features, proposals, shapes, targets)  # a real step does update them
    assert not torch.equal(head.box_head.bn.running_mean, before["box_head.bn.running_mean"])


def test_from_roi_heads_shares_modules_and_settings(tiny_num_classes, tiny_roi_heads):
    rh = tiny_roi_heads(
        score_thresh=0.2,
        nms_thresh=0.4,
        detections_per_img=7,
        fg_iou_thresh=0.6,
        bg_iou_thresh=0.4,
        batch_size_per_image=24,
        positive_fraction=0.5,
    )
    head = LTRoIHeads.from_roi_heads(
        rh, cls_loss=build_loss({"type": "ce"}, num_classes=tiny_num_classes)
    )
    assert head.box_head is rh.box_head and head.box_predictor is rh.box_predictor
    assert head.box_roi_pool is rh.box_roi_pool
    assert (head.score_thresh, head.nms_thresh, head.detections_per_img) == (0.2, 0.4, 7)
    assert (head.proposal_matcher.high_threshold, head.proposal_matcher.low_threshold) == (0.6, 0.4)
    assert head.sampler.budget(head.roi_scorer()) == (24, 12)
    assert head.box_coder.weights == rh.box_coder.weights
    assert not head.has_mask() and not head.has_keypoint()


def test_cls_loss_class_count_must_match_predictor(lt_heads):
    with pytest.raises(ValueError, match="num_classes=3"):
        lt_heads(cls_loss=build_loss({"type": "ce"}, num_classes=3))
    with pytest.raises(TypeError, match="activation"):
        lt_heads(cls_loss=nn.CrossEntropyLoss())
