"""ltdet.engine.loaders: epoch batches and seeded samples, locating the data files, the val
categories check and `data.skip_invalid` (degenerate boxes on real LVIS/COCO)."""

import json
from pathlib import Path

import pytest
import torch

from ltdet.config import load_config, schema_path
from ltdet.engine.loaders import SeededSamples, build_datasets, epoch_batches


def test_epoch_batches_skip_and_seeded_samples(tiny_data, tiny_cfg):
    from ltdet.data import build_dataset, build_train_sampler, build_transforms

    cfg = tiny_cfg(tiny_data, "unused")
    ds = build_dataset(
        tiny_data["train_json"],
        tiny_data["image_root"],
        transforms=build_transforms(cfg["data"], train=True),
    )
    sampler = build_train_sampler(cfg["data"], ds, 1, 0, 0)
    full = epoch_batches(sampler, 1, 0, seed=0, rank=0)
    assert sorted(i for b in full for i, _ in b) == list(range(8))  # one epoch = every image once
    assert epoch_batches(sampler, 1, 2, seed=0, rank=0) == full[2:]
    assert epoch_batches(sampler, 2, 0, seed=0, rank=0) != full  # a new epoch, a new order
    assert epoch_batches(sampler, 1, len(full), seed=0, rank=0) == []

    seeded = SeededSamples(ds)
    index, seed = full[0][0]
    before = torch.get_rng_state()
    a_img, a_tgt = seeded[(index, seed)]
    torch.rand(5)  # whatever happens in between ...
    b_img, b_tgt = seeded[(index, seed)]
    assert torch.equal(a_img, b_img) and torch.equal(a_tgt["boxes"], b_tgt["boxes"])
    # ... and loading in the main process leaves the training RNG stream untouched
    torch.set_rng_state(before)
    seeded[(index, seed)]
    assert torch.equal(torch.get_rng_state(), before)


def test_missing_data_files_are_named(tmp_path):
    from ltdet.engine.loaders import locate_or_generate_data

    cfg = load_config(
        None, [f"data.train.json={tmp_path}/nope.json", f"data.train.images={tmp_path}"]
    )
    with pytest.raises(FileNotFoundError, match=r"data\.train\.json: .*nope\.json does not exist"):
        locate_or_generate_data(cfg)
    (tmp_path / "t.json").write_text("{}")
    cfg = load_config(None, [f"data.train.json={tmp_path}/t.json", "data.train.images=/no/such"])
    with pytest.raises(FileNotFoundError, match=r"data\.train\.images: '/no/such' is not a folder"):
        locate_or_generate_data(cfg)


def test_val_json_missing_a_training_category_is_found_before_training(
    tiny_data, tmp_path, tiny_cfg
):
    from ltdet.engine.trainer import Trainer

    val = json.loads(Path(tiny_data["val_json"]).read_text())
    dropped = val["categories"].pop()["id"]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != dropped]
    bad_val = tmp_path / "val_missing.json"
    bad_val.write_text(json.dumps(val))
    cfg = tiny_cfg(tiny_data, tmp_path / "val", f"data.val.json={bad_val}")
    with pytest.raises(ValueError, match=rf"val_missing.json lacks 1 category.*ids {dropped}\)"):
        Trainer(cfg, evaluate=True, progress=False)


def _with_degenerate_box(tmp_path, make_lvis):
    path, root, data = make_lvis(tmp_path)
    data["annotations"][0]["bbox"][2] = 0.0  # zero width
    with open(path, "w") as f:
        json.dump(data, f)
    paths = {"train_json": path, "train_images": root, "val_json": path, "val_images": root}
    return paths, data


def test_degenerate_box_stops_by_default_naming_the_annotation(tmp_path, make_lvis):
    paths, data = _with_degenerate_box(tmp_path, make_lvis)
    cfg = load_config(schema_path())
    with pytest.raises(ValueError) as err:
        build_datasets(cfg, paths, val=False)
    assert str(data["annotations"][0]["id"]) in str(err.value)
    assert "skip_invalid" in str(err.value)


def test_skip_invalid_drops_only_the_degenerate_box(tmp_path, make_lvis):
    paths, data = _with_degenerate_box(tmp_path, make_lvis)
    cfg = load_config(schema_path(), ["data.skip_invalid=true"])
    train_ds, val_ds = build_datasets(cfg, paths)
    kept = len(data["annotations"]) - 1
    assert float(train_ds.stats.instance_count.sum()) == kept
    assert float(val_ds.stats.instance_count.sum()) == kept
