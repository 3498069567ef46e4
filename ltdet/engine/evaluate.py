"""Evaluation of a detector on the validation set: inference (sharded across ranks under DDP),
mapping to the json's ids and the original image coordinates, LVIS-style metrics and the report.

Per-image detections (the `ltdet.evaluation.evaluate_lvis` contract):
  {"image_id": int, "boxes": FloatTensor[K, 4] xyxy in original-image pixels,
   "scores": FloatTensor[K], "category_ids": LongTensor[K] (json category ids)}
"""
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import distributed as du
from .checkpoint import CheckpointError, atomic_write, load_checkpoint

logger = logging.getLogger(__name__)


def label_lookup(label_to_cat_id: dict) -> torch.Tensor:
    """LongTensor lut with `lut[label] = category id` (lut[0] = -1: background never appears)."""
    lut = torch.full((max(label_to_cat_id) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(list(label_to_cat_id.keys()))] = torch.tensor(list(label_to_cat_id.values()))
    return lut


@torch.no_grad()
def inference(model, dataset, *, label_to_cat_id: dict, device: torch.device, batch_size: int = 1,
              num_workers: int = 0, amp: bool = False) -> list:
    """Run `model` (eval mode) over this rank's shard of `dataset`; all ranks' detections are
    gathered on rank 0 (other ranks get []). Returns per-image dicts of CPU tensors."""
    from ltdet.data import InferenceSampler, collate_detection

    sampler = InferenceSampler(len(dataset), du.get_world_size(), du.get_rank())
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_detection)
    lut = label_lookup(label_to_cat_id)
    was_training = model.training
    model.eval()
    results = []
    try:
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
                outputs = model(images)
            for out, tgt in zip(outputs, targets):
                labels = out["labels"].cpu()
                results.append({
                    "image_id": int(tgt["image_id"]),
                    "boxes": out["boxes"].float().cpu() / float(tgt["scale"]),
                    "scores": out["scores"].float().cpu(),
                    "category_ids": lut[labels],
                })
    finally:
        model.train(was_training)
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
    """Per-image tensor dicts -> LVIS result dicts (image_id, category_id, bbox xywh, score)."""
    out = []
    for d in dets:
        b = d["boxes"]
        xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).tolist()
        out.extend({"image_id": d["image_id"], "category_id": c, "bbox": [round(v, 2) for v in bb],
                    "score": round(s, 5)}
                   for c, bb, s in zip(d["category_ids"].tolist(), xywh, d["scores"].tolist()))
    return out


def evaluate_detections(dets: list, *, val_json, train_json=None, out_dir,
                        max_dets: int = 300) -> dict:
    """Write detections.json, compute metrics, write metrics.json / per_class_ap.csv / plot."""
    from ltdet.evaluation import evaluate_lvis
    from ltdet.evaluation.report import format_table, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = to_lvis_results(dets)
    atomic_write(out_dir / "detections.json", lambda f: f.write(json.dumps(results).encode()))
    res = evaluate_lvis(val_json, dets, max_dets=max_dets, train=train_json)
    write_report(res, out_dir)
    # The full table goes to log.txt; the CLIs print it on stdout.
    logger.info("evaluation of %d images, %d detections -> %s", len(dets), len(results), out_dir)
    logging.getLogger(__name__ + ".table").debug("\n%s", format_table(res))
    logger.info("AP %.4f  AP50 %.4f  APr %.4f  APc %.4f  APf %.4f",
                *(res.get(k, float("nan")) for k in ("AP", "AP50", "APr", "APc", "APf")))
    return res


def evaluate_model(model, dataset, *, label_to_cat_id: dict, val_json, train_json, out_dir,
                   device: torch.device, max_dets: int = 300, batch_size: int = 1,
                   num_workers: int = 0, amp: bool = False) -> dict:
    """Inference on all ranks, metrics and report on rank 0 (others return {})."""
    dets = inference(model, dataset, label_to_cat_id=label_to_cat_id, device=device,
                     batch_size=batch_size, num_workers=num_workers, amp=amp)
    res = {}
    if du.is_main_process():
        res = evaluate_detections(dets, val_json=val_json, train_json=train_json,
                                  out_dir=out_dir, max_dets=max_dets)
    du.barrier()
    return res


def evaluate_checkpoint(cfg: dict, ckpt_path, out_dir) -> dict:
    """Evaluate a saved checkpoint on `cfg`'s validation set; writes the report to `out_dir`.

    The class list and statistics come from the checkpoint (saved by the trainer), so the
    training json need not be read; only its path is passed on for per-class training counts.
    """
    from ltdet.data import ClassStats
    from ltdet.models import build_detector

    from .data import build_datasets, check_val_categories, resolve_data_paths
    from .distributed import init_distributed

    info = init_distributed(cfg["device"], timeout_s=cfg["dist_timeout"])
    ckpt = load_checkpoint(ckpt_path)
    paths = resolve_data_paths(cfg)
    meta = ckpt.get("meta")
    if meta is None:
        train_ds, _ = build_datasets(cfg, paths, val=False)
        stats, label_to_cat_id = train_ds.stats, train_ds.label_to_cat_id
    else:
        stats = ClassStats(**meta["stats"])
        label_to_cat_id = {i + 1: c for i, c in enumerate(meta["cat_ids"])}
    _, val_ds = build_datasets(cfg, paths, train=False)
    check_val_categories(list(label_to_cat_id.values()), val_ds.cat_ids,
                         f"{ckpt_path} (its training classes)", paths["val_json"])
    model = build_detector(cfg, len(label_to_cat_id), stats)
    if meta is not None and meta.get("stage2"):
        from .refine import install_refine_head

        install_refine_head(model, cfg, initialise=False)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    # Stage 2 locks frozen BatchNorm layers as FrozenBatchNorm2d, which has no batch counter.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not fit the model built from the config: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}; evaluate it with the config it was "
            "trained with (its config.yaml)")
    model.to(info.device)
    return evaluate_model(model, val_ds, label_to_cat_id=label_to_cat_id,
                          val_json=paths["val_json"], train_json=paths["train_json"],
                          out_dir=out_dir, device=info.device, max_dets=cfg["test"]["max_dets"],
                          batch_size=cfg["data"]["batch_size"],
                          num_workers=cfg["data"]["num_workers"],
                          amp=cfg["solver"]["amp"])
