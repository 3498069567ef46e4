"""YAML configuration: `_base_` inheritance, command-line overrides, validation against a schema.

The schema, `ltdet/configs/base.yaml`, ships inside the package (package data, read through
`importlib.resources`, so a wheel install finds it) and every config starts from it; `schema_path()`
says where it is. It holds every key with its default and *is* the schema: a key absent from it is
unknown, and a value whose type differs from the default's is wrong. A few "open maps" (loss,
sampler, classifier and LDS/FDS specs, every sub-map of `refine`) accept any keys; the builder
that consumes them validates them itself (`ltdet.spec`), dry-run when the config loads
(`ltdet.component_check`).

Merge rules (mmdetection's, with one change for open maps):
- `_base_: path` or `_base_: [path, ...]` (relative to the file) is loaded first, left to right,
  and the file's own keys are deep-merged on top.
- Inside an open map, a child whose `type` differs from its parent's replaces the parent's map
  instead of merging into it (switching `{type: eqlv2, gamma: 12}` to `{type: ce}` must not leave a
  stray `gamma`); `_delete_: true` forces the replacement anywhere.

Float literals such as `1e-3` are read as floats (PyYAML follows YAML 1.1, which needs a dot).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import yaml

from ltdet.fileio import atomic_write

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11; only annotations need it
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: The schema: package data of `ltdet` (setup.py's package_data lists it).
SCHEMA_RESOURCE = ("ltdet", "configs/base.yaml")

#: Dotted keys whose values are free-form maps, validated by the builder that consumes them.
OPEN_MAPS = frozenset(
    {
        "model.cls_loss",
        "model.box_loss",
        "model.sampler",
        "model.classifier",
        "model.lds",
        "model.fds",
        "data.sampler",
    }
)
#: Every sub-map of these sections is open as well, including sub-maps base.yaml does not list
#: (e.g. `refine.cls_loss`); their scalar keys are validated as usual.
OPEN_SUBMAP_SECTIONS = ("refine",)

#: Keys with a closed set of values (model choices are validated by `build_detector`).
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "data.format": ("auto", "lvis", "coco"),
    "solver.schedule": ("step", "cosine"),
}

_BASE_KEY = "_base_"
_DELETE_KEY = "_delete_"
_OPTS_ORIGIN = "--opts"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` / `5E4` (no dot) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One override value, parsed with the config's YAML rules (`0.01`, `[1, 2]`, `null`)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse override value {text!r} as YAML: {e}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else "")
        )
    return _parse_yaml(path.read_text(encoding="utf-8"), path)


def _parse_yaml(text: str, path: PathLike) -> dict:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _is_open(dotted: str) -> bool:
    if dotted in OPEN_MAPS:
        return True
    head, _, rest = dotted.partition(".")
    return head in OPEN_SUBMAP_SECTIONS and bool(rest) and "." not in rest


def _merge(base: dict, child: dict, origins: dict, origin: str, prefix: str = "") -> dict:
    """Deep-merge `child` into a copy of `base`; record in `origins` where each key was set."""
    out = dict(base)
    for key, value in child.items():
        if key == _DELETE_KEY:
            continue
        if not isinstance(key, str):
            raise ConfigError(
                f"{origin}: key {key!r} under '{prefix or '<root>'}' must be a string"
            )
        dotted = f"{prefix}{key}"
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            replace = bool(value.get(_DELETE_KEY)) or (
                _is_open(dotted) and "type" in value and value["type"] != old.get("type")
            )
            if replace:
                out[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != _DELETE_KEY}
                _record(origins, dotted, out[key], origin)
            else:
                out[key] = _merge(old, value, origins, origin, dotted + ".")
        else:
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != _DELETE_KEY}
            out[key] = copy.deepcopy(value)
            _record(origins, dotted, value, origin)
    return out


def _record(origins: dict, dotted: str, value, origin: str) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, f"{dotted}.{k}", v, origin)


def _load_chain(path: Path, origins: dict, stack: tuple) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + (path,))
        raise ConfigError(f"circular _base_ chain: {chain}")
    data = _read_yaml(path)
    bases = data.pop(_BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {base} (resolved to {base_path})")
        merged = _merge(
            merged, _load_chain(base_path, origins, stack + (path,)), {}, str(base_path)
        )
    return _merge(merged, data, origins, str(path))


def _set_dotted(cfg: dict, dotted: str, value, origins: dict) -> dict:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--opts: malformed key {dotted!r} (expected a.b.c=value)")
    nested = value
    for k in reversed(keys):
        nested = {k: nested}
    return _merge(cfg, nested, origins, _OPTS_ORIGIN)


def _all_keys(schema: dict, prefix: str = "") -> list:
    keys = []
    for k, v in schema.items():
        keys.append(prefix + k)
        if isinstance(v, dict) and not _is_open(prefix + k):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _type_ok(value, default) -> bool:
    if default is None:
        return True
    if value is None:
        return False
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _validate(cfg: dict, schema: dict, origins: dict, all_keys: list, prefix: str = "") -> None:
    for key, value in cfg.items():
        dotted = prefix + key
        where = origins.get(dotted, "defaults")
        if key not in schema and isinstance(value, dict) and _is_open(dotted):
            continue  # a new sub-map of an open section (e.g. refine.cls_loss)
        if key not in schema:
            match = difflib.get_close_matches(
                dotted, all_keys, n=1, cutoff=0.6
            ) or difflib.get_close_matches(key, [prefix + k for k in schema], n=1, cutoff=0.0)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            raise ConfigError(f"unknown config key '{dotted}' (set in {where}){hint}")
        default = schema[key]
        if not _type_ok(value, default):
            raise ConfigError(
                f"config key '{dotted}' (set in {where}) expects {_type_name(default)} like "
                f"{default!r}, got {_type_name(value)} {value!r}"
            )
        if isinstance(default, list) and default and value:
            proto = default[0]
            for i, item in enumerate(value):
                if not _type_ok(item, proto):
                    raise ConfigError(
                        f"config key '{dotted}[{i}]' (set in {where}) expects {_type_name(proto)},"
                        f" got {_type_name(item)} {item!r}"
                    )
        if dotted in CHOICES and value not in CHOICES[dotted]:
            raise ConfigError(
                f"config key '{dotted}' (set in {where}) must be one of "
                f"{', '.join(CHOICES[dotted])}; got {value!r}"
            )
        if isinstance(value, dict) and not _is_open(dotted):
            _validate(value, default, origins, all_keys, dotted + ".")
        elif (
            isinstance(value, dict)
            and _is_open(dotted)
            and "type" in default
            and not isinstance(value.get("type"), str)
        ):
            raise ConfigError(
                f"config key '{dotted}.type' (set in {where}) must be a string "
                f"naming the {key} to build, got {value.get('type')!r}"
            )


def _schema_resource() -> Traversable:
    package, name = SCHEMA_RESOURCE
    return resources.files(package).joinpath(name)


def schema_path() -> Path:
    """The schema file shipped in the package (`ltdet/configs/base.yaml` of the installed ltdet).

    `load_config(schema_path())` gives the defaults; a config file may name it in `_base_`,
    though every config starts from it anyway. (pip unpacks wheels, so the resource is a file.)"""
    return Path(str(_schema_resource()))


def load_schema(schema_path: PathLike | None = None) -> dict:
    """The defaults (the package's `ltdet/configs/base.yaml`, or `schema_path`) as a nested dict."""
    if schema_path is not None:
        path = Path(schema_path)
        if not path.is_file():
            raise ConfigError(f"config schema not found: {path}")
        schema = _read_yaml(path)
    else:
        resource = _schema_resource()
        if not resource.is_file():
            raise ConfigError(
                f"the config schema {'/'.join(SCHEMA_RESOURCE)} is missing from "
                f"the installed package ({resource}); reinstall ltdet"
            )
        schema = _parse_yaml(resource.read_text(encoding="utf-8"), str(resource))
    schema.pop(_BASE_KEY, None)
    return schema


def load_config(
    path: PathLike | None,
    opts: Sequence[str] | None = None,
    schema_path: PathLike | None = None,
    validate_components: bool = True,
) -> dict:
    """Load a YAML config with its `_base_` chain, apply `opts`, validate, return plain dicts.

    Args:
        path: the YAML file (or None for the defaults alone).
        opts: overrides `["a.b.c=value", ...]`; values parsed as YAML.
        schema_path: the schema/defaults file; the package's `ltdet/configs/base.yaml` by
            default.
        validate_components: also dry-build every loss / sampler / classifier / LDS / FDS spec
            (`ltdet.component_check`), so that a misspelt type or hyper-parameter is a config
            error naming the file.
    Raises:
        ConfigError naming the dotted key, the file it came from and the closest valid key.
    """
    schema = load_schema(schema_path)
    origins: dict = {}
    cfg = copy.deepcopy(schema)
    if path is not None:
        cfg = _merge(cfg, _load_chain(Path(path), origins, ()), {}, str(path))
    for opt in opts or []:
        if not isinstance(opt, str) or "=" not in opt:
            raise ConfigError(f"--opts: expected key=value, got {opt!r}")
        key, _, text = opt.partition("=")
        cfg = _set_dotted(cfg, key.strip(), parse_value(text), origins)
    _validate(cfg, schema, origins, _all_keys(schema))
    if validate_components:
        # the builders' own checks, here rather than after the data and the model are built.
        # Imported here to break an import cycle: ltdet.component_check imports ConfigError from
        # this module.
        from ltdet.component_check import validate_components as check

        check(cfg, origins)
    return cfg


def dump_config(cfg: dict, path: PathLike) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    atomic_write(
        path, lambda f: yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None), text=True
    )
