"""Every component spec of a config is checked when the config loads, not after the data and the
model are built.

The open maps of the schema (`model.cls_loss`, `model.box_loss`, `model.sampler`,
`model.classifier`, `model.lds`, `model.fds`, `data.sampler`) are validated by their builders.
Here each spec is dry-built on tiny stand-in inputs (2 classes, 16 features, 3 images), which runs
exactly the builder's own checks - type, keys, values - without a data set. A builder reports a
bad spec as `ltdet.spec.SpecError`, whose message names the key, the value and the closest valid
name; it becomes a one-line `ConfigError` that adds the dotted key and the file that set it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from ltdet.config import ConfigError
from ltdet.data import ClassStats
from ltdet.data.samplers import DATA_SAMPLERS
from ltdet.imbalance import build_fds, build_lds
from ltdet.losses import LOSSES, build_loss
from ltdet.models.classifiers import build_predictor
from ltdet.models.roi_samplers import ROI_SAMPLERS, build_roi_sampler
from ltdet.spec import SpecError, build_from_spec, check_number

__all__ = ["CHECKS", "TYPE_TABLES", "VALUE_CHECKS", "validate_components"]

# Stand-ins for what the builders get from the data and the model.
_STATS = ClassStats(
    image_count=torch.tensor([5.0, 500.0]),
    instance_count=torch.tensor([8.0, 900.0]),
    num_images=600,
)
_IN_FEATURES = 16
_IMAGE_LABELS = [{1}, {2}, {1, 2}]  # per-image labels: what a data sampler reads of a data set


def _data_sampler(spec: dict) -> Any:
    return build_from_spec(
        DATA_SAMPLERS,
        "data.sampler",
        spec,
        default_type="default",
        dataset=_IMAGE_LABELS,
        seed=0,
        num_replicas=1,
        rank=0,
    )


#: dotted key -> dry build of its spec (raising SpecError, or a builder's ValueError / TypeError)
CHECKS: dict[str, Callable[[dict], Any]] = {
    "model.cls_loss": lambda spec: build_loss(spec, stats=_STATS),
    "model.box_loss": lambda spec: build_loss(spec, stats=_STATS),
    "model.sampler": build_roi_sampler,
    "model.classifier": lambda spec: build_predictor(spec, _IN_FEATURES, len(_STATS.image_count)),
    "model.lds": lambda spec: build_lds(spec, fg_iou_thresh=0.5),
    "model.fds": lambda spec: build_fds(spec, _IN_FEATURES, fg_iou_thresh=0.5),
    "data.sampler": _data_sampler,
}

#: dotted key -> (what its `type` names, the table of valid types, the type when absent). An
#: unknown type gets one wording for every component, the closest valid name first.
TYPE_TABLES: dict[str, tuple[str, Mapping[str, Any], str | None]] = {
    "model.cls_loss": ("loss type", LOSSES, None),
    "model.box_loss": ("loss type", LOSSES, None),
    "model.sampler": ("sampler type", ROI_SAMPLERS, "random"),
    "data.sampler": ("data sampler type", DATA_SAMPLERS, "default"),
}


def _unknown(what: str, name: Any, valid: Iterable[str]) -> str:
    valid = sorted(valid)
    match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    return f"unknown {what} {name!r}{hint} (valid: {', '.join(valid) or 'none'})"


#: scalar keys whose schema type alone does not say enough: (key, `ltdet.spec.check_number`
#: bounds, what a null means or None where null is not allowed).
VALUE_CHECKS: tuple[tuple[str, dict, str | None], ...] = (
    ("solver.lr", {"low": 0, "low_open": True}, None),
    ("solver.clip_grad_norm", {"low": 0, "low_open": True}, "no clipping"),
    ("solver.keep_checkpoints", {"low": 1, "integer": True}, "keep all"),
    ("solver.skip_nonfinite", {"low": 0, "integer": True}, None),
    ("solver.max_iter", {"low": 1, "integer": True}, None),
    ("dist_timeout", {"low": 0, "low_open": True}, None),
)


def _check_values(cfg: dict, origins: dict) -> None:
    for dotted, bounds, null_means in VALUE_CHECKS:
        node: Any = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None and null_means is not None:
            continue
        try:
            check_number(
                f"config key '{dotted}' (set in {origins.get(dotted, 'defaults')})", node, **bounds
            )
        except SpecError as e:
            note = f" (or null: {null_means})" if null_means else ""
            raise ConfigError(f"{e}{note}") from None


def _where(dotted: str, origins: dict) -> str:
    """The file(s) that set the spec's own keys (an override may set just one)."""
    keys = [k for k in origins if k.startswith(dotted + ".")]
    if keys:
        return ", ".join(sorted({origins[k] for k in keys}))
    return origins.get(dotted, "defaults")


def _problem(dotted: str, spec: dict) -> str | None:
    if dotted in TYPE_TABLES:
        what, table, default = TYPE_TABLES[dotted]
        kind = spec.get("type", default)
        if kind not in table:
            return _unknown(what, kind, table)
    try:
        CHECKS[dotted](spec)
    # SpecError: the builders' contract. ValueError / TypeError: a check inside a component's
    # constructor, or a value of the wrong kind (float("x")); their messages stand as they are.
    except (SpecError, ValueError, TypeError) as e:
        return str(e)
    return None


def validate_components(cfg: dict, origins: dict) -> None:
    """Raise ConfigError for the first scalar value (`VALUE_CHECKS`) or component spec of `cfg`
    its builder would reject."""
    _check_values(cfg, origins)
    for dotted in CHECKS:
        section, key = dotted.split(".")
        spec = (cfg.get(section) or {}).get(key)
        if not spec:
            continue
        problem = _problem(dotted, dict(spec))
        if problem:
            raise ConfigError(
                f"config key '{dotted}' (set in {_where(dotted, origins)}): {problem}"
            )
