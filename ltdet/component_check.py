"""Every component spec of a config is checked when the config loads, not after the data and the
model are built.

The open maps of the schema (`model.cls_loss`, `model.box_loss`, `model.sampler`,
`model.classifier`, `model.lds`, `model.fds`, `data.sampler`) are validated by their builders.
Here each spec is dry-built on tiny stand-in inputs (2 classes, 16 features), which runs exactly
the builder's own checks - type, keys, values - without a data set. A failure becomes a
one-line `ConfigError` naming the key, the file that set it, and the closest valid name.
"""
import difflib
import math
import re

from ltdet.config import ConfigError

# name in a builder's message -> the valid names it lists (for "did you mean").
_QUOTED = re.compile(r"'([^']+)'")


def _dummy_stats():
    from ltdet.data import ClassStats

    return ClassStats(image_count=[5.0, 500.0], instance_count=[8.0, 900.0], num_images=600)


def _check_loss(spec):
    from ltdet.losses import LOSSES, build_loss
    from ltdet.losses.registry import hyper_parameters

    kind = spec.get("type")
    if kind not in LOSSES:
        return _unknown("loss type", kind, LOSSES)
    unknown = sorted(set(spec) - {"type"} - set(hyper_parameters(LOSSES[kind])))
    if unknown:
        return _unknown(f"hyper-parameter of loss {kind!r}", unknown[0],
                        hyper_parameters(LOSSES[kind]))
    build_loss(spec, stats=_dummy_stats())
    return None


def _check_roi_sampler(spec):
    from ltdet.models.roi_samplers import ROI_SAMPLERS, build_roi_sampler

    if spec.get("type", "random") not in ROI_SAMPLERS:
        return _unknown("sampler type", spec.get("type"), ROI_SAMPLERS)
    build_roi_sampler(spec)
    return None


def _check_classifier(spec):
    from ltdet.models.classifiers import build_predictor

    build_predictor(spec, 16, 2)
    return None


def _check_lds(spec):
    from ltdet.imbalance import build_lds

    build_lds(spec, fg_iou_thresh=0.5)
    return None


def _check_fds(spec):
    from ltdet.imbalance import build_fds

    build_fds(spec, 16, fg_iou_thresh=0.5)
    return None




def _check_data_sampler(spec):
    from ltdet.data.samplers import DATA_SAMPLER_KEYS

    kind = spec.get("type", "default")
    if kind not in DATA_SAMPLER_KEYS:
        return _unknown("data sampler type", kind, DATA_SAMPLER_KEYS)
    unknown = sorted(set(spec) - {"type"} - set(DATA_SAMPLER_KEYS[kind]))
    if unknown:
        return _unknown(f"key of data sampler {kind!r}", unknown[0], DATA_SAMPLER_KEYS[kind])
    if kind == "repeat_factor" and not float(spec.get("threshold", 1e-3)) > 0:
        return f"threshold must be > 0, got {spec['threshold']!r}"
    return None


#: dotted key -> checker(spec) returning None or a message (or raising ValueError / TypeError).
CHECKS = {
    "model.cls_loss": _check_loss,
    "model.box_loss": _check_loss,
    "model.sampler": _check_roi_sampler,
    "model.classifier": _check_classifier,
    "model.lds": _check_lds,
    "model.fds": _check_fds,
    "data.sampler": _check_data_sampler,
}


def _unknown(what: str, name, valid) -> str:
    valid = sorted(valid)
    match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    return f"unknown {what} {name!r}{hint} (valid: {', '.join(valid) or 'none'})"


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _count(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


#: value checks of scalar keys whose schema type alone does not say enough
#: (key, check, what it must be); a null is accepted where the schema default is null.
VALUE_CHECKS = (
    ("solver.lr", _positive, "a finite number > 0"),
    ("solver.clip_grad_norm", _positive, "a finite number > 0, or null for no clipping"),
    ("solver.keep_checkpoints", _count(1), "an integer >= 1, or null to keep all"),
    ("solver.skip_nonfinite", _count(0), "an integer >= 0"),
    ("solver.max_iter", _count(1), "an integer >= 1"),
    ("dist_timeout", _positive, "a number of seconds > 0"),
)


def _check_values(cfg: dict, origins: dict) -> None:
    for dotted, ok, what in VALUE_CHECKS:
        node = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        nullable = dotted in ("solver.clip_grad_norm", "solver.keep_checkpoints")
        if (node is None and nullable) or (node is not None and ok(node)):
            continue
        raise ConfigError(f"config key '{dotted}' (set in {origins.get(dotted, 'defaults')}) "
                          f"must be {what}, got {node!r}")


def validate_components(cfg: dict, origins: dict) -> None:
    """Raise ConfigError for the first scalar value (`VALUE_CHECKS`) or component spec of `cfg`
    its builder would reject."""
    _check_values(cfg, origins)
    for dotted, check in CHECKS.items():
        section, key = dotted.split(".")
        spec = (cfg.get(section) or {}).get(key)
        if not spec:
            continue
        where = origins.get(dotted + ".type", origins.get(dotted, "defaults"))
        keys = [k for k in origins if k.startswith(dotted + ".")]
        if keys:  # the file that set the spec's own keys (an override may set just one)
            where = ", ".join(sorted({origins[k] for k in keys}))
        try:
            problem = check(dict(spec))
        except (ValueError, TypeError) as e:
            problem = str(e)
            names = _QUOTED.findall(problem)
            bad = [str(k) for k in spec if k != "type" and f"'{k}'" in problem]
            if not bad and f"'{spec.get('type')}'" in problem:
                bad = [str(spec["type"])]
            if bad and names:
                match = difflib.get_close_matches(bad[0], [n for n in names if n != bad[0]],
                                                  n=1, cutoff=0.5)
                if match:
                    problem += f"; did you mean {match[0]!r}?"
        if problem:
            raise ConfigError(f"config key '{dotted}' (set in {where}): {problem}")
