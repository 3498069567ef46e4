"""Shared builders for the RoI head / sampler / patch tests: tiny torchvision detectors and a
backbone-free RoI head (features given directly) that runs in milliseconds."""
import torch
from torch import nn
from torchvision.models.detection import (fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn,
                                          fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

NUM_CLASSES = 5  # foreground classes C; predictors have C + 1 outputs
IMAGE = 64

BUILDERS = {
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
}


def tiny_detector(name="fasterrcnn_mobilenet_v3_large_fpn", num_classes=NUM_CLASSES, size=IMAGE,
                  freeze_backbone=True, **overrides):
    """A torchvision detector from its own builder, weights=None, sized for a 2-core CPU."""
    kwargs = dict(weights=None, weights_backbone=None, num_classes=num_classes + 1, min_size=size,
                  max_size=size, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                  rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_batch_size_per_image=16,
                  box_detections_per_img=10)
    kwargs.update(overrides)
    model = BUILDERS[name](**kwargs)
    if freeze_backbone:
        # the tests are about the RoI head; a frozen backbone keeps backward cheap
        model.backbone.requires_grad_(False)
    return model


def detection_batch(size=IMAGE, masks=False, empty_second=True):
    """Two images: one with two boxes (labels 1 and 3), one without any (when empty_second)."""
    images = [torch.rand(3, size, size), torch.rand(3, size, size)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 36.0, 44.0], [24.0, 20.0, 60.0, 58.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4) if empty_second else torch.tensor([[10.0, 10.0, 50.0, 40.0]]),
                "labels": torch.zeros(0, dtype=torch.int64) if empty_second else torch.tensor([2])}]
    if masks:
        for t in targets:
            m = torch.zeros(t["boxes"].shape[0], size, size, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(t["boxes"].round().long().tolist()):
                m[i, y1:y2, x1:x2] = 1
            t["masks"] = m
    return images, targets


class BNBoxHead(nn.Module):
    """TwoMLPHead with a BatchNorm, to check that scoring passes keep running statistics."""

    def __init__(self, in_channels, representation):
        super().__init__()
        self.fc = nn.Linear(in_channels, representation)
        self.bn = nn.BatchNorm1d(representation)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x.flatten(1))))


def tiny_roi_heads(num_classes=NUM_CLASSES, batch_size_per_image=16, positive_fraction=0.25,
                   channels=8, representation=32, batchnorm=False, **kwargs):
    """A torchvision RoIHeads on one feature map "0" of stride 4 (no backbone)."""
    pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)
    head = (BNBoxHead if batchnorm else TwoMLPHead)(channels * 7 * 7, representation)
    settings = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=batch_size_per_image,
                    positive_fraction=positive_fraction, bbox_reg_weights=None, score_thresh=0.05,
                    nms_thresh=0.5, detections_per_img=100)
    settings.update(kwargs)
    return RoIHeads(pool, head, FastRCNNPredictor(representation, num_classes + 1), **settings)


def head_inputs(num_images=2, size=128, channels=8, num_proposals=60, gt_per_image=(2, 0), seed=0):
    """(features, proposals, image_shapes, targets): proposals jittered around the ground truth
    (so there are positives) plus random boxes; image i has gt_per_image[i] boxes."""
    g = torch.Generator().manual_seed(seed)
    features = {"0": torch.randn(num_images, channels, size // 4, size // 4, generator=g)}
    proposals, targets = [], []
    for i in range(num_images):
        k = gt_per_image[i]
        xy = torch.rand(k, 2, generator=g) * size * 0.5
        wh = 20 + torch.rand(k, 2, generator=g) * size * 0.4
        gt = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        labels = torch.randint(1, NUM_CLASSES + 1, (k,), generator=g)
        near = []
        if k:
            base = gt[torch.randint(0, k, (num_proposals // 2,), generator=g)]
            jitter = torch.randn(num_proposals // 2, 4, generator=g) * 4
            near = [(base + jitter).clamp(0, size - 1)]
        xy = torch.rand(num_proposals - num_proposals // 2 * bool(k), 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(xy.shape[0], 2, generator=g) * size * 0.3
        rand = torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1)
        p = torch.cat(near + [rand])
        p[:, 2:] = torch.maximum(p[:, 2:], p[:, :2] + 2)
        proposals.append(p)
        targets.append({"boxes": gt, "labels": labels})
    return features, proposals, [(size, size)] * num_images, targets
