"""Data: LVIS / COCO datasets, OpenCV transforms, ClassStats, image samplers, synthetic set."""

from .class_stats import ClassStats, FlatAnnotations
from .coco_lt import build_coco_lt
from .collate import collate_detection
from .datasets import COCODetection, LVISDetection, build_dataset, label_to_cat_id_table
from .samplers import (
    ClassAwareSampler,
    GroupedBatchSampler,
    InferenceSampler,
    RepeatFactorSampler,
    aspect_ratio_group_ids,
    build_train_sampler,
    class_repeat_factors,
    group_batches,
    repeat_factors,
)
from .synthetic import make_synthetic_lvis
from .transforms import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    ToTensor,
    build_transforms,
)

__all__ = [
    "COCODetection",
    "ClassAwareSampler",
    "ClassStats",
    "Compose",
    "FlatAnnotations",
    "GroupedBatchSampler",
    "InferenceSampler",
    "LVISDetection",
    "RandomHorizontalFlip",
    "RepeatFactorSampler",
    "ResizeShortestEdge",
    "ToTensor",
    "aspect_ratio_group_ids",
    "build_coco_lt",
    "build_dataset",
    "build_train_sampler",
    "build_transforms",
    "class_repeat_factors",
    "collate_detection",
    "group_batches",
    "label_to_cat_id_table",
    "make_synthetic_lvis",
    "repeat_factors",
]
