"""ltdet.config: `_base_` chains, --opts overrides, validation errors, the shipped configs."""

from pathlib import Path

import pytest
import yaml

from ltdet.config import ConfigError, dump_config, load_config, load_schema, schema_path

REPO = Path(__file__).resolve().parent.parent
BASE = schema_path()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_equal_base_yaml():
    cfg = load_config(None)
    assert cfg == yaml.safe_load(BASE.read_text())
    assert cfg["solver"]["lr"] == 0.02 and cfg["model"]["cls_loss"] == {"type": "ce"}


def test_the_schema_ships_inside_the_package_once():
    import ltdet

    assert schema_path().is_file()
    assert schema_path().parent.parent == Path(ltdet.__file__).resolve().parent
    assert not (REPO / "configs" / "base.yaml").exists()  # one copy: the package's
    assert load_schema() == load_schema(schema_path())
    assert load_config(schema_path()) == load_config(None)


def test_base_chain_relative_list_and_deep_merge(tmp_path):
    write(
        tmp_path / "common" / "a.yaml", "solver: {lr: 0.5, max_iter: 10}\ndata: {batch_size: 3}\n"
    )
    write(tmp_path / "common" / "b.yaml", "solver: {lr: 0.25}\nmodel: {backbone: resnet18}\n")
    mid = write(
        tmp_path / "common" / "mid.yaml", "_base_: [a.yaml, b.yaml]\nsolver: {gamma: 0.5}\n"
    )
    child = write(
        tmp_path / "exp" / "child.yaml", "_base_: ../common/mid.yaml\nsolver: {warmup_iters: 7}\n"
    )
    cfg = load_config(child)
    # b after a in the list: b's lr wins; a's max_iter survives; mid and child merge on top
    assert cfg["solver"]["lr"] == 0.25
    assert cfg["solver"]["max_iter"] == 10
    assert cfg["solver"]["gamma"] == 0.5
    assert cfg["solver"]["warmup_iters"] == 7
    assert cfg["data"]["batch_size"] == 3
    assert cfg["model"]["backbone"] == "resnet18"
    # untouched keys keep base.yaml's defaults
    assert cfg["solver"]["momentum"] == 0.9 and cfg["data"]["max_size"] == 400
    assert "_base_" not in cfg and load_config(mid)["solver"]["warmup_iters"] == 100


def test_opts_override_parsed_as_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "solver.lr=1e-3",
            "data.min_size=[128, 160]",
            "solver.clip_grad_norm=10",
            "model.weights=null",
            "solver.amp=false",
            "output_dir=runs/x",
        ],
    )
    assert cfg["solver"]["lr"] == pytest.approx(1e-3) and isinstance(cfg["solver"]["lr"], float)
    assert cfg["data"]["min_size"] == [128, 160]
    assert cfg["solver"]["clip_grad_norm"] == 10
    assert cfg["model"]["weights"] is None and cfg["solver"]["amp"] is False
    assert cfg["output_dir"] == "runs/x"


def test_float_without_dot_in_file_is_float(tmp_path):
    f = write(tmp_path / "c.yaml", "solver: {lr: 5e-3, warmup_factor: 1E-4}\n")
    cfg = load_config(f)
    assert cfg["solver"]["lr"] == 0.005 and cfg["solver"]["warmup_factor"] == 0.0001


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    f = write(tmp_path / "typo.yaml", "model:\n  roi_heads: {batch_size_per_imag: 256}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "'model.roi_heads.batch_size_per_imag'" in msg
    assert str(f) in msg
    assert "did you mean 'model.roi_heads.batch_size_per_image'" in msg


def test_unknown_key_from_opts_and_top_level():
    with pytest.raises(
        ConfigError, match=r"'solver\.lrr' \(set in --opts\); did you mean 'solver\.lr'"
    ):
        load_config(None, ["solver.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'sovler'.*did you mean 'solver'"):
        load_config(None, ["sovler.lr=0.1"])


@pytest.mark.parametrize(
    "opt, fragment",
    [
        ("solver.lr=abc", "'solver.lr' (set in --opts) expects float"),
        ("solver.max_iter=1.5", "'solver.max_iter' (set in --opts) expects int"),
        ("solver.amp=1", "'solver.amp' (set in --opts) expects bool"),
        ("solver.max_iter=true", "'solver.max_iter' (set in --opts) expects int"),
        ("solver.lr=null", "'solver.lr' (set in --opts) expects float like 0.02, got null"),
        ("data.min_size=256", "'data.min_size' (set in --opts) expects list"),
        ("data.min_size=[256, big]", "'data.min_size[1]'"),
        ("data.train=3", "'data.train' (set in --opts) expects dict"),
        ("solver.schedule=linear", "must be one of step, cosine"),
    ],
)
def test_wrong_type_is_an_error(opt, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [opt])
    assert fragment in str(e.value)


def test_int_for_float_and_value_for_null_default_are_accepted():
    cfg = load_config(None, ["solver.lr=1", "data.train.json=a.json", "solver.clip_grad_norm=2.5"])
    assert cfg["solver"]["lr"] == 1 and cfg["data"]["train"]["json"] == "a.json"
    assert cfg["solver"]["clip_grad_norm"] == 2.5


def test_wrong_type_in_file_names_the_file(tmp_path):
    f = write(tmp_path / "bad.yaml", "data: {batch_size: two}\n")
    with pytest.raises(ConfigError, match=r"'data\.batch_size' \(set in .*bad\.yaml\) expects int"):
        load_config(f)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    f = write(tmp_path / "c.yaml", "_base_: missing_base.yaml\n")
    with pytest.raises(ConfigError, match=r"_base_ file not found: missing_base\.yaml"):
        load_config(f)


def test_circular_base_chain(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular _base_ chain"):
        load_config(tmp_path / "a.yaml")


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["solver.lr"])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "l.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path / "y.yaml", "solver: {lr: [\n"))
    with pytest.raises(ConfigError, match="_base_ must be a path or a list"):
        load_config(write(tmp_path / "b.yaml", "_base_: 3\n"))


def test_open_maps_accept_any_key_and_replace_on_type_change(tmp_path):
    parent = write(
        tmp_path / "p.yaml",
        "model: {cls_loss: {type: eqlv2, gamma: 12, mu: 0.8}}\n"
        "data: {sampler: {type: repeat_factor, threshold: 0.001}}\n",
    )
    same = write(tmp_path / "same.yaml", "_base_: p.yaml\nmodel: {cls_loss: {gamma: 6}}\n")
    other = write(tmp_path / "other.yaml", "_base_: p.yaml\nmodel: {cls_loss: {type: ce}}\n")
    assert load_config(same)["model"]["cls_loss"] == {"type": "eqlv2", "gamma": 6, "mu": 0.8}
    # switching the type drops the parent's hyper-parameters instead of merging them
    assert load_config(other)["model"]["cls_loss"] == {"type": "ce"}
    cfg = load_config(parent, ["data.sampler={type: class_aware}"])
    assert cfg["data"]["sampler"] == {"type": "class_aware"}
    cfg = load_config(parent, ["model.cls_loss.gamma=3", "refine.cls_loss={type: las, x: 1}"])
    assert cfg["model"]["cls_loss"]["gamma"] == 3 and cfg["refine"]["cls_loss"]["x"] == 1
    with pytest.raises(ConfigError, match=r"unknown config key 'refine\.bogus'"):
        load_config(None, ["refine.bogus=1"])  # only sub-maps of refine are open
    with pytest.raises(ConfigError, match=r"'model\.box_loss\.type'.*must be a string"):
        load_config(None, ["model.box_loss.type=3"])


def test_delete_key_replaces_a_closed_map(tmp_path):
    f = write(tmp_path / "d.yaml", "data: {train: {_delete_: true, json: a.json, images: im}}\n")
    assert load_config(f)["data"]["train"] == {"json": "a.json", "images": "im"}


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["solver.lr=0.001", "model.cls_loss={type: eqlv2, gamma: 12}"])
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg["output_dir"] != load_schema()["output_dir"]


def test_method_configs_change_only_their_method():
    demo = load_config(REPO / "configs/synthetic/faster_rcnn_r18_fpn.yaml")
    assert demo["data"]["train"]["json"] is None and demo["model"]["backbone"] == "resnet18"
    eqlv2 = load_config(REPO / "configs/synthetic/eqlv2.yaml")
    assert eqlv2["model"]["cls_loss"] == {"type": "eqlv2", "gamma": 12, "mu": 0.8, "alpha": 4.0}
    rfs = load_config(REPO / "configs/synthetic/rfs.yaml")
    assert rfs["data"]["sampler"]["type"] == "repeat_factor"
    for cfg in (eqlv2, rfs):
        for section in ("solver", "test"):
            assert cfg[section] == demo[section]
    outs = {load_config(p)["output_dir"] for p in ALL_CONFIGS}
    assert len(outs) == len(ALL_CONFIGS), "two configs would write into the same run folder"
    lvis = load_config(REPO / "configs/lvis_v1/faster_rcnn_r50_fpn_1x.yaml")
    assert lvis["data"]["train"]["json"] == "datasets/lvis/lvis_v1_train.json"
    # 12 epochs at 16 images: the EQLv2 / Seesaw 1x schedule (configs/lvis_v1 comments)
    assert lvis["model"]["backbone"] == "resnet50" and lvis["solver"]["max_iter"] == 74544


SYNTHETIC = sorted((REPO / "configs" / "synthetic").glob("*.yaml"))


def test_synthetic_method_configs_are_accepted_by_their_builders(tmp_path):
    """Each method config's loss / sampler specs build (names and hyper-parameters exist)."""
    from ltdet.data import build_dataset, build_train_sampler
    from ltdet.data.synthetic import make_synthetic_lvis
    from ltdet.losses import build_loss
    from ltdet.models import build_roi_sampler

    data = make_synthetic_lvis(
        tmp_path,
        seed=0,
        num_train=8,
        num_val=4,
        num_classes=3,
        image_size=64,
        min_radius=6,
        max_radius=16,
        max_images_per_class=6,
        val_instances_per_class=2,
    )
    ds = build_dataset(data["train_json"], data["image_root"])
    assert len(SYNTHETIC) >= 20
    for path in SYNTHETIC:
        m = load_config(path)
        build_loss(m["model"]["cls_loss"], num_classes=ds.num_classes, stats=ds.stats)
        build_loss(m["model"]["box_loss"], num_classes=ds.num_classes, stats=ds.stats)
        build_roi_sampler(m["model"]["sampler"])
        assert len(build_train_sampler(m["data"], ds, 1, 0, 0)) > 0
