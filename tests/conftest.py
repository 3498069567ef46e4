"""Settings and fixtures shared by more than one folder of the test tree.

The tree mirrors the package (tests/data, tests/losses, tests/imbalance, tests/models,
tests/engine, tests/evaluation; cross-cutting tests at the top). A helper used by one folder only
lives in that folder's conftest.py. Helpers are exposed as factory fixtures (the fixture returns
the builder, called with the same arguments as before), so a test asks for `make_batch` and
calls `make_batch(n=8)`.
"""

import importlib.util
import json
import os
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from ltdet.config import load_config
from ltdet.data.synthetic import make_synthetic_lvis
from ltdet.losses import LOSSES, ClassificationLoss, RegressionLoss

# Two cores: keep each test single-threaded so parallel workers and gloo processes don't thrash.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- tiny LVIS / COCO json data sets with real JPEGs (tests/data, tests/engine, top level) -----
# Non-contiguous, unsorted category ids: labels must follow sorted ids (3 -> 1, 7 -> 2, 11 -> 3).
CAT_IDS = [11, 3, 7]
SIZES = [(64, 48), (48, 64), (80, 40), (40, 40)]  # (width, height) per image, cycled


def _write_images(folder, n, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[:, : w // 2] = (0, 0, 255)  # BGR red on the left half: checks BGR -> RGB
        name = f"{i + 1:012d}.jpg"
        assert cv2.imwrite(os.path.join(folder, name), img)
        names.append(name)
    return names


def _annotations(n_images, crowd=False):
    """Two boxes per image (none on the last image); ids 100+."""
    anns, k = [], 100
    for i in range(n_images - 1):
        w, h = SIZES[i % len(SIZES)]
        for j in range(2):
            cat = CAT_IDS[(i + j) % len(CAT_IDS)]
            anns.append(
                {
                    "id": k,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [2.0 + j, 3.0, w / 2.0, h / 3.0],
                    "area": w * h / 6.0,
                    "iscrowd": 0,
                }
            )
            k += 1
    if crowd:
        anns.append(
            {
                "id": k,
                "image_id": 1,
                "category_id": CAT_IDS[0],
                "bbox": [0.0, 0.0, 10.0, 10.0],
                "area": 100.0,
                "iscrowd": 1,
            }
        )
    return anns


def _make_lvis(root, n_images=6, write=True):
    """LVIS v1 layout: image_root/train2017/<name>, images carry coco_url only."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    names = (
        _write_images(os.path.join(root, "train2017"), n_images)
        if write
        else [f"{i + 1:012d}.jpg" for i in range(n_images)]
    )
    images = [
        {
            "id": i + 1,
            "width": SIZES[i % 4][0],
            "height": SIZES[i % 4][1],
            "coco_url": f"http://images.cocodataset.org/train2017/{names[i]}",
            "neg_category_ids": [CAT_IDS[2]],
            "not_exhaustive_category_ids": [],
        }
        for i in range(n_images)
    ]
    cats = [
        {
            "id": c,
            "name": f"class_{c}",
            "frequency": "r",
            "synset": f"s{c}",
            "image_count": 0,
            "instance_count": 0,
        }
        for c in CAT_IDS
    ]
    data = {
        "images": images,
        "annotations": _annotations(n_images),
        "categories": cats,
        "info": {},
        "licenses": [],
    }
    path = os.path.join(root, "lvis_train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, root, data


def _make_coco(root, n_images=6, write=True):
    """COCO layout: image_root/<file_name>, one crowd annotation on image 1."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    img_dir = os.path.join(root, "images")
    names = (
        _write_images(img_dir, n_images)
        if write
        else [f"{i + 1:012d}.jpg" for i in range(n_images)]
    )
    images = [
        {"id": i + 1, "width": SIZES[i % 4][0], "height": SIZES[i % 4][1], "file_name": names[i]}
        for i in range(n_images)
    ]
    cats = [{"id": c, "name": f"class_{c}", "supercategory": "x"} for c in CAT_IDS]
    data = {"images": images, "annotations": _annotations(n_images, crowd=True), "categories": cats}
    path = os.path.join(root, "coco_train.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, img_dir, data


@pytest.fixture
def make_lvis():
    """`make_lvis(root, n_images=6, write=True) -> (json path, image root, data)`."""
    return _make_lvis


@pytest.fixture
def make_coco():
    """`make_coco(root, n_images=6, write=True) -> (json path, image folder, data)`; kept beside
    `make_lvis` (tests/data alone uses it) because the two share the image and box writers."""
    return _make_coco


@pytest.fixture
def cat_ids():
    """The category ids of `make_lvis` / `make_coco`, in json order (unsorted on purpose)."""
    return list(CAT_IDS)


@pytest.fixture
def image_sizes():
    """(width, height) of `make_lvis` / `make_coco`'s images, cycled by image index."""
    return list(SIZES)


# -- loss inputs: a duck-typed ClassStats and small seeded batches (tests/losses, top level) ----
LOSS_NUM_CLASSES = 6


def _make_stats(
    image_count=(400.0, 90.0, 30.0, 8.0, 2.0, 0.0), instance_count=None, num_images=500
):
    """ClassStats stand-in (index i = label i+1); the library only reads these attributes."""
    image_count = torch.tensor(image_count, dtype=torch.float32)
    if instance_count is None:
        instance_count = image_count * 3
    return types.SimpleNamespace(
        image_count=image_count,
        instance_count=torch.as_tensor(instance_count, dtype=torch.float32),
        num_images=num_images,
        frequency=None,
    )


def _make_batch(
    n=12,
    num_classes=LOSS_NUM_CLASSES,
    seed=0,
    dtype=torch.float64,
    bg_fraction=0.5,
    num_columns=None,
):
    """Logits `[n, C+1]` (`[n, num_columns]`, e.g. a loss's `cls_channels`: seesaw's C+2;
    requires grad) and labels in [0, C] with ~bg_fraction background."""
    g = torch.Generator().manual_seed(seed)
    width = num_classes + 1 if num_columns is None else num_columns
    logits = (2.0 * torch.randn(n, width, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(1, num_classes + 1, (n,), generator=g)
    labels[torch.rand(n, generator=g) < bg_fraction] = 0
    return logits, labels


def _make_boxes(p=9, seed=0, dtype=torch.float64):
    """Valid xyxy boxes `[p, 4]` (pred requires grad) with overlapping and disjoint pairs."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(p, 2, generator=g) * 10
    wh = torch.rand(p, 2, generator=g) * 5 + 0.5
    target = torch.cat([xy, xy + wh], dim=1).to(dtype)
    shift = torch.randn(p, 4, generator=g) * 1.5
    pred = target + shift.to(dtype)
    pred = torch.cat([torch.minimum(pred[:, :2], pred[:, 2:] - 0.1), pred[:, 2:]], dim=1)
    return pred.detach().requires_grad_(True), target


def _make_deltas(p=9, seed=0, dtype=torch.float64):
    """Box-delta predictions `[p, 4]` (requires grad) and targets, errors spanning 0.001 - 3."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(p, 4, generator=g).to(dtype)
    err = torch.randn(p, 4, generator=g).to(dtype) * torch.logspace(-3, 0.5, 4, dtype=dtype)
    return (target + err).detach().requires_grad_(True), target


@pytest.fixture
def loss_num_classes():
    """The class count C of `make_batch`'s and `make_stats`' defaults."""
    return LOSS_NUM_CLASSES


@pytest.fixture
def make_stats():
    """`make_stats(image_count=(...6 classes...), instance_count=None, num_images=500)`."""
    return _make_stats


@pytest.fixture
def make_batch():
    """`make_batch(n=12, num_classes=6, seed=0, dtype=float64, bg_fraction=0.5, num_columns=None)
    -> (logits, labels)`."""
    return _make_batch


@pytest.fixture
def make_boxes():
    """`make_boxes(p=9, seed=0, dtype=float64) -> (pred xyxy, target xyxy)`."""
    return _make_boxes


@pytest.fixture
def make_deltas():
    """`make_deltas(p=9, seed=0, dtype=float64) -> (pred deltas, target deltas)`."""
    return _make_deltas


@pytest.fixture
def classification_losses():
    """The registry's classification losses, read from `LOSSES` (a new loss joins without a
    test edit)."""
    return sorted(n for n, cls in LOSSES.items() if issubclass(cls, ClassificationLoss))


@pytest.fixture
def regression_losses():
    """The registry's regression losses, read from `LOSSES`."""
    return sorted(n for n, cls in LOSSES.items() if issubclass(cls, RegressionLoss))


# -- tiny torchvision detectors and a backbone-free RoI head (tests/models, tests/losses, top) ---
TINY_NUM_CLASSES = 5  # foreground classes C; predictors have C + 1 outputs
TINY_IMAGE = 64

BUILDERS = {
    "fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
}


def pytest_generate_tests(metafunc):
    # a test taking `builder_name` runs once per torchvision builder `tiny_detector` knows
    if "builder_name" in metafunc.fixturenames:
        metafunc.parametrize("builder_name", list(BUILDERS))


def _tiny_detector(
    name="fasterrcnn_mobilenet_v3_large_fpn",
    num_classes=TINY_NUM_CLASSES,
    size=TINY_IMAGE,
    freeze_backbone=True,
    **overrides,
):
    """A torchvision detector from its own builder, weights=None, sized for a 2-core CPU."""
    kwargs = dict(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=size,
        max_size=size,
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        box_batch_size_per_image=16,
        box_detections_per_img=10,
    )
    kwargs.update(overrides)
    model = BUILDERS[name](**kwargs)
    if freeze_backbone:
        # the tests are about the RoI head; a frozen backbone keeps backward cheap
        model.backbone.requires_grad_(False)
    return model


def _detection_batch(size=TINY_IMAGE, masks=False, empty_second=True):
    """Two images: one with two boxes (labels 1 and 3), one without any (when empty_second)."""
    images = [torch.rand(3, size, size), torch.rand(3, size, size)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 36.0, 44.0], [24.0, 20.0, 60.0, 58.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {
            "boxes": torch.zeros(0, 4)
            if empty_second
            else torch.tensor([[10.0, 10.0, 50.0, 40.0]]),
            "labels": torch.zeros(0, dtype=torch.int64) if empty_second else torch.tensor([2]),
        },
    ]
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


def _tiny_roi_heads(
    num_classes=TINY_NUM_CLASSES,
    batch_size_per_image=16,
    positive_fraction=0.25,
    channels=8,
    representation=32,
    batchnorm=False,
    **kwargs,
):
    """A torchvision RoIHeads on one feature map "0" of stride 4 (no backbone)."""
    pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2)
    head = (BNBoxHead if batchnorm else TwoMLPHead)(channels * 7 * 7, representation)
    settings = dict(
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )
    settings.update(kwargs)
    return RoIHeads(pool, head, FastRCNNPredictor(representation, num_classes + 1), **settings)


def _head_inputs(num_images=2, size=128, channels=8, num_proposals=60, gt_per_image=(2, 0), seed=0):
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
        labels = torch.randint(1, TINY_NUM_CLASSES + 1, (k,), generator=g)
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


@pytest.fixture
def tiny_num_classes():
    """Foreground classes C of `tiny_detector`, `tiny_roi_heads` and `head_inputs`' labels."""
    return TINY_NUM_CLASSES


@pytest.fixture
def tiny_image_size():
    """The square image size `tiny_detector` and `detection_batch` use."""
    return TINY_IMAGE


@pytest.fixture
def tiny_detector():
    """`tiny_detector(name="fasterrcnn_mobilenet_v3_large_fpn", num_classes=5, size=64,
    freeze_backbone=True, **builder_overrides)`: a torchvision detector, weights=None."""
    return _tiny_detector


@pytest.fixture
def detection_batch():
    """`detection_batch(size=64, masks=False, empty_second=True) -> (images, targets)`."""
    return _detection_batch


@pytest.fixture
def tiny_roi_heads():
    """`tiny_roi_heads(num_classes=5, ..., batchnorm=False, **roi_heads_settings)`: a torchvision
    RoIHeads on one feature map "0" of stride 4 (no backbone)."""
    return _tiny_roi_heads


@pytest.fixture
def head_inputs():
    """`head_inputs(num_images=2, size=128, ..., gt_per_image=(2, 0), seed=0)
    -> (features, proposals, image_shapes, targets)` for `tiny_roi_heads`."""
    return _head_inputs


# -- a tiny synthetic training set and its config (tests/engine, top-level CLI tests) ----------
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A generated LVIS-format set: 8 training and 4 validation images, 3 classes, 64 px
    (read-only: a test that needs a changed json writes its own copy)."""
    root = tmp_path_factory.mktemp("tiny_lvis")
    return make_synthetic_lvis(
        root,
        seed=0,
        num_train=8,
        num_val=4,
        num_classes=3,
        image_size=64,
        min_radius=6,
        max_radius=16,
        max_images_per_class=6,
        val_instances_per_class=2,
    )


def _tiny_opts(data, out):
    """A ResNet-18 FPN at 64 px with small RPN/RoI batches: ~1 s per iteration on one core."""
    return [
        f"data.train.json={data['train_json']}",
        f"data.train.images={data['image_root']}",
        f"data.val.json={data['val_json']}",
        f"data.val.images={data['image_root']}",
        f"output_dir={out}",
        "device=cpu",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.min_size=[56, 64]",
        "data.max_size=96",
        "data.test_min_size=64",
        "model.backbone=resnet18",
        "model.norm=bn",
        "model.trainable_backbone_layers=5",
        "model.rpn.batch_size_per_image=32",
        "model.roi_heads.batch_size_per_image=32",
        "model.rpn.pre_nms_top_n_train=100",
        "model.rpn.post_nms_top_n_train=50",
        "model.rpn.pre_nms_top_n_test=100",
        "model.rpn.post_nms_top_n_test=50",
        "model.detections_per_img=20",
        "solver.lr=0.01",
        "solver.max_iter=4",
        "solver.warmup_iters=2",
        "solver.steps=[3]",
        "solver.checkpoint_period=2",
        "solver.log_period=1",
    ]


def _tiny_cfg(data, out, *extra):
    return load_config(None, _tiny_opts(data, out) + list(extra))


@pytest.fixture
def tiny_opts():
    """`tiny_opts(tiny_data, output_dir) -> list of --opts` for a ~1 s/iteration CPU run."""
    return _tiny_opts


@pytest.fixture
def tiny_cfg():
    """`tiny_cfg(tiny_data, output_dir, *extra_opts) -> config dict` (tiny_opts + extra_opts)."""
    return _tiny_cfg


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def load_tool():
    """`load_tool(name)`: the module tools/<name>.py, loaded from its file."""
    return _load_tool
