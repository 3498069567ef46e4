"""The RoI sampler table and `build_roi_sampler`: a config spec becomes a sampler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ltdet.spec import build_from_spec

from .base import RoISampler
from .ohem import OHEMRoISampler
from .pisa import PISARoISampler
from .random import RandomRoISampler

__all__ = ["ROI_SAMPLERS", "build_roi_sampler"]

#: config `type` -> sampler class; its keyword arguments are the spec's other keys
ROI_SAMPLERS: dict[str, type[RoISampler]] = {
    "random": RandomRoISampler,
    "ohem": OHEMRoISampler,
    "pisa": PISARoISampler,
}


def build_roi_sampler(cfg: None | Mapping[str, Any] | RoISampler) -> RoISampler:
    """Builds a RoI sampler from `{"type": "random" | "ohem" | "pisa", **options}` (no `type`:
    random), None (random) or an already built `RoISampler` (returned as is). Raises
    `ltdet.spec.SpecError` (a ValueError) naming the key and the valid choices."""
    if cfg is None:
        return RandomRoISampler()
    if isinstance(cfg, RoISampler):
        return cfg
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"sampler must be a dict like {{'type': 'ohem'}} or a RoISampler, "
            f"got {type(cfg).__name__}"
        )
    return build_from_spec(ROI_SAMPLERS, "sampler", cfg, default_type="random")
