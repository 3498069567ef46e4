"""ltdet.component_check: every component spec of a config is checked when the config loads."""

import pytest

from ltdet.config import load_config, schema_path


@pytest.mark.parametrize(
    "opt,expect",
    [
        (
            "model.cls_loss={type: focal, gama: 12}",
            r"model\.cls_loss.*'gama'.*did you mean 'gamma'",
        ),
        ("model.cls_loss.type=eqlv3", r"unknown loss type 'eqlv3'; did you mean 'eqlv2'"),
        ("model.box_loss.type=smoth_l1", r"model\.box_loss.*did you mean 'smooth_l1'"),
        ("model.sampler.type=ohm", r"model\.sampler.*did you mean 'ohem'"),
        ("model.classifier.type=cosin", r"model\.classifier.*did you mean 'cosine'"),
        ("model.lds={enabled: true, bins: 0}", r"model\.lds.*bins must be >= 1"),
        ("model.fds={enabled: true, momentum: 2.0}", r"model\.fds.*momentum"),
        (
            "data.sampler={type: repeat_factor, thresh: 0.1}",
            r"data\.sampler.*did you mean 'threshold'",
        ),
    ],
)
def test_component_specs_are_validated_when_the_config_loads(tmp_path, opt, expect):
    import yaml

    from ltdet.config import ConfigError, parse_value

    key, _, value = opt.partition("=")
    tree = node = {"_base_": str(schema_path())}
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = parse_value(value)
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=expect) as e:
        load_config(yaml_file)
    assert "exp.yaml" in str(e.value)
