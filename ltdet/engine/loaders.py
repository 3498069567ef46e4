"""The engine's data loading: data paths (generating the synthetic set when none is given),
data sets, and train loaders that can start mid-epoch and reproduce every augmentation.

Exact resume. The batch order of an epoch is a pure function of (seed, epoch, rank) - the
samplers draw it from their own seeded generators - so a run restarted at (epoch, position)
rebuilds the epoch's batch list and skips the first `position` batches without loading them.
Each sample is loaded under its own seed, derived from (seed, rank, epoch, batch, slot), so the
random transforms give the same result whichever worker (or the main process) loads it and
whatever happened before; in the main process the global RNG states are restored afterwards so
data loading never perturbs the training RNG stream.
"""

import logging
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ltdet.data import (
    COCODetection,
    LVISDetection,
    build_dataset,
    build_transforms,
    collate_detection,
    make_synthetic_lvis,
)
from ltdet.models.build import has_masks

from . import distributed as du

logger = logging.getLogger(__name__)

__all__ = [
    "SeededSamples",
    "build_datasets",
    "check_val_categories",
    "epoch_batches",
    "locate_or_generate_data",
    "make_loader",
    "sample_seed",
]


def locate_or_generate_data(cfg: dict) -> dict:
    """`dict(train_json, train_images, val_json, val_images)` from `cfg["data"]`.

    With `data.train.json` null the synthetic long-tailed set is generated (rank 0 first, the
    others wait, then find it complete) and its paths are used for both splits.
    """
    data = cfg["data"]
    if data["train"]["json"] is None:
        syn = data["synthetic"]
        out = (
            make_synthetic_lvis(root=syn["root"], seed=syn["seed"])
            if du.is_main_process()
            else None
        )
        du.barrier()
        if out is None:  # other ranks: rank 0 has finished it, so this only reads the marker
            out = make_synthetic_lvis(root=syn["root"], seed=syn["seed"])
        return dict(
            train_json=out["train_json"],
            train_images=out["image_root"],
            val_json=out["val_json"],
            val_images=out["image_root"],
        )
    paths = dict(
        train_json=data["train"]["json"],
        train_images=data["train"]["images"],
        val_json=data["val"]["json"],
        val_images=data["val"]["images"],
    )
    for split in ("train", "val"):
        js, im = paths[f"{split}_json"], paths[f"{split}_images"]
        if js is not None and not Path(js).is_file():
            raise FileNotFoundError(
                f"data.{split}.json: {js} does not exist (see "
                "docs/getting_started.md for where to put the files)"
            )
        if js is not None and (im is None or not Path(im).is_dir()):
            raise FileNotFoundError(
                f"data.{split}.images: {im!r} is not a folder; set it to the image root of {js}"
            )
    return paths


def build_datasets(
    cfg: dict, paths: dict, *, train: bool = True, val: bool = True
) -> tuple[LVISDetection | COCODetection | None, LVISDetection | COCODetection | None]:
    """(train_dataset or None, val_dataset or None) with the config's transforms.

    ``data.filter_empty`` drops training images without annotations (detectron2's
    ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``) before anything counts them, so the class statistics
    and repeat factors are those of the annotated images; the validation set is never filtered.
    A Mask R-CNN config (`ltdet.models.build.has_masks`) reads the training masks; the validation
    set's are read by the evaluator from its json."""
    fmt = cfg["data"]["format"]
    train_ds = val_ds = None
    if train:
        train_ds = build_dataset(
            paths["train_json"],
            paths["train_images"],
            format=fmt,
            transforms=build_transforms(cfg["data"], train=True),
            skip_invalid=cfg["data"]["skip_invalid"],
            filter_empty=bool(cfg["data"]["filter_empty"]),
            masks=has_masks(cfg),
        )
        if len(train_ds) == 0:
            raise ValueError(f"the training set {paths['train_json']} has no images")
    if val:
        if paths["val_json"] is None:
            raise ValueError("data.val.json is null: set it (and data.val.images) to evaluate")
        val_ds = build_dataset(
            paths["val_json"],
            paths["val_images"],
            format=fmt,
            transforms=build_transforms(cfg["data"], train=False),
            skip_invalid=cfg["data"]["skip_invalid"],
        )
        if train_ds is not None:
            check_val_categories(
                train_ds.cat_ids, val_ds.cat_ids, paths["train_json"], paths["val_json"]
            )
    return train_ds, val_ds


def check_val_categories(
    train_cat_ids: Iterable[int], val_cat_ids: Iterable[int], train_json, val_json
) -> None:
    """Every class the detector is trained on must be a category of the validation json: the
    evaluator cannot score detections of a category the gt does not define. Checked before
    training, not found after it."""
    missing = sorted(set(train_cat_ids) - set(val_cat_ids))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"data.val.json {val_json} lacks {len(missing)} categor"
            f"{'y' if len(missing) == 1 else 'ies'} of the training set "
            f"{train_json} (category ids {shown}); evaluate on a json with the same "
            f"'categories' list (LVIS and COCO val files list every category)"
        )


def sample_seed(seed: int, rank: int, epoch: int, batch: int, slot: int) -> int:
    """The seed of one sample (or, with a reserved ``slot``, one batch-level draw)."""
    return int(np.random.SeedSequence([seed, rank, epoch, batch, slot]).generate_state(1)[0])


class SeededSamples(Dataset):
    """`dataset[(index, seed)]`: `dataset[index]` with python/numpy/torch RNGs seeded by `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = (
            None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        )
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def epoch_batches(
    batch_sampler, epoch: int, start: int, *, seed: int, rank: int
) -> list[list[tuple[int, int]]]:
    """Batches `start:` of `epoch` as lists of (index, sample seed)."""
    batch_sampler.set_epoch(epoch)
    batches = list(batch_sampler)
    return [
        [(int(i), sample_seed(seed, rank, epoch, b, s)) for s, i in enumerate(batch)]
        for b, batch in enumerate(batches[start:], start=start)
    ]


def make_loader(
    dataset: Dataset, batches: Sequence[list], *, num_workers: int, pin_memory: bool, seed: int
) -> DataLoader:
    """The train loader over the precomputed ``batches`` of `epoch_batches`."""
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
        # an own generator: creating the iterator must not consume the global RNG
        generator=torch.Generator().manual_seed(seed),
    )
