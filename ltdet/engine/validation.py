"""Validation of a detector: inference on the validation set (sharded across ranks under DDP),
mapping to the json's ids and the original image coordinates, LVIS-style metrics and the report.

Per-image detections (the `ltdet.evaluation.evaluate_lvis` contract):
  {"image_id": int, "boxes": FloatTensor[K, 4] xyxy in original-image pixels,
   "scores": FloatTensor[K], "category_ids": LongTensor[K] (json category ids)}
and, for Mask R-CNN, "segmentation": K compressed RLE dicts {"size": [h, w], "counts": str} in
original-image pixels (`ltdet.engine.outputs`; encoded per image, so no mask tensor is kept).

Reports (`evaluate_detections`): bbox as before - metrics.json (its flat keys), per_class_ap.csv,
ap_vs_frequency.png, reliability.png, detections.json (with the masks of a mask model). A mask
model adds segm: per_class_ap_segm.csv, ap_vs_frequency_segm.png, and metrics.json keyed by iou
type as well ({..., "bbox": {...}, "segm": {...}}). With `test.topk_per_class: K` the K best
detections of each class over the set (`ltdet.engine.topk`) go to detections_topk.json and are
scored with Fixed AP (`protocol="fixed"`): metrics.json["fixed"][iou type],
per_class_ap[_segm]_fixed.csv, ap_vs_frequency[_segm]_fixed.png.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ltdet.data import ClassStats, InferenceSampler, collate_detection, label_to_cat_id_table
from ltdet.evaluation import evaluate_lvis, format_table, write_report
from ltdet.evaluation.calibration import calibration_metrics, evaluate_calibration
from ltdet.evaluation.reliability_plot import plot_reliability
from ltdet.evaluation.report import scalar_metrics
from ltdet.fileio import atomic_write
from ltdet.models import build_detector

from . import distributed as du
from .checkpoint import CheckpointError, load_checkpoint
from .distributed import init_distributed
from .loaders import build_datasets, check_val_categories, locate_or_generate_data
from .outputs import masks_to_rle, unpasted_masks
from .refine import install_refine_head
from .topk import TopKPerClass

__all__ = [
    "checkpoint_classes",
    "evaluate_checkpoint",
    "evaluate_detections",
    "evaluate_model",
    "inference",
    "to_lvis_results",
]

logger = logging.getLogger(__name__)


def _category_table(label_to_cat_id: dict) -> torch.Tensor:
    """The data package's label -> category id table for a ``{label: category id}`` dict."""
    labels = sorted(label_to_cat_id)
    if labels != list(range(1, len(labels) + 1)):
        raise ValueError(f"label_to_cat_id must map the labels 1..C, got labels {labels[:5]}...")
    return label_to_cat_id_table([label_to_cat_id[k] for k in labels])


def _image_detections(
    out: dict,
    tgt: dict,
    lut: torch.Tensor,
    *,
    pasted: bool,
    max_dets: int | None,
    topk: TopKPerClass | None,
) -> dict:
    """One image's evaluation entry from the model's output (boxes to original pixels, masks
    encoded); the image's candidates are offered to `topk` as well."""
    labels = out["labels"].cpu()
    scores = out["scores"].float().cpu()
    boxes = out["boxes"].float().cpu() / float(tgt["scale"])
    masks = out.get("masks")
    n = scores.numel()
    # the per-image list: every detection, or the top max_dets as the evaluator's cap keeps them
    keep = (
        torch.sort(scores, descending=True, stable=True).indices[:max_dets]
        if max_dets is not None and n > max_dets
        else None
    )
    admitted = torch.where(topk.admits(labels, scores))[0] if topk is not None else None
    image_rle = topk_rle = None
    if masks is not None:
        # each needed mask is pasted and encoded once, for the per-image list and the top-k
        rows = torch.arange(n) if keep is None else keep
        need = rows if admitted is None else torch.unique(torch.cat([rows, admitted]))
        rle = masks_to_rle(masks[need], boxes[need], tuple(tgt["orig_size"]), pasted=pasted)
        at = torch.full((n,), -1, dtype=torch.int64)
        at[need] = torch.arange(need.numel())
        image_rle = [rle[i] for i in at[rows].tolist()]
        if admitted is not None:
            topk_rle = [rle[i] for i in at[admitted].tolist()]
    if topk is not None and admitted is not None:  # admitted is set whenever topk is
        topk.add(
            labels[admitted],
            scores[admitted],
            torch.full((admitted.numel(),), int(tgt["image_id"])),
            boxes[admitted],
            topk_rle,
        )
    if keep is not None:
        labels, scores, boxes = labels[keep], scores[keep], boxes[keep]
    entry = {
        "image_id": int(tgt["image_id"]),
        "boxes": boxes,
        "scores": scores,
        "category_ids": lut[labels],
    }
    if image_rle is not None:
        entry["segmentation"] = image_rle
    return entry


@torch.no_grad()
def inference(
    model: torch.nn.Module,
    dataset: Any,
    *,
    label_to_cat_id: dict,
    device: torch.device,
    batch_size: int = 1,
    num_workers: int = 0,
    amp: bool = False,
    max_dets: int | None = None,
    topk: TopKPerClass | None = None,
) -> list:
    """Run `model` (eval mode) over this rank's shard of `dataset` (an `ltdet.data` detection data
    set); all ranks' detections are gathered on rank 0 (other ranks get []). Returns per-image
    dicts of CPU tensors (with RLE "segmentation" lists for a mask model).

    max_dets: keep at most this many detections per image (the best), e.g. when
    `model.detections_per_img` was raised for `topk`; None keeps the model's output.
    topk: a `TopKPerClass` that every image's detections are offered to (before max_dets
    applies); on rank 0 it ends up holding the top K per class of all ranks."""
    sampler = InferenceSampler(len(dataset), du.get_world_size(), du.get_rank())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
    )
    lut = _category_table(label_to_cat_id)
    was_training = model.training
    model.eval()
    results = []
    try:
        with unpasted_masks(model) as unpasted:
            for images, targets in loader:
                images = [im.to(device, non_blocking=True) for im in images]
                with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
                    outputs = model(images)
                for out, tgt in zip(outputs, targets):
                    results.append(
                        _image_detections(
                            out, tgt, lut, pasted=not unpasted, max_dets=max_dets, topk=topk
                        )
                    )
    finally:
        model.train(was_training)
    if topk is not None:
        pools = du.all_gather_object(topk.state())
        if du.is_main_process():
            for rank, pool in enumerate(pools):
                if rank != du.get_rank():
                    topk.add_pool(pool)
    gathered = du.all_gather_object(results)
    if not du.is_main_process():
        return []
    # InferenceSampler shards are disjoint; keep one entry per image regardless.
    by_id = {}
    for part in gathered:
        for r in part:
            by_id[r["image_id"]] = r
    return [by_id[k] for k in sorted(by_id)]


def to_lvis_results(dets: list) -> list:
    """Per-image tensor dicts -> LVIS result dicts (image_id, category_id, bbox xywh, score;
    and segmentation, the RLE dict, where the entry has masks)."""
    out: list[dict] = []
    for d in dets:
        b = d["boxes"]
        xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
        rows = (
            {
                "image_id": d["image_id"],
                "category_id": c,
                "bbox": [round(v, 2) for v in bb],
                "score": round(s, 5),
            }
            for c, bb, s in zip(d["category_ids"].tolist(), xywh, d["scores"].tolist())
        )
        if "segmentation" in d:
            rows = ({**r, "segmentation": m} for r, m in zip(rows, d["segmentation"]))
        out.extend(rows)
    return out


def _type_report(res: dict, out_dir: Path, suffix: str) -> None:
    """per_class_ap{suffix}.csv and ap_vs_frequency{suffix}.png of one iou type / protocol
    (`write_report`'s files, renamed; its metrics.json is folded into the main one)."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".report") as tmp:
        paths = write_report(res, tmp)
        os.replace(paths["per_class"], out_dir / f"per_class_ap{suffix}.csv")
        os.replace(paths["plot"], out_dir / f"ap_vs_frequency{suffix}.png")


def _log_summary(res: dict, what: str) -> None:
    logging.getLogger(__name__ + ".table").info("%s\n%s", what, format_table(res))
    logger.info(
        "%s: AP %.4f  AP50 %.4f  APr %.4f  APc %.4f  APf %.4f",
        what,
        *(res.get(k, float("nan")) for k in ("AP", "AP50", "APr", "APc", "APf")),
    )


def evaluate_detections(
    dets: list,
    *,
    val_json: str | os.PathLike,
    train_json: str | os.PathLike | None = None,
    out_dir: str | os.PathLike,
    max_dets: int = 300,
    topk_dets: list | None = None,
    topk_per_class: int = 0,
) -> dict:
    """Write detections.json, compute metrics (AP and D-ECE by group), write metrics.json /
    per_class_ap.csv / ap_vs_frequency.png / reliability.png; entries with "segmentation" (a
    mask model) are also scored with mask AP, and `topk_dets` (the top `topk_per_class` of each
    class over the set) with Fixed AP (module docstring). Returns the bbox result, with the
    segm one under "segm" and the Fixed AP ones under "fixed" ({iou type: result})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = to_lvis_results(dets)
    atomic_write(out_dir / "detections.json", lambda f: f.write(json.dumps(results).encode()))
    res = evaluate_lvis(val_json, dets, max_dets=max_dets, train=train_json)
    cal = evaluate_calibration(val_json, dets, max_dets=max_dets, train=train_json)
    res.update(calibration_metrics(cal, coco_lt_bins="AP1" in res))
    write_report(res, out_dir)
    plot_reliability(cal, out_dir / "reliability.png")
    # The full table goes to the log (log.txt on rank 0, where `setup_logging` sends ltdet's INFO
    # records); the CLIs print it on stdout as well.
    logger.info("evaluation of %d images, %d detections -> %s", len(dets), len(results), out_dir)
    logging.getLogger(__name__ + ".table").info("\n%s", format_table(res))
    logger.info(
        "AP %.4f  AP50 %.4f  APr %.4f  APc %.4f  APf %.4f",
        *(res.get(k, float("nan")) for k in ("AP", "AP50", "APr", "APc", "APf")),
    )
    with_masks = any("segmentation" in d for d in dets) or (
        topk_dets is not None and any("segmentation" in d for d in topk_dets)
    )
    if not with_masks and topk_dets is None:
        return res  # a box model's report, exactly as before
    keyed = {"bbox": scalar_metrics(res)}
    if with_masks:
        res["segm"] = evaluate_lvis(
            val_json, results, iou_type="segm", max_dets=max_dets, train=train_json
        )
        _type_report(res["segm"], out_dir, "_segm")
        _log_summary(res["segm"], "mask AP (segm)")
        keyed["segm"] = scalar_metrics(res["segm"])
    if topk_dets is not None:
        fixed_results = to_lvis_results(topk_dets)
        atomic_write(
            out_dir / "detections_topk.json", lambda f: f.write(json.dumps(fixed_results).encode())
        )
        res["fixed"] = {}
        for iou_type in ("bbox", "segm") if with_masks else ("bbox",):
            fixed = evaluate_lvis(
                val_json,
                topk_dets if iou_type == "bbox" else fixed_results,
                iou_type=iou_type,
                train=train_json,
                protocol="fixed",
                dets_per_class=int(topk_per_class),
            )
            res["fixed"][iou_type] = fixed
            _type_report(fixed, out_dir, ("" if iou_type == "bbox" else "_segm") + "_fixed")
            _log_summary(fixed, f"Fixed AP ({iou_type}, top {topk_per_class} per class)")
        keyed["fixed"] = {t: scalar_metrics(r) for t, r in res["fixed"].items()}
    # metrics.json keyed by iou type, the bbox metrics also flat as for a box model
    atomic_write(
        out_dir / "metrics.json",
        lambda f: f.write(json.dumps({**scalar_metrics(res), **keyed}, indent=2).encode()),
    )
    return res


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    *,
    label_to_cat_id: dict,
    val_json: str | os.PathLike,
    train_json: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    device: torch.device,
    max_dets: int = 300,
    batch_size: int = 1,
    num_workers: int = 0,
    amp: bool = False,
    topk_per_class: int = 0,
) -> dict:
    """Inference on all ranks, metrics and report on rank 0 (others return {}).
    `topk_per_class` K > 0: also the top K detections of each class over the set, scored with
    Fixed AP (`evaluate_detections`); the per-image lists keep their best `max_dets`."""
    topk = TopKPerClass(len(label_to_cat_id), topk_per_class) if topk_per_class > 0 else None
    dets = inference(
        model,
        dataset,
        label_to_cat_id=label_to_cat_id,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=amp,
        max_dets=max_dets if topk is not None else None,
        topk=topk,
    )
    res = {}
    if du.is_main_process():
        topk_dets = topk.per_image(_category_table(label_to_cat_id)) if topk is not None else None
        res = evaluate_detections(
            dets,
            val_json=val_json,
            train_json=train_json,
            out_dir=out_dir,
            max_dets=max_dets,
            topk_dets=topk_dets,
            topk_per_class=topk_per_class,
        )
    du.barrier()
    return res


def checkpoint_classes(ckpt: dict, cfg: dict, paths: dict) -> tuple[ClassStats, dict]:
    """(class statistics, ``{label: json category id}``) of the classes a checkpoint was trained
    on: from its ``meta`` (the trainer saves both), else rebuilt from the config's training json
    (``paths`` as :func:`locate_or_generate_data` returns them)."""
    meta = ckpt.get("meta") or {}
    if "stats" in meta:
        return ClassStats(**meta["stats"]), {i + 1: c for i, c in enumerate(meta["cat_ids"])}
    train_ds: Any
    train_ds, _ = build_datasets(cfg, paths, val=False)
    return train_ds.stats, train_ds.label_to_cat_id


def evaluate_checkpoint(cfg: dict, ckpt_path: str | Path, out_dir: str | os.PathLike) -> dict:
    """Evaluate a saved checkpoint on `cfg`'s validation set; writes the report to `out_dir`.

    The class list and statistics come from the checkpoint (saved by the trainer), so the
    training json need not be read; only its path is passed on for per-class training counts.
    """
    info = init_distributed(cfg["device"], timeout_s=cfg["dist_timeout"])
    ckpt = load_checkpoint(ckpt_path)
    paths = locate_or_generate_data(cfg)
    stats, label_to_cat_id = checkpoint_classes(ckpt, cfg, paths)
    val_ds: Any
    _, val_ds = build_datasets(cfg, paths, train=False)
    check_val_categories(
        list(label_to_cat_id.values()),
        val_ds.cat_ids,
        f"{ckpt_path} (its training classes)",
        paths["val_json"],
    )
    model = build_detector(cfg, len(label_to_cat_id), stats)
    if (ckpt.get("meta") or {}).get("stage2"):
        install_refine_head(model, cfg, initialise=False)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    # Stage 2 locks frozen BatchNorm layers as FrozenBatchNorm2d, which has no batch counter.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not fit the model built from the config: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}; evaluate it with the config it was "
            "trained with (its config.yaml)"
        )
    model.to(info.device)
    return evaluate_model(
        model,
        val_ds,
        label_to_cat_id=label_to_cat_id,
        val_json=paths["val_json"],
        train_json=paths["train_json"],
        out_dir=out_dir,
        device=info.device,
        max_dets=cfg["test"]["max_dets"],
        topk_per_class=cfg["test"].get("topk_per_class", 0),
        batch_size=cfg["data"]["batch_size"],
        num_workers=cfg["data"]["num_workers"],
        amp=cfg["solver"]["amp"],
    )
