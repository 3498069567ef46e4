"""Data: LVIS / COCO datasets, OpenCV transforms, ClassStats, image samplers, synthetic set."""
import importlib

# name -> submodule. Exports resolve lazily (PEP 562) so one unfinished module never breaks
# importing its siblings.
_EXPORTS = {
    "ClassStats": "class_stats",
    "frequency_from_counts": "class_stats",
    "FlatAnnotations": "class_stats",
    "LVISDetection": "datasets",
    "COCODetection": "datasets",
    "build_dataset": "datasets",
    "ResizeShortestEdge": "transforms",
    "RandomHorizontalFlip": "transforms",
    "ToTensor": "transforms",
    "Compose": "transforms",
    "build_transforms": "transforms",
    "repeat_factors": "samplers",
    "class_repeat_factors": "samplers",
    "RepeatFactorSampler": "samplers",
    "ClassAwareSampler": "samplers",
    "InferenceSampler": "samplers",
    "GroupedBatchSampler": "samplers",
    "build_train_sampler": "samplers",
    "aspect_ratio_group_ids": "samplers",
    "build_coco_lt": "coco_lt",
    "collate_detection": "collate",
    "make_synthetic_lvis": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
