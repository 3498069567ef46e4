"""Image-level samplers for long-tailed detection; finite, seeded, distributed-aware.

Every training sampler draws the whole epoch's index list from a ``torch.Generator`` seeded with
``seed + epoch`` (so every rank computes the same list without communication), pads it by
repeating from its start to a multiple of ``num_replicas`` and gives rank ``k`` the indices
``[k::num_replicas]``: shards have equal length, so DDP ranks run the same number of steps.
The list is computed in ``set_epoch``, which makes ``__len__`` exact.

- `repeat_factors` / `RepeatFactorSampler`: repeat-factor sampling, LVIS paper (Gupta et al.,
  CVPR 2019, Sec. 4): ``r_c = max(1, sqrt(t / f_c))`` (or detectron2's linear
  ``max(1, t / f_c)``), ``f_c`` over the annotated images (detectron2), ``r_img = max_{c in img}
  r_c``, with stochastic rounding re-drawn each epoch.
- `ClassAwareSampler`: a class uniformly, then an image containing it uniformly (Shen et al.,
  ECCV 2016, "Relay backpropagation").
- `GroupedBatchSampler`: batches of one aspect-ratio group (w >= h vs w < h), finite.
- `InferenceSampler`: contiguous shards for distributed evaluation, no duplicates.
"""

from __future__ import annotations

import abc
import math
from typing import Iterator, Mapping, Sequence, Sized, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from ltdet.spec import SpecError, build_from_spec, check_number, spec_keys

from .class_stats import FlatAnnotations

__all__ = [
    "ClassAwareSampler",
    "DATA_SAMPLERS",
    "DATA_SAMPLER_KEYS",
    "GroupedBatchSampler",
    "InferenceSampler",
    "RepeatFactorSampler",
    "aspect_ratio_group_ids",
    "build_train_sampler",
    "class_repeat_factors",
    "group_batches",
    "repeat_factors",
]


def _resolve_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    num_replicas, rank = int(num_replicas), int(rank)
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(
            f"sampler: need num_replicas >= 1 and 0 <= rank < num_replicas, got "
            f"num_replicas={num_replicas}, rank={rank}"
        )
    return num_replicas, rank


def _image_label_pairs(source) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(image index [P], label [P], num_images, num_classes)``, one pair per class on an image.

    ``source``: json path / dict (validated, crowd boxes dropped), `FlatAnnotations`, a data set with
    ``.annotations`` (`FlatAnnotations` - the annotations it actually loaded), or a sequence of
    per-image label iterables.
    """
    if isinstance(source, FlatAnnotations):
        flat = source
    elif hasattr(source, "annotations") and isinstance(source.annotations, FlatAnnotations):
        flat = source.annotations
    elif isinstance(source, (str, bytes, Mapping)) or hasattr(source, "__fspath__"):
        flat = FlatAnnotations.from_json(source)
    else:
        labels = [list(x) for x in source]
        counts = np.fromiter((len(x) for x in labels), np.int64, len(labels))
        flat_labels = np.fromiter((v for x in labels for v in x), np.int64, int(counts.sum()))
        img = np.repeat(np.arange(len(labels)), counts)
        num_classes = int(flat_labels.max()) if flat_labels.size else 0
        key = np.unique(img * (num_classes + 1) + flat_labels)
        return key // (num_classes + 1), key % (num_classes + 1), len(labels), num_classes
    img, lab = flat.image_label_pairs()
    return img, lab, flat.num_images, flat.num_classes


def _class_repeat_factors(img, lab, num_classes, threshold, sqrt) -> torch.Tensor:
    # (image, class) pairs are unique, so the annotated images are the distinct image indices
    num_annotated = max(int(np.unique(img).size), 1)
    freq = torch.bincount(torch.from_numpy(lab), minlength=num_classes + 1).double() / num_annotated
    ratio = threshold / freq.clamp(min=1e-12)
    return (torch.sqrt(ratio) if sqrt else ratio).clamp(min=1.0)


def class_repeat_factors(
    json_or_dataset, threshold: float = 1e-3, sqrt: bool = True
) -> torch.Tensor:
    """Per-class repeat factors ``r_c``, float64 ``[C]`` (index i = label i + 1); see
    `repeat_factors` for the definition."""
    if threshold <= 0:
        raise ValueError(f"repeat_factors: threshold must be > 0, got {threshold}")
    img, lab, _, num_classes = _image_label_pairs(json_or_dataset)
    return _class_repeat_factors(img, lab, num_classes, threshold, sqrt)[1:]


def repeat_factors(json_or_dataset, threshold: float = 1e-3, sqrt: bool = True) -> torch.Tensor:
    """Per-image repeat factors, float64 ``[num_images]`` (dataset index order).

    ``f_c`` = fraction of the *annotated* images (at least one loaded annotation) containing
    class c, ``r_c = max(1, sqrt(t / f_c))`` (``sqrt=False``: ``max(1, t / f_c)``),
    ``r_img = max over classes on the image of r_c``, and 1 for an image without annotations
    (LVIS paper, Gupta et al. 2019, Sec. 4 "Repeat factor sampling"). As detectron2
    (``RepeatFactorTrainingSampler.repeat_factors_from_category_frequency`` on the data set its
    loader has already filtered of images without annotations, ``REPEAT_SQRT`` for ``sqrt``),
    images without annotations do not enter ``f_c``'s denominator.
    """
    if threshold <= 0:
        raise ValueError(f"repeat_factors: threshold must be > 0, got {threshold}")
    img, lab, num_images, num_classes = _image_label_pairs(json_or_dataset)
    if num_images == 0:
        raise ValueError("repeat_factors: the data set has no images")
    img_t = torch.from_numpy(img)
    class_rf = _class_repeat_factors(img, lab, num_classes, threshold, sqrt)
    rf = torch.ones(num_images, dtype=torch.float64)
    return rf.scatter_reduce_(0, img_t, class_rf[torch.from_numpy(lab)], "amax", include_self=True)


class _EpochSampler(Sampler[int], abc.ABC):
    """Seeded per-epoch index list, padded to a multiple of ``num_replicas``, sharded by rank."""

    def __init__(self, *, seed: int, num_replicas: int | None, rank: int | None):
        self.seed = int(seed)
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self.epoch = 0
        self._indices: list[int] = []

    @abc.abstractmethod
    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        """The whole epoch's (unpadded) int64 index list."""

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """All ranks' indices for ``epoch`` after padding (length multiple of num_replicas)."""
        g = torch.Generator().manual_seed(self.seed + int(epoch))
        idx = self._draw(g)
        n = idx.numel()
        total = math.ceil(n / self.num_replicas) * self.num_replicas
        if total > n:
            idx = idx.repeat(math.ceil(total / n))[:total]
        return idx

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._indices = self.epoch_indices(self.epoch)[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


class RepeatFactorSampler(_EpochSampler):
    """Repeat-factor sampling (Gupta et al., LVIS, CVPR 2019): each epoch image i appears
    ``floor(r_i)`` times plus once more with probability ``frac(r_i)`` (stochastic rounding from a
    generator seeded with ``seed + epoch``), shuffled with the same generator."""

    #: The `data.sampler` keys of ``type: repeat_factor``; their defaults are `repeat_factors`'s.
    SPEC_KEYS = ("threshold", "sqrt")

    def __init__(
        self,
        repeat_factors: torch.Tensor | Sequence[float],
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
    ):
        super().__init__(seed=seed, num_replicas=num_replicas, rank=rank)
        rf = torch.as_tensor(repeat_factors, dtype=torch.float64).reshape(-1)
        if rf.numel() == 0:
            raise ValueError(
                "RepeatFactorSampler: empty repeat factors (the data set has no images)"
            )
        if not torch.isfinite(rf).all() or (rf < 0).any():
            raise ValueError("RepeatFactorSampler: repeat factors must be finite and >= 0")
        if rf.sum() <= 0:
            raise ValueError(
                "RepeatFactorSampler: all repeat factors are 0, an epoch would be empty"
            )
        self.repeat_factors = rf
        self.shuffle = bool(shuffle)
        self._int_part = torch.floor(rf)
        self._frac_part = rf - self._int_part
        self.set_epoch(0)

    @classmethod
    def from_config(
        cls, spec: Mapping, *, dataset, seed: int, num_replicas: int, rank: int
    ) -> RepeatFactorSampler:
        """``data.sampler: {type: repeat_factor, threshold, sqrt}`` over ``dataset``."""
        options = {k: v for k, v in spec.items() if k != "type"}
        if "threshold" in options:
            check_number("data.sampler.threshold", options["threshold"], low=0, low_open=True)
            options["threshold"] = float(options["threshold"])
        if "sqrt" in options and not isinstance(options["sqrt"], bool):
            raise SpecError(f"data.sampler.sqrt must be true or false, got {options['sqrt']!r}")
        return cls(
            repeat_factors(dataset, **options), seed=seed, num_replicas=num_replicas, rank=rank
        )

    def _draw(self, generator):
        extra = torch.rand(self._frac_part.shape, generator=generator, dtype=torch.float64)
        reps = (self._int_part + (extra < self._frac_part).double()).long()
        if reps.sum() == 0:
            # Only possible when every factor is < 1: keep the epoch non-empty.
            reps[torch.argmax(self._frac_part)] = 1
        idx = torch.repeat_interleave(torch.arange(reps.numel()), reps)
        if self.shuffle:
            idx = idx[torch.randperm(idx.numel(), generator=generator)]
        return idx


class ClassAwareSampler(_EpochSampler):
    """Class-aware sampling (Shen et al., ECCV 2016): each draw picks a class uniformly among the
    classes with at least one image, then an image containing it uniformly. An epoch has
    ``num_samples`` draws (default: the number of images)."""

    #: The `data.sampler` keys of ``type: class_aware``; their defaults are ``__init__``'s.
    SPEC_KEYS = ("num_samples",)

    def __init__(
        self,
        dataset_or_image_labels,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        super().__init__(seed=seed, num_replicas=num_replicas, rank=rank)
        img, lab, num_images, _ = _image_label_pairs(dataset_or_image_labels)
        if img.size == 0:
            raise ValueError(
                "ClassAwareSampler: no image has an annotation, there is no class "
                "to sample from; use data.sampler.type: default"
            )
        order = np.lexsort((img, lab))
        self._images = torch.from_numpy(img[order])
        classes, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        self.classes = torch.from_numpy(classes)
        self._starts = torch.from_numpy(starts)
        self._counts = torch.from_numpy(counts)
        self.num_samples = int(num_samples) if num_samples is not None else int(num_images)
        if self.num_samples < 1:
            raise ValueError(f"ClassAwareSampler: num_samples must be >= 1, got {num_samples}")
        self.set_epoch(0)

    @classmethod
    def from_config(
        cls, spec: Mapping, *, dataset, seed: int, num_replicas: int, rank: int
    ) -> ClassAwareSampler:
        """``data.sampler: {type: class_aware, num_samples}`` over ``dataset``."""
        options = {k: v for k, v in spec.items() if k != "type"}
        return cls(dataset, seed=seed, num_replicas=num_replicas, rank=rank, **options)

    def _draw(self, generator):
        # Draw a full multiple of num_replicas: i.i.d. draws need no padding duplicates.
        n = math.ceil(self.num_samples / self.num_replicas) * self.num_replicas
        cls = torch.randint(self.classes.numel(), (n,), generator=generator)
        offset = (
            (torch.rand(n, generator=generator, dtype=torch.float64) * self._counts[cls])
            .long()
            .clamp(max=self._counts[cls] - 1)
        )
        return self._images[self._starts[cls] + offset]


class InferenceSampler(Sampler[int]):
    """Contiguous shard ``[rank * n // R, (rank + 1) * n // R)`` of ``range(n)``: every index
    exactly once over all ranks (shard lengths differ by at most one; evaluation gathers results
    instead of stepping in lock-step, so no padding duplicates are needed)."""

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None):
        self.n = int(n)
        if self.n < 0:
            raise ValueError(f"InferenceSampler: n must be >= 0, got {n}")
        self.num_replicas, self.rank = _resolve_world(num_replicas, rank)
        self.begin = self.rank * self.n // self.num_replicas
        self.end = (self.rank + 1) * self.n // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not depend on the epoch; present for a uniform interface."""

    def __iter__(self):
        return iter(range(self.begin, self.end))

    def __len__(self):
        return self.end - self.begin


def aspect_ratio_group_ids(aspect_ratios) -> torch.Tensor:
    """Group 0 for landscape/square images (w >= h), 1 for portrait (w < h); int64 ``[N]``."""
    return (torch.as_tensor(aspect_ratios, dtype=torch.float64) < 1.0).long()


class GroupedBatchSampler(Sampler[list]):
    """Batches of ``batch_size`` indices of one group (aspect ratio), in the order the wrapped
    sampler yields them; at the end of the epoch the remainders of all groups (fewer than
    ``batch_size`` each) form mixed batches, the last possibly partial. So every index of the
    sampler is yielded exactly once and ``len == ceil(len(sampler) / batch_size)``, which is
    equal across ranks when the sampler's shards are. ``group_ids=None``: one group."""

    def __init__(
        self, sampler: Sampler, group_ids: Sequence[int] | torch.Tensor | None, batch_size: int
    ):
        if int(batch_size) < 1:
            raise ValueError(f"GroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = None if group_ids is None else torch.as_tensor(group_ids).long().tolist()
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list]:
        buckets: dict[int, list[tuple[int, int]]] = {}
        for pos, idx in enumerate(self.sampler):
            g = 0 if self.group_ids is None else self.group_ids[idx]
            bucket = buckets.setdefault(g, [])
            bucket.append((pos, idx))
            if len(bucket) == self.batch_size:
                yield [i for _, i in bucket]
                buckets[g] = []
        leftovers = [i for _, i in sorted(p for b in buckets.values() for p in b)]
        for k in range(0, len(leftovers), self.batch_size):
            yield leftovers[k : k + self.batch_size]

    def __len__(self) -> int:
        # torch's Sampler declares no __len__; the wrapped one must have it (docstring)
        return math.ceil(len(cast(Sized, self.sampler)) / self.batch_size)


class _ShuffledSampler(DistributedSampler):
    """``data.sampler: {type: default}``: torch's `DistributedSampler` (shuffled with
    ``seed + epoch``, sharded, padded to equal shards, finite); no keys."""

    SPEC_KEYS = ()

    @classmethod
    def from_config(
        cls, spec: Mapping, *, dataset, seed: int, num_replicas: int, rank: int
    ) -> _ShuffledSampler:
        return cls(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )


#: `data.sampler.type` -> its index sampler (built by `build_from_spec`).
DATA_SAMPLERS = {
    "default": _ShuffledSampler,
    "repeat_factor": RepeatFactorSampler,
    "class_aware": ClassAwareSampler,
}
#: `data.sampler.type` -> the keys it accepts besides `type` (also checked at config load,
#: `ltdet.component_check`)
DATA_SAMPLER_KEYS = {name: tuple(spec_keys(cls)) for name, cls in DATA_SAMPLERS.items()}


def build_train_sampler(
    cfg_data: Mapping,
    dataset,
    num_replicas: int | None = None,
    rank: int | None = None,
    seed: int = 0,
) -> GroupedBatchSampler:
    """Batch sampler for ``cfg_data["sampler"]`` (`DATA_SAMPLERS`):

    ``{type: default}`` (shuffled, seeded, sharded, finite: torch's `DistributedSampler`),
    ``{type: repeat_factor, threshold: 0.001, sqrt: true}`` (``sqrt: false``: detectron2's
    linear ``max(1, t / f_c)``), ``{type: class_aware, num_samples: null}``;
    wrapped in `GroupedBatchSampler` (aspect-ratio groups when ``aspect_ratio_grouping``).
    Call ``.set_epoch(e)`` on the result at the start of every epoch.
    """
    num_replicas, rank = _resolve_world(num_replicas, rank)
    if len(dataset) == 0:
        raise ValueError("build_train_sampler: the training data set is empty")
    # a null spec (`data.sampler: null`) is the default sampler
    sampler = build_from_spec(
        DATA_SAMPLERS,
        "data.sampler",
        cfg_data["sampler"] or {},
        default_type="default",
        dataset=dataset,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )
    return group_batches(sampler, dataset, cfg_data)


def group_batches(sampler: Sampler, dataset, cfg_data: Mapping) -> GroupedBatchSampler:
    """An index sampler -> batches of ``cfg_data["batch_size"]``, grouped by aspect ratio when
    ``cfg_data["aspect_ratio_grouping"]``."""
    groups = (
        aspect_ratio_group_ids(dataset.aspect_ratios())
        if cfg_data["aspect_ratio_grouping"]
        else None
    )
    return GroupedBatchSampler(sampler, groups, cfg_data["batch_size"])
