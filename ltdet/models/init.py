"""Initialisation of a box classifier trained with a sigmoid loss: every column at a prior.

A sigmoid classifier with torchvision's default ``nn.Linear`` initialisation starts every class
at ``sigmoid(~0) = 0.5``; with LVIS's 1203 classes each RoI then carries ~1203 * log 2 = 834 of
binary cross entropy at step 0 (two orders of magnitude above the converged loss), and the
negative gradients of every class swamp the positives from the first step. The authors of the
sigmoid RoI losses start the classifier at a small prior probability instead:

* EQLv2 / EQL (tztztztztz/eqlv2, ``mmdet/models/roi_heads/bbox_heads/convfc_bbox_head.py``,
  ``ConvFCBBoxHead.init_weights``): whenever the loss has ``use_sigmoid``,
  ``normal_init(self.fc_cls, std=0.01, bias=bias_init_with_prob(0.001))``;
* EQL (tztztztztz/eql.detectron2, ``projects/EQL/eql/fast_rcnn.py``,
  ``EQLFastRCNNOutputLayers.__init__``): weight ``N(0, 0.01)``, bias
  ``-log((1 - prior_prob) / prior_prob)``, ``MODEL.ROI_HEADS.PRIOR_PROB = 0.001``;
* federated loss (facebookresearch/Detic, ``detic/modeling/roi_heads/detic_fast_rcnn.py``,
  ``DeticFastRCNNOutputLayers.__init__``): the same bias over detectron2's ``N(0, 0.01)``
  weights when ``use_sigmoid_ce`` (Detic's default ``MODEL.ROI_BOX_HEAD.PRIOR_PROB`` is 0.01).

:func:`init_sigmoid_classifier` does that to a torchvision box predictor: weight ``N(0, std^2)``
(``std = 0.01``), bias ``-log((1 - p) / p)`` (``p = 0.001``: ``-log(999) = -6.9068``).

Column 0 (background, torchvision's layout) starts at the same prior as the classes:

* for EQLv2 it is the objectness sigmoid (target 1 on background RoIs). In the authors' head it is
  one of the ``C + 1`` channels of ``fc_cls`` (``EQLv2.get_channel_num`` = ``num_classes + 1``,
  mmdetection puts it last) and the one ``normal_init`` call above sets its bias with all the
  others, so it starts at ``p`` too;
* every other sigmoid loss (EQL, federated, focal, GHM-C, sigmoid / focal class-balanced) gives
  column 0 exactly zero gradient and its ``activation`` never reads it (column 0 of the scores is
  ``1 - max_j sigmoid(z_j)``), so its value changes nothing; Detic likewise sets the bias of its
  background column, which its sigmoid loss drops. One rule for every column is the simplest
  correct one.

Classifier heads (``ltdet.models.classifiers``):

* linear (torchvision's ``FastRCNNPredictor``): as above;
* LWS (``ScaledClassifier`` around a linear classifier): the wrapped linear layer is initialised
  and the per-class scales are reset to 1, so the logits start exactly at the prior;
* cosine (``CosineClassifier``): ``s * cos(x, w_c)`` has no bias, so there is no prior to set
  (its logits start near 0, i.e. ``p ~ 0.5``); :func:`init_sigmoid_classifier` refuses it and
  ``build_detector`` leaves it as it is with a warning. Pair a cosine classifier with a softmax
  loss, or use a linear one with a sigmoid loss.

Seesaw's ``C + 2`` classifier (classes + 2-way objectness, ``ltdet.losses.seesaw``) is trained
with softmaxes: no prior. ``build_detector`` / ``ltdet.patch`` create it at mmdetection's
``fc_cls`` init (weight N(0, 0.01^2), bias 0), and :func:`init_classifier_for_loss` leaves it so;
:func:`init_sigmoid_classifier` itself works on a classifier of any width.

RetinaNet needs nothing: torchvision's ``RetinaNetClassificationHead`` already initialises its
``cls_logits`` with ``N(0, 0.01)`` weights and the prior 0.01 (Lin et al., ICCV 2017), and ltdet
leaves it as it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Optional, cast

import torch
from torch import nn
from torchvision.models.detection import RetinaNet

from .classifiers import CosineClassifier, ScaledClassifier

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PRIOR_PROB",
    "DEFAULT_WEIGHT_STD",
    "init_sigmoid_classifier",
    "init_classifier_for_loss",
    "prior_logit",
    "prior_prob_from_cfg",
    "resolve_prior_prob",
]

#: eqlv2's ``bias_init_with_prob(0.001)``, eql.detectron2's ``PRIOR_PROB: 0.001``.
DEFAULT_PRIOR_PROB = 0.001
#: ``normal_init(fc_cls, std=0.01)`` (eqlv2), ``nn.init.normal_(cls_score.weight, std=0.01)``
#: (eql.detectron2, detectron2's ``FastRCNNOutputLayers``).
DEFAULT_WEIGHT_STD = 0.01


def prior_logit(prior_prob: float) -> float:
    """The logit whose sigmoid is ``prior_prob``: ``-log((1 - p) / p)``; ``p`` in ``(0, 1)``."""
    p = float(prior_prob)
    if not 0.0 < p < 1.0 or not math.isfinite(p):
        raise ValueError(
            f"cls_prior_prob must lie strictly between 0 and 1 (a probability), got {prior_prob!r}"
        )
    return -math.log((1.0 - p) / p)


def _classifier_linear(module: nn.Module):
    """(linear layer, LWS wrapper or None) of a detector, RoI head, box predictor or layer."""
    if isinstance(module, RetinaNet):
        raise TypeError(
            "init_sigmoid_classifier: torchvision already initialises RetinaNet's "
            "classification head at a prior (cls_logits bias -log(99), p = 0.01, Lin "
            "et al.); it applies to the box classifier of a two-stage detector"
        )
    # the casts: nn.Module types its submodules as `Tensor | Module`
    target = module
    if hasattr(target, "roi_heads"):
        target = cast(nn.Module, target.roi_heads)
    if hasattr(target, "box_predictor"):
        target = cast(nn.Module, target.box_predictor)
    if hasattr(target, "cls_score"):
        target = cast(nn.Module, target.cls_score)
    scaled = None
    if isinstance(target, ScaledClassifier):
        scaled, target = target, target.base
    if isinstance(target, CosineClassifier):
        raise TypeError(
            "init_sigmoid_classifier: a cosine classifier (s * cos(x, w_c)) has no "
            "bias, so it cannot start at a prior probability; use a linear "
            "classifier with a sigmoid loss, or a softmax loss with a cosine one"
        )
    if not isinstance(target, nn.Linear) or target.bias is None:
        raise TypeError(
            f"init_sigmoid_classifier: expected a two-stage detector, its roi_heads, "
            f"a box predictor with a `cls_score` nn.Linear (with bias), or that "
            f"nn.Linear; got {type(module).__name__} (classifier "
            f"{type(target).__name__})"
        )
    return target, scaled


@torch.no_grad()
def init_sigmoid_classifier(
    module: nn.Module, prior_prob: float = DEFAULT_PRIOR_PROB, *, std: float = DEFAULT_WEIGHT_STD
) -> nn.Module:
    """Start a box classifier trained with a sigmoid loss at ``prior_prob``, in place.

    Weight ~ ``N(0, std^2)``, bias = ``-log((1 - prior_prob) / prior_prob)`` in every column,
    background (column 0) included (module docstring: for EQLv2 column 0 is the objectness
    sigmoid, which the authors start at the prior too; the other sigmoid losses never read it).
    An LWS head's wrapped linear layer is initialised and its scales reset to 1.

    Use it on a *fresh* classifier that a sigmoid loss will train (EQL, EQLv2, federated, focal,
    GHM-C, sigmoid class-balanced); not on weights already trained (fine-tuning a sigmoid-trained
    checkpoint keeps its classifier), and not with a softmax loss (torchvision's init is right
    there). ``build_detector`` applies it by itself (``model.cls_prior_prob``); ``ltdet.patch``
    only when asked (``cls_prior_prob=``).

    Args:
        module: a two-stage torchvision detector (``FasterRCNN`` and subclasses), its
            ``roi_heads``, a box predictor (``cls_score`` / ``bbox_pred`` layout) or the
            classifier ``nn.Linear`` itself.
        prior_prob: the probability every column starts at, in ``(0, 1)``.
        std: standard deviation of the weights.
    Returns:
        ``module``.
    Raises:
        TypeError: RetinaNet (already initialised at a prior by torchvision), a cosine classifier
            (no bias), anything without a linear box classifier.
    """
    bias = prior_logit(prior_prob)
    if not std > 0:
        raise ValueError(f"init_sigmoid_classifier: std must be > 0, got {std!r}")
    linear, scaled = _classifier_linear(module)
    nn.init.normal_(linear.weight, mean=0.0, std=float(std))
    nn.init.constant_(linear.bias, bias)
    if scaled is not None:
        scaled.scales.fill_(1.0)
    return module


def resolve_prior_prob(value: Optional[float]) -> Optional[float]:
    """The prior of a ``model.cls_prior_prob`` value: a probability in (0, 1), or None for ``0``
    (or ``None``) = keep torchvision's init. ValueError otherwise."""
    if value is None or (not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"model.cls_prior_prob must be a probability in (0, 1), or 0 to keep "
            f"torchvision's classifier init; got {value!r}"
        )
    prior_logit(value)  # range check
    return float(value)


def prior_prob_from_cfg(model_cfg: Optional[Mapping]) -> Optional[float]:
    """``resolve_prior_prob`` of a config's ``model.cls_prior_prob`` (a dict without it: the
    authors' ``DEFAULT_PRIOR_PROB``)."""
    model_cfg = model_cfg or {}
    return resolve_prior_prob(
        model_cfg["cls_prior_prob"] if "cls_prior_prob" in model_cfg else DEFAULT_PRIOR_PROB
    )


def init_classifier_for_loss(model: nn.Module, prior_prob: Optional[float]) -> bool:
    """``build_detector``'s and cRT's rule: when ``prior_prob`` is set and the RoI head's
    classification loss is a sigmoid one (``roi_heads.cls_loss.use_sigmoid``), start the linear
    box classifier at ``prior_prob`` (:func:`init_sigmoid_classifier`).

    Left as they are: softmax losses (torchvision's init), RetinaNet (its own prior), a model
    whose RoI head has no ltdet loss, and a cosine classifier (no bias; a warning says so).
    Returns whether the classifier was initialised."""
    if prior_prob is None or isinstance(model, RetinaNet):
        return False
    roi_heads = getattr(model, "roi_heads", None)
    predictor = getattr(roi_heads, "box_predictor", None)
    cls_loss = getattr(roi_heads, "cls_loss", None)  # None: not an LTRoIHeads
    if cls_loss is None or not cls_loss.use_sigmoid or predictor is None:
        return False
    cls_score = predictor.cls_score
    base = cls_score.base if isinstance(cls_score, ScaledClassifier) else cls_score
    if isinstance(base, CosineClassifier):
        logger.warning(
            "model.cls_prior_prob: the cosine classifier has no bias, so its sigmoid "
            "scores start near 0.5 instead of %g; a linear classifier (or a softmax "
            "loss) avoids the large first-step loss",
            prior_prob,
        )
        return False
    init_sigmoid_classifier(predictor, prior_prob)
    logger.info(
        "box classifier initialised for the sigmoid loss %s: weight N(0, %g^2), bias "
        "%.4f (prior %g)",
        type(cls_loss).__name__,
        DEFAULT_WEIGHT_STD,
        prior_logit(prior_prob),
        prior_prob,
    )
    return True
