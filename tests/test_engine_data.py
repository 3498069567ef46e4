"""The engine's data set builder honours `data.skip_invalid` (degenerate boxes on real LVIS/COCO)."""
import json

import pytest

from _data_fixtures import make_lvis
from ltdet.config import load_config
from ltdet.engine.data import build_datasets


def _with_degenerate_box(tmp_path):
    path, root, data = make_lvis(tmp_path)
    data["annotations"][0]["bbox"][2] = 0.0  # zero width
    with open(path, "w") as f:
        json.dump(data, f)
    paths = {"train_json": path, "train_images": root, "val_json": path, "val_images": root}
    return paths, data


def test_degenerate_box_stops_by_default_naming_the_annotation(tmp_path):
    paths, data = _with_degenerate_box(tmp_path)
    cfg = load_config("configs/base.yaml")
    with pytest.raises(ValueError) as err:
        build_datasets(cfg, paths, val=False)
    assert str(data["annotations"][0]["id"]) in str(err.value)
    assert "skip_invalid" in str(err.value)


def test_skip_invalid_drops_only_the_degenerate_box(tmp_path):
    paths, data = _with_degenerate_box(tmp_path)
    cfg = load_config("configs/base.yaml", ["data.skip_invalid=true"])
    train_ds, val_ds = build_datasets(cfg, paths)
    kept = len(data["annotations"]) - 1
    assert float(train_ds.stats.instance_count.sum()) == kept
    assert float(val_ds.stats.instance_count.sum()) == kept
