"""configs/lvis_v1 follow the recipe behind the published LVIS v1 numbers, and data.filter_empty.

Sources (read for these tests):

* detectron2 configs/Base-RCNN-FPN.yaml (inherited by configs/LVISv1-InstanceSegmentation/
  mask_rcnn_R_50_FPN_1x.yaml): MODEL.RPN.PRE_NMS_TOPK_TRAIN 2000 (per FPN level),
  PRE_NMS_TOPK_TEST 1000, POST_NMS_TOPK_TRAIN 1000, POST_NMS_TOPK_TEST 1000;
  detectron2/config/defaults.py: MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA 0.0 (= L1),
  DATALOADER.FILTER_EMPTY_ANNOTATIONS True.
* mmdetection configs/_base_/models/mask-rcnn_r50_fpn.py (base of
  configs/lvis/mask-rcnn_r50_fpn_sample1e-3_ms-1x_lvis-v1.py): roi_head.bbox_head.loss_bbox
  L1Loss, train_cfg.rpn_proposal nms_pre 2000 / max_per_img 1000, test_cfg.rpn 1000 / 1000;
  tztztztztz/eqlv2 (the EQLv2 numbers) configs/_base_/models/mask_rcnn_r50_fpn.py: L1Loss,
  rpn_proposal max_num 1000; mmdet/datasets/custom.py filter_empty_gt=True outside test mode.
"""

from pathlib import Path

import pytest

from ltdet.config import load_config, schema_path
from ltdet.data.samplers import repeat_factors
from ltdet.engine.loaders import build_datasets

ROOT = Path(__file__).resolve().parent.parent
#: the Faster R-CNN recipe; the RetinaNet configs (EFL, GFL) follow their authors' recipes,
#: checked in tests/losses/test_efl_gfl.py
LVIS_CONFIGS = sorted(
    p for p in (ROOT / "configs" / "lvis_v1").glob("*.yaml") if not p.stem.startswith("retinanet")
)


def test_every_lvis_config_is_checked():
    assert len(LVIS_CONFIGS) >= 8


@pytest.mark.parametrize("path", LVIS_CONFIGS, ids=lambda p: p.stem)
def test_lvis_v1_config_follows_the_published_recipe(path):
    cfg = load_config(path)
    model, data = cfg["model"], cfg["data"]
    assert model["rpn"]["pre_nms_top_n_train"] == 2000
    assert model["rpn"]["post_nms_top_n_train"] == 1000  # torchvision's default is 2000
    assert model["rpn"]["pre_nms_top_n_test"] == 1000
    assert model["rpn"]["post_nms_top_n_test"] == 1000
    assert model["box_loss"] == {"type": "l1"}  # torchvision's: smooth L1, beta 1/9
    assert data["filter_empty"] is True
    assert model["roi_heads"]["batch_size_per_image"] == 512
    assert model["roi_heads"]["positive_fraction"] == 0.25
    assert model["detections_per_img"] == 300 and model["score_thresh"] == 1e-4
    assert model["cls_prior_prob"] == 0.001
    assert data["format"] == "lvis"
    assert data["min_size"] == [640, 672, 704, 736, 768, 800] and data["max_size"] == 1333
    assert data["test_min_size"] == 800


def test_lvis_recipe_reaches_the_torchvision_modules():
    from ltdet.losses.smooth_l1 import L1Loss
    from ltdet.models import build_detector

    cfg = load_config(
        ROOT / "configs" / "lvis_v1" / "faster_rcnn_r50_fpn_1x.yaml",
        ["model.weights_backbone=null"],
    )
    model = build_detector(cfg, 1203)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert isinstance(model.roi_heads.box_loss, L1Loss)


def test_base_defaults_keep_torchvision_behaviour():
    cfg = load_config(schema_path())
    assert cfg["data"]["filter_empty"] is False
    assert cfg["model"]["rpn"]["post_nms_top_n_train"] == 2000


@pytest.mark.parametrize("filter_empty", [False, True])
def test_filter_empty_drops_annotation_less_training_images_only(tmp_path, filter_empty, make_lvis):
    path, root, data = make_lvis(tmp_path)  # 6 images, the last one without annotations
    assert not any(a["image_id"] == 6 for a in data["annotations"])
    paths = {"train_json": path, "train_images": root, "val_json": path, "val_images": root}
    cfg = load_config(schema_path(), [f"data.filter_empty={str(filter_empty).lower()}"])
    train_ds, val_ds = build_datasets(cfg, paths)
    expected = [1, 2, 3, 4, 5] if filter_empty else [1, 2, 3, 4, 5, 6]
    assert train_ds.image_ids == expected
    # the class statistics and repeat factors count the images that are kept (detectron2 filters
    # before computing them)
    assert train_ds.stats.num_images == len(expected)
    assert len(repeat_factors(train_ds)) == len(expected)
    assert val_ds.image_ids == [1, 2, 3, 4, 5, 6]  # never the validation set
