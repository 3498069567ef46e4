"""Box predictors for the RoI head: linear, cosine, LWS, and post-hoc tau-normalisation.

Every predictor keeps torchvision's ``FastRCNNPredictor`` layout, so it drops into
``model.roi_heads.box_predictor`` unchanged:

- ``predictor.cls_score``: module mapping features ``[R, D]`` to logits ``[R, C+1]``;
- ``predictor.bbox_pred``: ``nn.Linear`` mapping ``[R, D]`` to class-specific deltas
  ``[R, 4*(C+1)]``;
- ``predictor(x) -> (scores [R, C+1], deltas [R, 4*(C+1)])``; a 4-D input ``[R, D, 1, 1]`` is
  flattened as torchvision does.

Label convention (torchvision's): column 0 is background, columns ``1..C`` are the foreground
classes. Constructors take ``num_classes`` *including* background (``C + 1``), like
``FastRCNNPredictor``; :func:`build_predictor` takes the foreground count ``C`` like
``build_detector``.

Classifier width: a loss may train a classifier of another width than ``C + 1``
(``loss.cls_channels``: seesaw's ``C + 2``, C classes and a 2-way objectness, as mmdetection's
``custom_cls_channels``). ``cls_score`` then has that many outputs and ``bbox_pred`` keeps
``4 * (C + 1)`` (the regressor is indexed by label). :func:`build_predictor` takes it
(``cls_channels=``); :func:`resize_cls_score` re-creates the ``cls_score`` of an existing
predictor (``ltdet.patch`` does, when the loss needs another width). Linear and cosine classifiers
support any width (the authors train seesaw with a cosine, "normed", classifier: mmdetection's
``configs/seesaw_loss`` set ``cls_predictor_cfg=dict(type='NormedLinear', tempearture=20)``); an
LWS head scales a trained classifier and keeps its width.

Stage-2 heads (decoupled classifier refinement, Kang et al., "Decoupling Representation and
Classifier for Long-Tailed Recognition", ICLR 2020):

- cRT: :func:`reset_classifier` re-initialises ``cls_score`` before re-training it on
  class-balanced data;
- LWS: :class:`LWSPredictor` learns one scale per class on the frozen stage-1 classifier;
- tau-norm: :func:`tau_normalize` rescales the classifier rows by ``1 / ||w_c||^tau``, no training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from ltdet.spec import check_choice, check_keys, check_number

logger = logging.getLogger(__name__)

__all__ = [
    "LinearPredictor",
    "CosineClassifier",
    "CosinePredictor",
    "ScaledClassifier",
    "LWSPredictor",
    "tau_normalize",
    "reset_classifier",
    "resize_cls_score",
    "build_predictor",
    "normal_linear",
]


def _flatten_roi_features(x: Tensor) -> Tensor:
    """``[R, D]`` or ``[R, D, 1, 1]`` -> ``[R, D]`` (torchvision's FastRCNNPredictor contract)."""
    if x.dim() == 4 and list(x.shape[2:]) != [1, 1]:
        raise ValueError(
            f"box predictor input has shape {list(x.shape)}: a 4-D input must be [R, D, 1, 1]; "
            "pool or flatten the RoI features in the box head first"
        )
    return x.flatten(start_dim=1)


class LinearPredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` (``cls_score`` and ``bbox_pred`` are ``nn.Linear``).

    Args:
        in_channels: feature dimension ``D``.
        num_classes: number of classes including background (``C + 1``).
    """


class CosineClassifier(nn.Module):
    """Cosine-similarity classifier: ``logits[r, c] = s * <x_r / ||x_r||, w_c / ||w_c||>``.

    Gidaris & Komodakis, "Dynamic Few-Shot Visual Learning without Forgetting", CVPR 2018, eq. (2);
    used for detection by Wang et al., "Frustratingly Simple Few-Shot Object Detection", ICML 2020
    (scale 20). The scale ``s`` (inverse temperature) is a learnable scalar when ``learn_scale``.
    The background row is a cosine prototype like the others; there is no bias.

    Shapes: input ``[R, D]``, output ``[R, out_features]``. ``in_features`` / ``out_features``
    mirror ``nn.Linear`` so every ``cls_score`` exposes its width the same way.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        scale: float = 20.0,
        learn_scale: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"CosineClassifier: scale must be > 0, got {scale}")
        self.in_features = in_features
        self.out_features = num_classes
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=bool(learn_scale))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Only directions matter; a normal init gives uniformly spread prototypes.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.normalize(x, dim=1, eps=self.eps)
        w = nn.functional.normalize(self.weight, dim=1, eps=self.eps)
        return self.scale * (x @ w.t())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class CosinePredictor(nn.Module):
    """Box predictor with a :class:`CosineClassifier` and a linear box regressor.

    Usable in stage 1 (``model.classifier: {type: cosine}``) or as the stage-2 ``cosine`` head.

    Args:
        in_channels: feature dimension ``D``.
        num_classes: number of classes including background (``C + 1``).
        scale: initial scale (inverse temperature) of the cosine logits.
        learn_scale: learn the scale jointly with the prototypes.
        cls_channels: outputs of the classifier when the loss needs another width than
            ``num_classes`` (seesaw: ``C + 2``); the box regressor keeps ``4 * num_classes``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        scale: float = 20.0,
        learn_scale: bool = True,
        cls_channels: Optional[int] = None,
    ):
        super().__init__()
        self.cls_score = CosineClassifier(
            in_channels,
            num_classes if cls_channels is None else int(cls_channels),
            scale=scale,
            learn_scale=learn_scale,
        )
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _flatten_roi_features(x)
        return self.cls_score(x), self.bbox_pred(x)


class ScaledClassifier(nn.Module):
    """Frozen classifier times a learnable per-class scale: ``logits = scales * base(x)``.

    Kang et al., ICLR 2020, Sec. 4.2 (LWS, "learnable weight scaling"): ``w~_c = f_c * w_c``.
    As in the authors' code the scale multiplies the whole logit, bias included, so
    ``scales == 1`` reproduces the base classifier exactly. One scale per column, background
    (column 0) included.

    Shapes: input ``[R, D]``, output ``[R, out_features]`` (``out_features`` as in ``nn.Linear``).
    """

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        self.base = base
        self.out_features = num_classes
        for p in self.base.parameters():
            p.requires_grad_(False)
        ref = next(self.base.parameters(), None)
        self.scales = nn.Parameter(
            torch.ones(
                num_classes,
                device=None if ref is None else ref.device,
                dtype=None if ref is None else ref.dtype,
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) * self.scales


class LWSPredictor(nn.Module):
    """LWS head: the stage-1 classifier frozen, one learnable scale per class (init 1).

    ``cls_score`` is a :class:`ScaledClassifier` around the stage-1 ``cls_score`` (any module
    producing ``[R, C+1]``: linear or cosine); ``bbox_pred`` is the stage-1 regressor, whose
    trainability is the caller's choice (``refine.box``).

    Args:
        predictor: a stage-1 box predictor (``cls_score`` / ``bbox_pred`` layout).
    """

    def __init__(self, predictor: nn.Module):
        super().__init__()
        cls_score = getattr(predictor, "cls_score", None)
        bbox_pred = getattr(predictor, "bbox_pred", None)
        if cls_score is None or bbox_pred is None:
            raise TypeError(
                f"LWSPredictor needs a predictor with `cls_score` and `bbox_pred` "
                f"(torchvision FastRCNNPredictor layout), got {type(predictor).__name__}"
            )
        if isinstance(cls_score, ScaledClassifier):
            raise TypeError("LWSPredictor: the predictor is already an LWS head")
        self.cls_score = ScaledClassifier(cls_score, _num_outputs(cls_score))
        self.bbox_pred = bbox_pred

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _flatten_roi_features(x)
        return self.cls_score(x), self.bbox_pred(x)


def _num_outputs(cls_score: nn.Module) -> int:
    if isinstance(cls_score, (nn.Linear, CosineClassifier)):
        return cls_score.out_features
    raise TypeError(
        f"unsupported cls_score module {type(cls_score).__name__}: expected nn.Linear or "
        "CosineClassifier"
    )


@torch.no_grad()
def tau_normalize(
    predictor: nn.Module, tau: float, normalize_background: bool = False, keep_bias: bool = False
) -> nn.Module:
    """Post-hoc tau-normalisation ``w_c <- w_c / ||w_c||^tau`` of a linear classifier, in place.

    Kang et al., ICLR 2020, Sec. 4.2, eq. (3). ``tau = 1`` makes the rows unit-norm; the authors
    sweep ``tau`` over ``[0, 2]`` (``np.linspace(0, 2, 21)`` in classifier-balancing's
    ``tau_norm.py``; ``tools/tau_sweep.py`` does the same).

    Bias: the authors' classifier (``DotProduct_Classifier``, an ``nn.Linear``) has a bias, and
    their tau-norm scores ``x . w_c / ||w_c||^tau`` *without* it (``forward`` in ``tau_norm.py``
    never adds ``bias``). By default the bias of every normalised row is therefore set to 0, so
    ``tau = 0`` is the stage-1 classifier without those biases, as in the authors' sweep.
    ``keep_bias=True`` keeps the stage-1 biases (an ltdet option; ``tau = 0`` is then the
    identity).

    Background: by default row 0 (background, torchvision's column 0; the authors' classifier has
    no background class) is left untouched, weight *and* bias, because background is not a
    long-tail class - its norm reflects the RoI sampler's foreground fraction, not class
    frequency, and rescaling it alone shifts every foreground score against background.
    ``normalize_background=True`` treats it like the other rows (normalised, bias dropped unless
    ``keep_bias``). A seesaw classifier (``C + 2`` rows for a ``4 * (C + 1)`` regressor: row 0
    and row ``C + 1`` are its 2-way objectness, rows ``1..C`` the classes, ``ltdet.losses.seesaw``)
    has two such rows: both are left untouched likewise (and normalised with
    ``normalize_background``); tau-norm balances the class rows, which is what the authors' norm
    reflects.

    Args:
        predictor: box predictor whose ``cls_score`` is an ``nn.Linear`` with weight ``[C+1, D]``
            (or ``[C+2, D]``, seesaw's layout).
        tau: exponent, ``>= 0``.
        normalize_background: also normalise row 0 (and drop its bias unless ``keep_bias``).
        keep_bias: keep the biases of the normalised rows instead of the authors' zero.
    Returns:
        the same predictor.
    """
    cls_score = getattr(predictor, "cls_score", None)
    if not isinstance(cls_score, nn.Linear):
        raise TypeError(
            "tau_normalize needs a predictor whose cls_score is nn.Linear (the stage-1 linear "
            f"classifier), got {type(cls_score).__name__}; cosine and LWS heads are already "
            "norm-balanced or scaled: use refine.head=crt|lws|cosine instead"
        )
    if tau < 0 or not math.isfinite(tau):
        raise ValueError(f"tau_normalize: tau must be a finite number >= 0, got {tau}")
    # rows that are normalised: the classes, plus background / objectness rows on request
    rows = torch.ones(cls_score.out_features, dtype=torch.bool, device=cls_score.weight.device)
    if not normalize_background:
        rows[0] = False
        bbox_pred = getattr(predictor, "bbox_pred", None)
        if (
            isinstance(bbox_pred, nn.Linear)
            and bbox_pred.out_features > 4
            and cls_score.out_features == bbox_pred.out_features // 4 + 1
        ):
            rows[-1] = False  # seesaw's objectness "foreground" row
    if not keep_bias and cls_score.bias is not None:
        cls_score.bias[rows] = 0.0
    if tau == 0:
        return predictor
    weight = cls_score.weight
    norms = weight.norm(dim=1, keepdim=True)
    # A zero row stays zero; clamping only avoids 0/0.
    factor = norms.clamp(min=torch.finfo(weight.dtype).tiny).pow(-tau)
    factor[~rows] = 1.0
    weight.mul_(factor)
    return predictor


@torch.no_grad()
def reset_classifier(predictor: nn.Module, *, std: float = 0.01) -> nn.Module:
    """Re-initialise ``predictor.cls_score`` for cRT (classifier re-training), in place.

    Kang et al., ICLR 2020, Sec. 4.2. Linear: weight ~ N(0, std^2), bias 0 (detectron2's Fast R-CNN
    classifier init); cosine: prototypes ~ N(0, std^2), scale kept. The box regressor is untouched.
    """
    cls_score = getattr(predictor, "cls_score", None)
    if isinstance(cls_score, nn.Linear):
        nn.init.normal_(cls_score.weight, std=std)
        if cls_score.bias is not None:
            nn.init.zeros_(cls_score.bias)
    elif isinstance(cls_score, CosineClassifier):
        nn.init.normal_(cls_score.weight, std=std)
    else:
        raise TypeError(
            f"reset_classifier supports nn.Linear and CosineClassifier cls_score, got "
            f"{type(cls_score).__name__}; an LWS head is built on a stage-1 classifier and is "
            "not re-initialised"
        )
    return predictor


@torch.no_grad()
def normal_linear(in_features: int, out_features: int, std: float = 0.01, **kwargs) -> nn.Linear:
    """A classifier layer initialised as mmdetection's ``fc_cls``: weight N(0, std^2), bias 0."""
    layer = nn.Linear(in_features, out_features, **kwargs)
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


@torch.no_grad()
def resize_cls_score(
    predictor: nn.Module, channels: int, *, std: float = 0.01, reason: str = ""
) -> bool:
    """Give ``predictor.cls_score`` ``channels`` outputs, in place; returns whether it changed.

    Nothing happens when it already has them. Otherwise only ``cls_score`` is re-created, fresh,
    on the old layer's device and dtype, with the same input width (``bbox_pred`` and everything
    else untouched; the old classifier's weights are dropped, with a warning in the log): a
    linear layer with weight ~ N(0, std^2) and bias 0 (mmdetection's ``fc_cls`` init, ``Normal``
    with ``std=0.01``; torchvision's ``FastRCNNPredictor`` keeps ``nn.Linear``'s default), a
    cosine classifier with fresh prototypes and the old scale. An LWS head (``ScaledClassifier``)
    scales a trained classifier of a fixed width: TypeError, as for any other module.
    """
    cls_score = getattr(predictor, "cls_score", None)
    old = getattr(cls_score, "out_features", None)
    channels = int(channels)
    if old == channels:
        return False
    new: nn.Module
    if isinstance(cls_score, nn.Linear):
        new = normal_linear(
            cls_score.in_features,
            channels,
            std,
            bias=cls_score.bias is not None,
            device=cls_score.weight.device,
            dtype=cls_score.weight.dtype,
        )
    elif isinstance(cls_score, CosineClassifier):
        new = CosineClassifier(
            cls_score.in_features,
            channels,
            scale=float(cls_score.scale),
            learn_scale=cls_score.scale.requires_grad,
            eps=cls_score.eps,
        )
        new = new.to(device=cls_score.weight.device, dtype=cls_score.weight.dtype)
    else:
        raise TypeError(
            f"the box classifier ({type(cls_score).__name__}) has {old} outputs but "
            f"{reason or 'the loss'} needs {channels}; only a linear or cosine cls_score can be "
            f"re-created (an LWS head scales a trained classifier of a fixed width: build it on a "
            f"classifier of {channels} outputs)"
        )
    predictor.cls_score = new
    logger.warning(
        "box predictor: cls_score re-created with %d outputs instead of %d%s (a fresh "
        "%s: its old weights are not used)",
        channels,
        old,
        f" for {reason}" if reason else "",
        f"linear layer, weight N(0, {std:g}^2), bias 0"
        if isinstance(new, nn.Linear)
        else "cosine classifier",
    )
    return True


#: ``model.classifier.type`` -> its keys besides ``type`` (the cosine head's are
#: :class:`CosinePredictor`'s keyword arguments, whose signature holds their defaults)
_PREDICTOR_KEYS = {
    "linear": (),
    "cosine": ("scale", "learn_scale"),
    "lws": (),
}


def build_predictor(
    cfg: Mapping | None, in_features: int, num_classes: int, cls_channels: Optional[int] = None
) -> nn.Module:
    """Box predictor from ``model.classifier``.

    ``{type: linear}`` (default), ``{type: cosine, scale: 20.0, learn_scale: true}``, or
    ``{type: lws}`` (a linear classifier wrapped in :class:`LWSPredictor`: the structure of an LWS
    stage-2 checkpoint, for loading and evaluating one).

    Args:
        cfg: the ``model.classifier`` dict (``None`` = linear).
        in_features: feature dimension ``D`` of the box head output.
        num_classes: number of *foreground* classes ``C``; the predictor emits ``C + 1`` columns.
        cls_channels: the classifier's outputs when the loss needs another width
            (``loss.cls_channels``, seesaw's ``C + 2``; None = ``C + 1``). A linear classifier of
            another width starts at mmdetection's ``fc_cls`` init (N(0, 0.01^2), bias 0); the box
            regressor always has ``4 * (C + 1)`` outputs.
    """
    spec = dict(cfg or {})
    kind = spec.pop("type", "linear")
    check_choice("model.classifier.type", kind, _PREDICTOR_KEYS)
    check_keys(f"model.classifier (type {kind!r})", spec, _PREDICTOR_KEYS[kind])
    check_number("build_predictor: num_classes (foreground)", num_classes, low=1, integer=True)
    if kind == "cosine":
        # spec holds only checked keys: CosinePredictor's keyword arguments
        return CosinePredictor(in_features, num_classes + 1, cls_channels=cls_channels, **spec)
    linear = LinearPredictor(in_features, num_classes + 1)
    if cls_channels is not None and int(cls_channels) != num_classes + 1:
        linear.cls_score = normal_linear(in_features, int(cls_channels))
    return LWSPredictor(linear) if kind == "lws" else linear
