"""Models: LTRoIHeads, RetinaNet heads, RoI samplers, classifier heads, build_detector, patch.

Extension bases: `RoISampler` (a new RoI sampler; `RoIScorer` is what it may ask of the head,
`ROI_SAMPLERS` the table a new one joins) and the box predictors of `classifiers`.
"""

from .build import build_detector, build_torchvision_detector, torchvision_detector
from .classifiers import CosinePredictor, LWSPredictor, build_predictor, tau_normalize
from .init import init_sigmoid_classifier
from .patch import patch
from .retinanet import LTRetinaNet, patch_retinanet
from .roi_heads import LTRoIHeads
from .roi_samplers import (
    ROI_SAMPLERS,
    RoICandidates,
    RoISampler,
    RoISamples,
    RoIScorer,
    RoISelection,
    build_roi_sampler,
)
from .weights import load_detector_state_dict, torchvision_state_dict

__all__ = [
    "CosinePredictor",
    "LTRetinaNet",
    "LTRoIHeads",
    "LWSPredictor",
    "ROI_SAMPLERS",
    "RoICandidates",
    "RoISampler",
    "RoISamples",
    "RoIScorer",
    "RoISelection",
    "build_detector",
    "build_predictor",
    "build_roi_sampler",
    "build_torchvision_detector",
    "init_sigmoid_classifier",
    "load_detector_state_dict",
    "patch",
    "patch_retinanet",
    "tau_normalize",
    "torchvision_detector",
    "torchvision_state_dict",
]
