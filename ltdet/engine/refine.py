"""Stage 2: decoupled classifier refinement of a trained two-stage detector.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020
(cRT, LWS, tau-norm), and Zhong et al., "Improving Calibration for Long-Tailed Recognition"
(MiSLAS), CVPR 2021 (shifted BN, label-aware smoothing). After stage 1 (everything trained on
the natural, instance-balanced data), stage 2 keeps the representation - backbone, FPN, RPN and
the RoI feature extractor (``roi_heads.box_head``) - frozen and re-balances only the box
classifier (optionally the box regressor too), with a re-balanced image sampler
(``data.sampler``: repeat_factor or class_aware) and any classification loss of the library
(``model.cls_loss``, e.g. ``las``).

The ``refine`` config section (docs/stage2.md):

- ``head``: ``crt`` (re-initialised classifier, re-trained) | ``lws`` (frozen classifier, one
  learnable scale per class) | ``tau_norm`` (post-hoc ``w_c / ||w_c||^tau``, nothing trained) |
  ``cosine`` (fresh cosine classifier with learnable scale, trained);
- ``tau``: the tau_norm exponent; ``normalize_background`` (optional, default false): also
  normalise the background row; ``tau_keep_bias`` (optional, default false): keep the biases of
  the normalised rows (the authors' tau-norm scores without them, the default);
- ``box``: also re-train ``bbox_pred``;
- ``mask``: Mask R-CNN: also re-train the mask branch (``roi_heads.mask_head`` and
  ``mask_predictor``; its BatchNorm layers stay locked at their stage-1 statistics) and sum
  ``loss_mask``; false (default): the mask branch stays frozen with the representation;
- ``shifted_bn``: the box head's BatchNorm layers (``faster_rcnn_v2``) update their running
  statistics on the re-balanced data while their affine parameters stay frozen;
- ``cosine`` (optional map): ``scale`` (20.0), ``learn_scale`` (true) for the cosine head.

Seams with the trainer: it builds the detector from the stage-2 config, calls
:func:`prepare_stage2` *before* wrapping the model in DDP, and trains with the returned
:class:`Stage2Setup`: the optimizer's param groups (an empty list = nothing to train: evaluate
directly) and the loss keys it sums (``Trainer.train(param_groups=..., loss_keys=...)``). To
evaluate a saved stage-2 checkpoint, build the detector
and call :func:`install_refine_head` with ``initialise=False`` before ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ltdet.imbalance.shifted_bn import freeze_batchnorm, shift_batchnorm
from ltdet.models.classifiers import (
    CosineClassifier,
    CosinePredictor,
    LWSPredictor,
    ScaledClassifier,
    reset_classifier,
    tau_normalize,
)
from ltdet.models.init import init_classifier_for_loss, prior_prob_from_cfg
from ltdet.models.weights import unwrap_state_dict
from ltdet.spec import SpecError, check_choice, check_keys, check_number

logger = logging.getLogger(__name__)

__all__ = [
    "HEADS",
    "RefineOptions",
    "Stage2Setup",
    "freeze_module",
    "install_refine_head",
    "prepare_stage2",
    "refine_options",
    "stage2_loss_keys",
    "trainable_parameter_names",
]

HEADS = ("crt", "lws", "tau_norm", "cosine")
#: the ``refine.cosine`` keys: :class:`CosinePredictor`'s keyword arguments (its defaults)
_COSINE_KEYS = ("scale", "learn_scale")
_COSINE_LEARN_SCALE = inspect.signature(CosinePredictor).parameters["learn_scale"].default
# State-dict prefixes that make up the stage-1 detector proper; everything else under roi_heads
# (loss state, LDS/FDS statistics) may legitimately differ between the two stages' configs.
_DETECTOR_PREFIXES = (
    "backbone.",
    "rpn.",
    "roi_heads.box_head.",
    "roi_heads.box_predictor.",
    "roi_heads.mask_",
    "roi_heads.keypoint_",
)
_PREDICTOR_PREFIX = "roi_heads.box_predictor."


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """The ``refine`` section (module docstring); the defaults here are the Python API's (a
    config run has every key: the config loader merges the schema)."""

    head: str = "crt"
    tau: float = 1.0
    box: bool = False
    mask: bool = False
    shifted_bn: bool = False
    normalize_background: bool = False
    tau_keep_bias: bool = False
    cosine: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def learn_cosine_scale(self) -> bool:
        """``cosine.learn_scale``, absent: :class:`CosinePredictor`'s default."""
        return bool(self.cosine.get("learn_scale", _COSINE_LEARN_SCALE))


@dataclasses.dataclass(frozen=True)
class Stage2Setup:
    """What :func:`prepare_stage2` hands the trainer: the optimizer's ``param_groups`` (``[]``:
    nothing to train) and the ``loss_keys`` it sums (the other losses are computed, not summed)."""

    param_groups: list[dict]
    loss_keys: tuple[str, ...]


def refine_options(cfg: Mapping) -> RefineOptions:
    """The checked :class:`RefineOptions` of ``cfg["refine"]``; ValueError (``SpecError``)
    naming the key otherwise."""
    refine = dict(cfg.get("refine") or {})
    fields = [f.name for f in dataclasses.fields(RefineOptions)]
    check_keys("refine", refine, fields)
    if "type" in refine:  # check_keys allows it (component specs have one); refine has none
        raise SpecError(f"refine: unknown key 'type'; valid keys: {sorted(fields)}")
    options = RefineOptions(**refine)
    check_choice("refine.head", options.head, HEADS)
    check_number("refine.tau", options.tau, low=0.0)
    check_keys("refine.cosine", options.cosine or {}, _COSINE_KEYS)
    if options.head == "tau_norm" and options.box:
        raise ValueError(
            "refine.box=true re-trains the box regressor, but refine.head=tau_norm "
            "trains nothing; use head crt/lws/cosine, or box=false"
        )
    if options.head == "tau_norm" and options.mask:
        raise ValueError(
            "refine.mask=true re-trains the mask branch, but refine.head=tau_norm "
            "trains nothing; use head crt/lws/cosine, or mask=false"
        )
    return dataclasses.replace(options, cosine=dict(options.cosine or {}))


def _roi_heads(model: nn.Module):
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is None or not hasattr(roi_heads, "box_predictor"):
        raise ValueError(
            f"stage 2 refines the box classifier of a two-stage detector; {type(model).__name__} "
            "has no roi_heads.box_predictor (use model.arch=faster_rcnn or faster_rcnn_v2)"
        )
    return roi_heads


def freeze_module(module: nn.Module, *, name: str = "") -> nn.Module:
    """Freeze ``module`` for stage 2: ``requires_grad=False`` everywhere, BatchNorm locked in
    inference mode (replaced by ``FrozenBatchNorm2d`` with the same values, so ``model.train()``
    cannot switch it back to batch statistics). Returns the module (the replacement if
    ``module`` is itself a BatchNorm layer)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return freeze_batchnorm(module, name=name)


def stage2_loss_keys(cfg: Mapping) -> tuple[str, ...]:
    """Loss-dict keys the trainer sums in stage 2: the RoI classification loss, plus the RoI box
    loss when ``refine.box`` and the mask loss when ``refine.mask``. The RPN losses
    (``loss_objectness``, ``loss_rpn_box_reg``) and a frozen branch's loss are dropped: nothing
    they could train is trainable."""
    options = refine_options(cfg)
    return (
        ("loss_classifier",)
        + (("loss_box_reg",) if options.box else ())
        + (("loss_mask",) if options.mask else ())
    )


def install_refine_head(model: nn.Module, cfg: Mapping, *, initialise: bool = True) -> nn.Module:
    """Give ``model.roi_heads.box_predictor`` the stage-2 head of ``cfg["refine"]``.

    Structure (always): ``lws`` wraps the classifier in an :class:`LWSPredictor`; ``cosine``
    replaces it by a fresh :class:`CosinePredictor` that keeps the stage-1 ``bbox_pred``.
    Values (``initialise=True``, i.e. starting stage 2 from stage-1 weights): ``crt``
    re-initialises the classifier (weight N(0, 0.01), bias 0; with a sigmoid stage-2 loss, bias
    at the prior ``model.cls_prior_prob``, see ``ltdet.models.init``); ``tau_norm`` applies
    :func:`tau_normalize`. With ``initialise=False`` only the structure changes, so a saved
    stage-2 state dict loads key for key. Returns the model.
    """
    options = refine_options(cfg)
    roi_heads = _roi_heads(model)
    predictor = roi_heads.box_predictor
    head = options.head
    if head == "lws":
        if not isinstance(getattr(predictor, "cls_score", None), ScaledClassifier):
            roi_heads.box_predictor = LWSPredictor(predictor)
    elif head == "cosine":
        if not isinstance(getattr(predictor, "cls_score", None), CosineClassifier) or initialise:
            # The regressor and the classifier read the same features: its shape gives D and C+1;
            # the classifier's width is the stage-2 loss's (seesaw: C + 2). refine.cosine holds
            # checked keys only: CosinePredictor's keyword arguments.
            new = CosinePredictor(
                predictor.bbox_pred.in_features,
                predictor.bbox_pred.out_features // 4,
                cls_channels=_cls_channels(roi_heads),
                **options.cosine,
            )
            new.bbox_pred = predictor.bbox_pred
            roi_heads.box_predictor = new.to(predictor.bbox_pred.weight.device)
    elif initialise and head == "crt":
        reset_classifier(predictor)
        # A stage-2 sigmoid loss needs the prior init, not bias 0 (model.cls_prior_prob).
        init_classifier_for_loss(model, prior_prob_from_cfg(cfg.get("model")))
    elif initialise and head == "tau_norm":
        tau_normalize(
            predictor,
            float(options.tau),
            normalize_background=bool(options.normalize_background),
            keep_bias=bool(options.tau_keep_bias),
        )
    return model


def _cls_channels(roi_heads: Any) -> int | None:
    """Width of the classifier the stage-2 loss trains (C + 1; seesaw's C + 2), or None for a
    head without an ltdet loss (torchvision's own RoIHeads)."""
    loss = getattr(roi_heads, "cls_loss", None)
    if loss is None:
        return None
    return int(loss.get_cls_channels(roi_heads.box_predictor.bbox_pred.out_features // 4 - 1))


def _load_stage1(model: nn.Module, state_dict: Mapping, fresh_classifier: bool = False) -> None:
    """Load the stage-1 weights; with ``fresh_classifier`` (cRT, cosine: stage 2 starts a new
    classifier) a stage-1 ``cls_score`` of another width is not needed (a CE stage 1, C + 1
    outputs, refined with seesaw, C + 2, or the reverse) and is skipped, logged."""
    state = unwrap_state_dict(state_dict)
    own = model.state_dict()
    required = [
        k for k in own if k.startswith(_DETECTOR_PREFIXES) and not k.endswith("num_batches_tracked")
    ]
    missing = [k for k in required if k not in state]
    classifier = _PREDICTOR_PREFIX + "cls_score."
    # same classes (C from the regressor), the other loss layout: C + 1 against seesaw's C + 2
    num_classes = (
        own[_PREDICTOR_PREFIX + "bbox_pred.weight"].shape[0] // 4 - 1
        if _PREDICTOR_PREFIX + "bbox_pred.weight" in own
        else None
    )
    other_width = [
        k
        for k in required
        if k.startswith(classifier)
        and k in state
        and state[k].shape != own[k].shape
        and num_classes is not None
        and state[k].shape[1:] == own[k].shape[1:]
        and {state[k].shape[0], own[k].shape[0]} == {num_classes + 1, num_classes + 2}
    ]
    if fresh_classifier and other_width:
        logger.info(
            "stage 2: the stage-1 classifier has another width (%s vs %s outputs: another "
            "loss's cls_channels); the stage-2 classifier starts fresh anyway",
            state[other_width[0]].shape[0],
            own[other_width[0]].shape[0],
        )
        state = {k: v for k, v in state.items() if k not in other_width}
        required = [k for k in required if k not in other_width]
    wrong = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in required
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or wrong:
        hint = (
            "the box predictor differs: give the stage-2 config the stage-1 model.classifier "
            "and number of classes (and, for refine.head lws / tau_norm, which keep the "
            "stage-1 classifier, a cls_loss of the same classifier width: seesaw's C + 2 or "
            "C + 1 for every other loss)"
            if any(k.startswith(_PREDICTOR_PREFIX) for k in missing)
            or any(w.startswith(_PREDICTOR_PREFIX) for w in wrong)
            else "check model.arch / model.backbone / model.norm against stage 1"
        )
        raise ValueError(
            f"stage-1 checkpoint does not fit the stage-2 model ({len(missing)} missing, "
            f"{len(wrong)} of another shape, e.g. {(missing + wrong)[:3]}): {hint}"
        )
    # Non-detector entries (loss state, LDS/FDS buffers) load where both stages have them.
    loadable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(loadable, strict=False)


def prepare_stage2(model: nn.Module, cfg: Mapping, stage1_state_dict: Mapping) -> Stage2Setup:
    """Turn a freshly built detector into a stage-2 model; returns what the trainer trains.

    Steps: load the stage-1 weights (a state dict, or a checkpoint dict with a ``"model"`` entry;
    a DDP ``module.`` prefix is removed); install the ``refine.head``; freeze everything except
    the classifier being trained (and ``bbox_pred`` with ``refine.box``), BatchNorm layers locked
    in inference mode - except, with ``refine.shifted_bn``, the box head's, which keep updating
    their running statistics with frozen affine parameters.

    Call before DDP wrapping and before building the optimizer.

    Returns:
        a :class:`Stage2Setup`: ``param_groups`` for ``torch.optim`` (each with a ``name``; scale
        parameters carry ``weight_decay: 0.0``, decay would pull a scale toward 0; ``[]`` for
        ``tau_norm``: nothing to train, evaluate the model directly) and ``loss_keys``, the
        losses to sum (:func:`stage2_loss_keys`).
    """
    options = refine_options(cfg)
    roi_heads = _roi_heads(model)
    _load_stage1(model, stage1_state_dict, fresh_classifier=options.head in ("crt", "cosine"))
    install_refine_head(model, cfg, initialise=True)
    predictor = roi_heads.box_predictor

    # Everything frozen first, BN locked; then the trainable parts are switched back on.
    shifted = options.shifted_bn
    for name, child in list(model.named_children()):
        if shifted and name == "roi_heads":
            continue
        setattr(model, name, freeze_module(child, name=name))
    if shifted:
        for name, child in list(roi_heads.named_children()):
            if name != "box_head":
                setattr(roi_heads, name, freeze_module(child, name=f"roi_heads.{name}"))
        for p in roi_heads.box_head.parameters():
            p.requires_grad_(False)
        names = shift_batchnorm(roi_heads.box_head)
        if not names:
            raise ValueError(
                "refine.shifted_bn=true, but roi_heads.box_head has no BatchNorm layer (the "
                "default TwoMLPHead); use model.arch=faster_rcnn_v2, whose box head has BatchNorm"
            )
        logger.info("stage 2: shifted BN in %d box-head BatchNorm layers", len(names))

    groups: list[dict[str, Any]] = []
    cls_score = predictor.cls_score
    head = options.head
    if head == "lws":
        cls_score.scales.requires_grad_(True)
        groups.append({"params": [cls_score.scales], "weight_decay": 0.0, "name": "lws_scales"})
    elif head in ("crt", "cosine"):
        weights = [p for n, p in cls_score.named_parameters() if n != "scale"]
        for p in weights:
            p.requires_grad_(True)
        groups.append({"params": weights, "name": "classifier"})
        if isinstance(cls_score, CosineClassifier) and options.learn_cosine_scale:
            cls_score.scale.requires_grad_(True)
            groups.append(
                {"params": [cls_score.scale], "weight_decay": 0.0, "name": "cosine_scale"}
            )
    if options.box:
        box = list(predictor.bbox_pred.parameters())
        for p in box:
            p.requires_grad_(True)
        groups.append({"params": box, "name": "box_regressor"})
    if options.mask:
        if getattr(roi_heads, "mask_predictor", None) is None:
            raise ValueError(
                "refine.mask=true re-trains the mask branch, but the model has none "
                "(use model.arch=mask_rcnn or mask_rcnn_v2, or refine.mask=false)"
            )
        mask = [p for m in (roi_heads.mask_head, roi_heads.mask_predictor) for p in m.parameters()]
        for p in mask:
            p.requires_grad_(True)
        groups.append({"params": mask, "name": "mask_branch"})

    loss_keys = stage2_loss_keys(cfg)
    n_train = sum(p.numel() for g in groups for p in g["params"])
    logger.info(
        "stage 2 (%s): %d trainable parameters in %s; summed losses: %s",
        head,
        n_train,
        [g["name"] for g in groups] or "none (post-hoc head)",
        list(loss_keys),
    )
    return Stage2Setup(param_groups=groups, loss_keys=loss_keys)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients (for logs and tests)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
