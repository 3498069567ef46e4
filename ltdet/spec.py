"""Component specs: the one idiom by which a config mapping becomes a component.

A *spec* is a config mapping such as ``{"type": "eqlv2", "gamma": 12}``. A package that builds
components from specs keeps one table, name -> class, and calls :func:`build_from_spec`; a class
describes the keys it accepts through its ``from_config`` classmethod (detectron2's idiom) or, by
default, through its ``__init__`` signature. Every failure is a :class:`SpecError` that names the
component, the key, the value and the valid choices (with the closest valid name), so the
config check at load time (``ltdet.component_check``) can report it against the config file.

    LOSSES = {"ce": CrossEntropyLoss, "eqlv2": EQLv2Loss}          # the package's table
    loss = build_from_spec(LOSSES, "loss", {"type": "eqlv2", "gamma": 12}, num_classes=1203)

Context keywords (``num_classes``, ``stats``, ``in_features`` ...) are what the caller knows and
the spec does not; a class takes the ones its ``from_config`` / ``__init__`` names, the others
are dropped, so one call site serves every class of a table.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "SpecError",
    "build_from_spec",
    "check_choice",
    "check_keys",
    "check_number",
    "spec_keys",
]


class SpecError(ValueError):
    """A component spec that cannot build; the message names the key, the value and the fix."""


def _closest(name: Any, valid: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(what: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise SpecError unless ``value`` is one of ``choices``: ``what`` names the key."""
    choices = list(choices)
    if value not in choices:
        raise SpecError(
            f"{what}: unknown value {value!r}{_closest(value, map(str, choices))}; "
            f"valid values: {sorted(map(str, choices))}"
        )


def check_keys(what: str, spec: Mapping[str, Any], valid: Iterable[str]) -> None:
    """Raise SpecError if ``spec`` has a key outside ``valid`` (``type`` is always allowed)."""
    valid = set(valid) | {"type"}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise SpecError(
            f"{what}: unknown key {unknown[0]!r}{_closest(unknown[0], valid)}; "
            f"valid keys: {sorted(valid - {'type'})}"
        )


def check_number(
    what: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise SpecError unless ``value`` is a finite number (an int if ``integer``) in the range
    ``[low, high]`` (``low_open`` / ``high_open``: the bound itself excluded)."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise SpecError(f"{what} must be {kind}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        rng = f"{left}{lo}, {hi}{right}"
        raise SpecError(f"{what} must be in {rng}, got {value!r}")


def _init_parameters(cls: type[Any]) -> dict[str, inspect.Parameter]:
    target: Callable = cls.from_config if hasattr(cls, "from_config") else cls.__init__
    params = dict(inspect.signature(target).parameters)
    for skip in ("self", "cls", "spec"):
        params.pop(skip, None)
    return {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def spec_keys(cls: type, context: Iterable[str] = ()) -> list[str]:
    """The spec keys ``cls`` accepts: its ``SPEC_KEYS`` if it declares them, else the keyword
    parameters of its ``__init__`` minus the context keywords."""
    declared = getattr(cls, "SPEC_KEYS", None)
    if declared is not None:
        return list(declared)
    return [n for n in _init_parameters(cls) if n not in set(context)]


def build_from_spec(
    table: Mapping[str, type],
    what: str,
    spec: Mapping[str, Any],
    default_type: str | None = None,
    **context: Any,
) -> Any:
    """Build the component ``spec`` names from ``table`` (name -> class).

    ``spec["type"]`` picks the class (``default_type`` when absent); the other keys must be ones
    the class accepts (:func:`spec_keys`). A class with a ``from_config(spec, **context)``
    classmethod builds itself from the whole spec; otherwise it is called with the spec's keys
    and the context keywords its ``__init__`` names."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"{what} spec must be a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type", default_type)
    check_choice(f"{what} type", kind, table)
    cls = table[kind]
    check_keys(f"{what} {kind!r}", spec, spec_keys(cls, context))
    if hasattr(cls, "from_config"):
        return cls.from_config(dict(spec), **context)
    params = _init_parameters(cls)
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    kwargs.update({k: v for k, v in context.items() if k in params})
    return cls(**kwargs)
